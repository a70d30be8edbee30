#!/usr/bin/env bash
# One device call that checks and times the kernels and the 8B-shape decode step (at most 570 s of steps,
# inside the device tool's 600 s per call; each step has its own limit, so a slow one cannot eat the rest):
#
#   bash benchmarks/gpu_check.sh            # on the device machine, from the repo root; writes to $OUT
#
# 1. the GPU kernel tests (tests/test_triton_kernels.py, GPU cases only)
# 2. benchmarks/kernels.py at the decode and verify sizes M = 1, 2, 4, 8, 16 against bf16 and tinygemm
# 3. benchmarks/gemv_lab.py at M = 1 and 4, both streaming kernels (configs and the read floor), 8B-shape matrices
# 4. benchmarks/e2e.py, Llama-3-8B shape (random weights): autoregressive bf16 and MXFP4, and the step costs of
#    the 5-token verifies (the tensor-core GEMV's work: 2026-11-22 mxfp4 q=5 10.5 ms, w4a16 q=5 14.3 ms)
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
step gpu_tests 90 python -m pytest -q -x tests/test_triton_kernels.py -k gpu
step kernels 170 python benchmarks/kernels.py --kinds bf16,tinygemm,mxfp4,w4a16 --ms 1,2,4,8,16 \
  --out "$OUT/kernels_m1_16.md" --json "$OUT/kernels_m1_16.json"
step gemv_lab 110 python benchmarks/gemv_lab.py --kernels gemv,mma --ms 1,4 --shapes 4096x4096,4096x28672,14336x4096 \
  --out "$OUT/gemv_lab.md" --json "$OUT/gemv_lab.json"
step e2e_8b 190 python benchmarks/e2e.py --model llama3-8b-shape --new-tokens 128 \
  --rows ar_bf16@inductor,ar_mxfp4@inductor --steps --steps-compile none \
  --step-shapes bf16:5,mxfp4:1,mxfp4:5,w4a16:1,w4a16:5,round:mxfp4:bf16:4 --out "$OUT" --tag llama3_8b_shape_check
grep -E "^\| (tinygemm|mxfp4|w4a16) \| (1|4|16) " "$OUT/kernels_m1_16.md" 2>/dev/null
grep -E "^\| (ar_|bf16|mxfp4|w4a16|round)" "$OUT"/e2e_llama3_8b_shape_check.md 2>/dev/null
