"""CPU cost of the reference ops (docs/formats.md quotes it): dequantization vs the dtype's own GEMM.

    .venv/bin/python benchmarks/ops_cpu.py [--threads 1] [--iters 100]

Times (process CPU time per call, so other load on a shared machine matters less than with wall
time) of F.linear on the float weight, the three specq ops, the two dequantizers and the 64-block
Hadamard transform, for the default model's matrix shapes at M = 1 and 64 tokens.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from specq.formats import hadamard, int4, mxfp4
from specq.kernels import ops


def _cpu_us(f, iters: int) -> float:
    for _ in range(5):
        f()
    t = time.process_time()
    for _ in range(iters):
        f()
    return (time.process_time() - t) / iters * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); microseconds of CPU time per call")
    print(f"{'dtype':9s} {'N x K':10s} {'M':>3s} {'linear':>7s} {'mxfp4':>7s} {'w4a16':>7s} {'w4a4':>7s} "
          f"{'deq mx':>7s} {'deq i4':>7s} {'H64':>6s}")
    for dt in (torch.bfloat16, torch.float32):
        for n, k in [(576, 576), (1536, 576), (576, 1536)]:
            w = (torch.randn(n, k) * 0.05).to(dt)
            pm, sm = mxfp4.quantize(w)
            pi, si = int4.quantize(w, 64)
            for m in (1, 64):
                x = torch.randn(m, k).to(dt)
                r = [_cpu_us(f, args.iters) for f in (
                    lambda: F.linear(x, w),
                    lambda: ops.linear_mxfp4(x, pm, sm),
                    lambda: ops.linear_w4a16(x, pi, si, had_block=64),
                    lambda: ops.linear_w4a4(x, pi, si, act_group_size=32, had_block=64),
                    lambda: mxfp4.dequantize(pm, sm, dt),
                    lambda: int4.dequantize(pi, si, dt),
                    lambda: hadamard.hadamard_transform(x, 64))]
                print(f"{str(dt)[6:]:9s} {f'{n}x{k}':10s} {m:3d} " + " ".join(f"{v:7.0f}" for v in r[:6])
                      + f" {r[6]:6.0f}")


if __name__ == "__main__":
    main()
