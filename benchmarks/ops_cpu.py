"""CPU cost of the specq ops (docs/formats.md quotes it): 4-bit kernels, references, the dtype's own GEMM.

    .venv/bin/python benchmarks/ops_cpu.py [--threads 1] [--iters 100] [--wall] [--markdown]

Per call, for the default model's matmul shapes (INT4 group of the default recipe) at M = 1, 5 and
64 tokens: F.linear on the dense weight (what the cached-dequantization reference costs), the three
specq ops as dispatched (bf16/fp16 INT4 ops on the CPU run aten's int4pack kernel, cpu_int4.py),
w4a16 with that kernel switched off (SPECQ_INT4_CPU=0: the reference), the int4pack matmul alone,
the two dequantizers and the 64-block Hadamard transform. "w4a4" is W4A4 with the stored scales, "w4a4 L16" with
16 scale levels (the default recipe's since 2026-12-08): the snapping of activation groups to a per-token unit. Times are process CPU time (other load on a
shared machine matters less than with wall time; with several threads it sums them), or with --wall
the median wall time of the calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from specq.formats import hadamard, int4, mxfp4
from specq.kernels import cpu_int4, ops

# (N, K, INT4 group of the default recipe): q/o_proj, k/v_proj, gate/up_proj, down_proj
SHAPES = [(576, 576, 64), (192, 576, 64), (1536, 576, 64), (576, 1536, 128)]
COLUMNS = ("linear", "mxfp4", "w4a16", "w4a4", "w4a4 L16", "w4a16 ref", "int4mm", "deq mx", "deq i4", "H64")


def _time_us(f, iters: int, wall: bool) -> float:
    for _ in range(5):
        f()
    if wall:
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e6
    t = time.process_time()
    for _ in range(iters):
        f()
    return (time.process_time() - t) / iters * 1e6


def _reference_w4a16(x, p, s, g):
    os.environ["SPECQ_INT4_CPU"] = "0"
    try:
        return ops.linear_w4a16(x, p, s, None, g, 64)
    finally:
        del os.environ["SPECQ_INT4_CPU"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--wall", action="store_true", help="median wall time instead of process CPU time")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    how = "median wall" if args.wall else "CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); microseconds of {how} time per call; "
          f"int4pack kernel {'on' if cpu_int4.enabled() else 'unavailable'}")
    if args.markdown:
        print("| dtype | N x K (group) | M | " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * (len(COLUMNS) + 3))
    else:
        print(f"{'dtype':9s} {'N x K (g)':15s} {'M':>3s} " + " ".join(f"{c:>9s}" for c in COLUMNS))
    torch.manual_seed(0)
    for dt in (getattr(torch, d) for d in args.dtypes.split(",")):
        for n, k, g in SHAPES:
            w = (torch.randn(n, k) * 0.05).to(dt)
            pm, sm = mxfp4.quantize(w)
            pi, si = int4.quantize(w, g)
            for m in (1, 5, 64):
                x = torch.randn(m, k).to(dt)
                fns = [
                    lambda: F.linear(x, w),
                    lambda: ops.linear_mxfp4(x, pm, sm),
                    lambda: ops.linear_w4a16(x, pi, si, had_block=64),
                    lambda: ops.linear_w4a4(x, pi, si, act_group_size=32, had_block=64),
                    lambda: ops.linear_w4a4(x, pi, si, act_group_size=32, had_block=64, scale_levels=16),
                    lambda: _reference_w4a16(x, pi, si, g),
                    (lambda: cpu_int4.int4_matmul(x, pi, si, None, g)) if cpu_int4.usable(x, pi, si, g) else None,
                    lambda: mxfp4.dequantize(pm, sm, dt),
                    lambda: int4.dequantize(pi, si, dt),
                    lambda: hadamard.hadamard_transform(x, 64)]
                r = [_time_us(f, args.iters, args.wall) if f is not None else None for f in fns]
                cells = ["-" if v is None else f"{v:.0f}" for v in r]
                label = f"{n}x{k} ({g})"
                if args.markdown:
                    print(f"| {str(dt)[6:]} | {label} | {m} | " + " | ".join(cells) + " |")
                else:
                    print(f"{str(dt)[6:]:9s} {label:15s} {m:3d} " + " ".join(f"{c:>9s}" for c in cells))


if __name__ == "__main__":
    main()
