#!/usr/bin/env bash
# One device call that checks and times the kernels and the 8B-shape decode step. Each step has its own time
# limit, so a slow one cannot eat the rest; pick the steps that fit the device tool's 600 s per call:
#
#   bash benchmarks/gpu_check.sh                       # default: gpu_tests e2e_8b kernels_m12 (~490 s)
#   bash benchmarks/gpu_check.sh gpu_tests w4a4_large  # only these steps
#
# gpu_tests   (240 s)  the GPU kernel tests (tests/test_triton_kernels.py, GPU cases only)
# kernels     (170 s) benchmarks/kernels.py at the decode and verify sizes M = 1..16 against bf16 and tinygemm
# kernels_m12 (60 s)  the same at M = 1, 2 only (the sizes where tinygemm is closest)
# gemv_lab    (110 s) benchmarks/gemv_lab.py at M = 1 and 4, both streaming kernels, 8B-shape matrices
# e2e_8b      (190 s) benchmarks/e2e.py, Llama-3-8B shape (random weights): autoregressive bf16 and MXFP4, and
#                     the step costs of the 5-token verifies
# w4a4_large  (200 s) the W4A4 GEMM at M = 256, 1024 against bf16 (issue 6's 1.5x goal)
# w4a4_quick  (140 s) the W4A4 GEMM alone at M = 32, 64, 256, 1024 on two shapes, and the autotuner's picks
# gpu_w4a4    (240 s) the GPU tests of the W4A4 GEMM and the activation pre-kernel only
# wgmma       (410 s) the Gluon W4A4 kernel's tests and the pre-kernel's (both K orders), then it, the Triton
#                     W4A4 GEMM and bf16 at M = 256, 1024
# wgmma_quick (90 s)  the Gluon W4A4 kernel on two ragged shapes and timed at one size (a short call)
# wgmma_ws    (300 s) the GPU tests of the warp-specialized Gluon candidates (a copy warp issues the TMA
#                     copies), then they and the others timed at 4096 x 4096, M = 1024 and 256
# wgmma_tests (150 s) the Gluon W4A4 kernel's tests only
# wgmma_ncu   (180 s) Nsight Compute, with warp stall reasons, on Gluon candidates WGMMA_NCU_CONFIGS (default 0,5;
#                     M = 1024, 4096 x 4096) and on the activation pre-kernel (M = 1024, K = 14336 and 4096),
#                     where the machine has ncu
# act_lab     (260 s) the activation pre-kernel's launch plans (benchmarks/act_lab.py): per token at K = 4096, 14336 and
#                     M = 1, 16, 256, 1024, then groups of 32 at K = 4096; and the pre-kernel's GPU tests
# act_persist (90 s)  the pre-kernel's plans at K = 4096 (where the persistent whole-row plans apply), M = 256, 1024
# act_long    (100 s) the pre-kernel's GPU tests, then its default and whole-row plans at K = 4096, 14336 and
#                     M = 256, 1024, per token and groups of 32 with scale levels 16
# split_k     (150 s) the Gluon W4A4 kernel's split-K tests and integer-level tests (GPU; PDL on)
# split_pdl   (300 s) the W4A4 op with levels and its GEMM, split-K candidates + PDL off, then on (A/B)
# w4a4_f64    (100 s) the W4A4 op's float64 GPU tests (SPECQ_AUTOTUNE=0)
# w4a4_op     (180 s) the whole W4A4 op with scale levels (pre-kernel + Gluon integer GEMM) per token and groups
#                     of 32, the GEMM alone and bf16, at M = 256, 1024 on the 8B shapes
# wgmma_op    (100 s) the whole W4A4 op (pre-kernel in the wgmma K order + Gluon GEMM, the default on Hopper)
#                     and its pre-kernel against bf16 at M = 256, 1024
# wgmma_levels (420 s) the integer-level W4A4 kernels (scale levels 16; Gluon form switched on with
#                     SPECQ_W4A4_GLUON_LEVELS=1): their GPU tests (Gluon and Triton), each Gluon level candidate
#                     timed at 4096 x 4096, M = 1024 (wgmma_quick --levels), then all of them timed alone and as
#                     the whole op against the rescaling ones and bf16 at M = 256, 1024 on the 8B shapes
# e2e_levels  (400 s) the 8B-shape W4A4 draft step (and W4A16's) at batch 32, scale levels 0 and 16 (default recipe:
#                     activation groups of 32), inductor-compiled steps in CUDA graphs
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
run_step() {
  case $1 in
    gpu_tests) step gpu_tests 240 python -m pytest -q -x tests/test_triton_kernels.py -k gpu ;;
    kernels) step kernels 170 python benchmarks/kernels.py --kinds bf16,tinygemm,mxfp4,w4a16 --ms 1,2,4,8,16 \
      --out "$OUT/kernels_m1_16.md" --json "$OUT/kernels_m1_16.json"
      grep -E "^\| (tinygemm|mxfp4|w4a16) \| (1|4|16) " "$OUT/kernels_m1_16.md" ;;
    kernels_m12) step kernels_m12 60 python benchmarks/kernels.py --kinds bf16,tinygemm,mxfp4,w4a16 --ms 1,2 \
      --out "$OUT/kernels_m12.md" --json "$OUT/kernels_m12.json"
      grep -E "^\| (tinygemm|mxfp4|w4a16) \| " "$OUT/kernels_m12.md" ;;
    gemv_lab) step gemv_lab 110 python benchmarks/gemv_lab.py --kernels gemv,mma --ms 1,4 \
      --shapes 4096x4096,4096x28672,14336x4096 --out "$OUT/gemv_lab.md" --json "$OUT/gemv_lab.json" ;;
    e2e_8b) step e2e_8b 190 python benchmarks/e2e.py --model llama3-8b-shape --new-tokens 128 \
      --rows ar_bf16@inductor,ar_mxfp4@inductor --steps --steps-compile none \
      --step-shapes bf16:5,mxfp4:1,mxfp4:5,w4a16:1,w4a16:5,w4a4:1,round:mxfp4:bf16:4 --out "$OUT" --tag llama3_8b_shape_check
      grep -E "^\| (ar_|bf16|mxfp4|w4a16|round)" "$OUT"/e2e_llama3_8b_shape_check.md ;;
    w4a4_large) step w4a4_large 200 python benchmarks/kernels.py --kinds bf16,w4a4-gemm,w4a4/tok+h,w4a4/g32+h,w4a4-act --ms 256,1024 \
      --out "$OUT/kernels_w4a4_large.md" --json "$OUT/kernels_w4a4_large.json"
      grep -E "^\| (bf16|w4a4)" "$OUT/kernels_w4a4_large.md"
      python -c "import json, sys; [print(k, v) for k, v in json.load(open(sys.argv[1]))['meta']['tuned']['w4a4_matmul'].items()]" \
        "$OUT/kernels_w4a4_large.json" ;;
    w4a4_quick) step w4a4_quick 140 python benchmarks/kernels.py --kinds bf16,w4a4-gemm --shapes 4096x4096,14336x4096 \
      --ms 32,64,256,1024 --out "$OUT/kernels_w4a4_quick.md" --json "$OUT/kernels_w4a4_quick.json"
      grep -E "^\| (bf16|w4a4)" "$OUT/kernels_w4a4_quick.md"
      python -c "import json, sys; [print(k, v) for k, v in json.load(open(sys.argv[1]))['meta']['tuned']['w4a4_matmul'].items()]" \
        "$OUT/kernels_w4a4_quick.json" ;;
    wgmma) step wgmma_tests 150 python -m pytest -q -x tests/test_gluon_w4a4.py
      step act_paths 60 python -m pytest -q -x tests/test_triton_kernels.py -k "gpu and act_paths"
      step wgmma 200 python benchmarks/kernels.py --kinds bf16,w4a4-gemm,w4a4-wgmma --ms 256,1024 \
        --out "$OUT/kernels_wgmma.md" --json "$OUT/kernels_wgmma.json"
      grep -E "^\| (bf16|w4a4)" "$OUT/kernels_wgmma.md"
      python -c "import json, sys; [print(n, k, v) for n, d in json.load(open(sys.argv[1]))['meta']['tuned'].items() for k, v in d.items()]" \
        "$OUT/kernels_wgmma.json" ;;
    wgmma_tests) step wgmma_tests 150 python -m pytest -q -x tests/test_gluon_w4a4.py ;;
    wgmma_op) step wgmma_op 100 python benchmarks/kernels.py --kinds bf16,w4a4/tok+h,w4a4-act \
        --shapes 4096x4096,14336x4096 --ms 256,1024 --out "$OUT/kernels_wgmma_op.md" --json "$OUT/kernels_wgmma_op.json"
      grep -E "^\| (bf16|w4a4)" "$OUT/kernels_wgmma_op.md" ;;
    wgmma_ncu) NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
      if [ -z "$NCU" ]; then echo "== wgmma_ncu: no ncu on this machine"; return 0; fi
      step wgmma_ncu 120 "$NCU" --kernel-name regex:wgmma --launch-skip 1 --launch-count 2 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
        --section InstructionStats --section MemoryWorkloadAnalysis \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
        python benchmarks/wgmma_quick.py --launch-only 2 --configs ${WGMMA_NCU_CONFIGS:-0,5}
      grep -E "wgmma|Duration|Throughput|Issue Slots|Warp Cycles|Executed Ipc|Pipe" "$OUT/wgmma_ncu.log" | head -n 60
      # the stall reasons worth reading: those above 0.05 warps per issued instruction
      awk '/_wgmma/ {print} /issue_stalled/ && $NF + 0 > 0.05 {print "   ", $1, $NF}' "$OUT/wgmma_ncu.log" | head -n 60
      step act_ncu 60 "$NCU" --kernel-name regex:_act --launch-count 3 --section SpeedOfLight --section WarpStateStats \
        --section MemoryWorkloadAnalysis --section SchedulerStats python -c "import torch; from specq.kernels import triton_act as a
