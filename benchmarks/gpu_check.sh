#!/usr/bin/env bash
# One device call that checks and times the kernels and the 8B-shape decode step (at most 570 s of steps,
# inside the device tool's 600 s per call; each step has its own limit, so a slow one cannot eat the rest):
#
#   bash benchmarks/gpu_check.sh            # on the device machine, from the repo root; writes to $OUT
#
# 1. the GPU kernel tests (tests/test_triton_kernels.py, GPU cases only)
# 2. benchmarks/kernels.py at the decode sizes M = 1, 2, 4 against bf16 and tinygemm
# 3. benchmarks/gemv_lab.py at M = 1 (configs and the read floor), 8B-shape matrices
# 4. benchmarks/e2e.py, Llama-3-8B shape (random weights), autoregressive bf16 and MXFP4 (issue 7's ratio)
# Results land in $OUT (fetched by the device tool); copy the ones worth keeping to benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/specq_gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   rc=$? ($(tail -n 1 "$OUT/$name.log" | cut -c1-150))"
}
step gpu_tests 100 python -m pytest -q -x tests/test_triton_kernels.py -k gpu
step kernels 150 python benchmarks/kernels.py --kinds bf16,tinygemm,mxfp4,w4a16 --ms 1,2,4 \
  --out "$OUT/kernels_m124.md" --json "$OUT/kernels_m124.json"
step gemv_lab 80 python benchmarks/gemv_lab.py --ms 1 --shapes 4096x6144,4096x4096,4096x28672,14336x4096 \
  --out "$OUT/gemv_lab.md" --json "$OUT/gemv_lab.json"
step e2e_8b 240 python benchmarks/e2e.py --model llama3-8b-shape \
  --rows ar_bf16@inductor,ar_mxfp4@inductor --out "$OUT" --tag llama3_8b_shape_check
grep -E "^\| (mxfp4|w4a16) \| 1 " "$OUT/kernels_m124.md" 2>/dev/null
grep -E "^\| ar_" "$OUT"/e2e_llama3_8b_shape_check.md 2>/dev/null