for k in (14336, 4096): a.quantize(torch.randn(1024, k, device='cuda', dtype=torch.bfloat16), 0, 128, order=128)
torch.cuda.synchronize()"
      grep -E "_act|Duration|Throughput|Issue Slots|Warp Cycles" "$OUT/act_ncu.log" | head -n 40 ;;
    act_lab) step act_tests 60 python -m pytest -q -x tests/test_triton_kernels.py -k "gpu and act_paths"
      step act_lab 150 python benchmarks/act_lab.py --ms 1,16,256,1024 --out "$OUT/act_lab.md" --json "$OUT/act_lab.json"
      step act_lab_g32 50 python benchmarks/act_lab.py --ks 4096 --ms 256,1024 --act-group 32 --had-block 64 --order 8 \
        --out "$OUT/act_lab_g32.md" --json "$OUT/act_lab_g32.json"
      grep -E "^\| " "$OUT/act_lab.md" "$OUT/act_lab_g32.md" | cut -d: -f2- | head -n 200 ;;
    act_persist) step act_persist 90 python benchmarks/act_lab.py --ks 4096 --ms 256,1024 \
        --out "$OUT/act_persist.md" --json "$OUT/act_persist.json"
      grep -E "^\| 4096 " "$OUT/act_persist.md" | sort -t'|' -k3,3n -k5,5n | awk -F'|' '{c[$3]++} c[$3] <= 6' ;;
    act_long) step act_long_tests 150 env SPECQ_AUTOTUNE=0 python -m pytest -q tests/test_triton_kernels.py \
        -k "gpu and (act_paths or act_levels or (float64 and w4a4))"
      local plans="default,rows,persistent r2 w8 st2 2/SM,persistent r1 w8 st3 2/SM,persistent r1 w8 st2 2/SM,loop r4 s16 w8 st2"
      step act_long 45 python benchmarks/act_lab.py --ks 4096,14336 --ms 256,1024 --only "$plans" \
        --out "$OUT/act_long.md" --json "$OUT/act_long.json"
      step act_long_g32 45 python benchmarks/act_lab.py --ks 4096,14336 --ms 256,1024 --act-group 32 --levels 16 \
        --only "$plans,chunks,persistent r1 w16 st2 1/SM" --out "$OUT/act_long_g32.md" --json "$OUT/act_long_g32.json"
      grep -hE "^\| (4096|14336) " "$OUT/act_long.md" "$OUT/act_long_g32.md" ;;
    w4a4_op) step w4a4_op 180 python benchmarks/kernels.py --kinds bf16,w4a4-wgmma-L16,w4a4/tok+h+L16,w4a4/g32+h+L16 \
        --ms 256,1024 --out "$OUT/kernels_w4a4_op.md" --json "$OUT/kernels_w4a4_op.json"
      grep -E "^\| (bf16|w4a4)" "$OUT/kernels_w4a4_op.md"
      python -c "import json, sys; [print(n, k, v) for n, d in json.load(open(sys.argv[1]))['meta']['tuned'].items() for k, v in d.items()]" \
        "$OUT/kernels_w4a4_op.json" ;;
    split_k) step split_k_tests 150 env SPECQ_PDL=1 python -m pytest -q tests/test_gluon_w4a4.py -k "gpu and (split or integer_level or op_runs)"
      grep -E "passed|failed|Error" "$OUT/split_k_tests.log" | tail -n 20 ;;
    split_pdl) for v in 0 1; do  # the W4A4 op and GEMM with levels, split-K candidates and PDL off / on (A/B, same machine)
        step split_pdl_$v 150 env SPECQ_W4A4_SPLIT=$v SPECQ_PDL=$v SPECQ_AUTOTUNE_CACHE=$OUT/autotune_$v python benchmarks/kernels.py \
          --kinds bf16,w4a4-wgmma-L16,w4a4/tok+h+L16,w4a4/g32+h+L16 --ms 256,1024 --out "$OUT/kernels_split_pdl_$v.md" \
          --json "$OUT/kernels_split_pdl_$v.json"
        grep -E "^\| (bf16|w4a4)" "$OUT/kernels_split_pdl_$v.md"
      done
      python -c "import json, sys; [print(n, k, v) for n, d in json.load(open(sys.argv[1]))['meta']['tuned'].items() for k, v in d.items()]" \
        "$OUT/kernels_split_pdl_1.json" ;;
    w4a4_f64) step w4a4_f64 100 env SPECQ_AUTOTUNE=0 python -m pytest -q tests/test_triton_kernels.py -k "gpu and float64 and w4a4" ;;
    wgmma_quick) step wgmma_quick 90 python benchmarks/wgmma_quick.py; tail -n 14 "$OUT/wgmma_quick.log" ;;
    wgmma_ws) step wgmma_ws_tests 120 python -m pytest -q -x tests/test_gluon_w4a4.py -k "gpu and ws1"
      step wgmma_ws_1024 90 python benchmarks/wgmma_quick.py --configs 5,7,8,9,10
      step wgmma_ws_256 90 python benchmarks/wgmma_quick.py --m 256 --configs 4,5,8,10
      grep -hE "^time|^  " "$OUT/wgmma_ws_1024.log" "$OUT/wgmma_ws_256.log" ;;
    wgmma_levels) export SPECQ_W4A4_GLUON_LEVELS=1
      step levels_tests 150 python -m pytest -q tests/test_gluon_w4a4.py tests/test_triton_kernels.py \
        -k "gpu and (integer_level or levels)"
      step levels_quick 90 python benchmarks/wgmma_quick.py --levels --configs 0,1,2,3,4,5
      grep -hE "^time|^  |WRONG" "$OUT/levels_quick.log"
      step levels_kernels 180 python benchmarks/kernels.py \
        --kinds bf16,w4a4-wgmma,w4a4-wgmma-L16,w4a4-gemm-L16,w4a4/tok+h,w4a4/tok+h+L16,w4a4/g32+h+L16 \
        --ms 256,1024 \
        --out "$OUT/kernels_levels.md" --json "$OUT/kernels_levels.json"
      grep -E "^\| (bf16|w4a4)" "$OUT/kernels_levels.md" ;;
    e2e_levels) for L in 0 16; do  # the 8B-shape W4A4 draft step at batch 32 (32 rows per linear), levels off / on
        # (row qspec only to build the W4A4 mode, random weights; --no-per-row: no per-row steps, ~45 s of compile each)
        step e2e_levels_$L 200 python benchmarks/e2e.py --model llama3-8b-shape --batch 32 --rows qspec --no-per-row \
          --new-tokens 4 --compile none --steps --steps-compile inductor --step-batches 32 \
          --step-shapes w4a16:1,w4a4:1 --recipe-set w4a4_scale_levels=$L --out "$OUT" --tag llama3_8b_shape_b32_levels$L
      done
      grep -hE "^\| (w4a16|w4a4) q" "$OUT"/e2e_llama3_8b_shape_b32_levels*.md ;;
    gpu_w4a4) step gpu_w4a4 240 python -m pytest -q -x tests/test_triton_kernels.py -k "gpu and (w4a4 or act)" ;;
    *) echo "unknown step '$1' (split_k split_pdl w4a4_f64 gpu_tests gpu_w4a4 wgmma wgmma_quick wgmma_ws wgmma_levels e2e_levels act_persist act_long w4a4_op wgmma_tests wgmma_op wgmma_ncu act_lab kernels kernels_m12 gemv_lab e2e_8b w4a4_large w4a4_quick)"; return 2 ;;
  esac
}
[ $# -eq 0 ] && set -- gpu_tests e2e_8b kernels_m12
for name in "$@"; do run_step "$name"; done
