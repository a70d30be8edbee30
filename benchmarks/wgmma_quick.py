"""A quick check of the Gluon W4A4 GEMM (gluon_w4a4) on a Hopper GPU, for short device calls: correctness of
a few candidates on ragged shapes against float64 and the Triton kernel, then the time of each candidate
against bf16 F.linear and the Triton kernel's usual winner at one size, each as a CUDA-graph replay (timed
eagerly, the Gluon launch's host time, ~15 us more than the Triton kernel's, showed up as GPU time: 58 us
where the graph replays took 42, H100 2026-12-07). Prints as it goes.

    python benchmarks/wgmma_quick.py [--m 1024] [--k 4096] [--n 4096] [--configs 2,3,5,6,7]
    python benchmarks/wgmma_quick.py --launch-only 3   # three launches per candidate, nothing else (for ncu)
    python benchmarks/wgmma_quick.py --levels --configs 0,1,2,3,4,5   # the integer-level form's candidates
                                                                     # (gluon_w4a4._level_candidates; scale levels 16)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _inputs(m, k, n, seed=0, device="cuda", levels=False):
    """(codes in the Gluon and the Triton K order, per-token scales, packed weights, their scales, x, float64
    reference, units): with ``levels``, the scales are uint8 scale levels (16) and ``units`` their row units."""
    from specq.formats import activation, int4
    from specq.kernels import triton_w4a4

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen) * 0.05
    p, s = int4.quantize(w.bfloat16(), 128)
    q, sx = activation.quantize_int4(x, 0)
    sx = sx.reshape(m, 1).float()
    units = None
    if levels:
        ref = (q.double() * sx.double()) @ int4.dequantize(p, int4.snapped_scales(s, 16).double()).T
        s, units = int4.snap_scales(s, 16)
        units = units.to(device)
    else:
        ref = (q.double() * sx.double()) @ int4.dequantize(p, s, torch.float64).T
    dev = lambda t: t.to(device)  # noqa: E731
    return (dev(triton_w4a4.to_wgmma_order(q).contiguous()), dev(triton_w4a4.to_word_order(q).contiguous()),
            dev(sx), dev(p), dev(s), x.to(device), ref, units)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--configs", default="2,3,5,6,7")
    ap.add_argument("--launch-only", type=int, default=0, metavar="N",
                    help="only launch each candidate N times at --m/--k/--n (for a profiler)")
    ap.add_argument("--levels", action="store_true",
                    help="the integer-level form (scale levels 16): --configs index its level candidates")
    args = ap.parse_args(argv)
    import triton.testing

    from specq.kernels import gluon_w4a4 as g
    from specq.kernels import triton_w4a4
    from specq.kernels.triton_common import Config

    cands = g._level_candidates() if args.levels else g._candidates()
    picks = [int(i) for i in args.configs.split(",")]
    if args.launch_only:
        qg, _, sx, p, s, _, _, units = _inputs(args.m, args.k, args.n, levels=args.levels)
        out = torch.empty(args.m, args.n, dtype=torch.bfloat16, device="cuda")
        for i in picks:
            for _ in range(args.launch_only):
                g.launch_wgmma(cands[i], qg, sx, p, s, sx, out, False, 128, units)
        torch.cuda.synchronize()
        return 0
    for m, k, n in ((300, 1024, 200), (520, 2048, 520)):
        qg, qw, sx, p, s, _, ref, units = _inputs(m, k, n, seed=m, levels=args.levels)
        tri = triton_w4a4.w4a4_matmul(qw, sx, p, s, None, 128, 0, torch.bfloat16, units=units)
        for i in picks:
            out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            g.launch_wgmma(cands[i], qg, sx, p, s, sx, out, False, 128, units)
            rel = ((out.double().cpu() - ref).norm() / ref.norm()).item()
            same = (out.float() - tri.float()).abs().max().item()
            print(f"correct {m}x{k}x{n} cfg{i} {dict(cands[i].meta)} w{cands[i].num_warps}: rel {rel:.2e} "
                  f"max|gluon - triton| {same:.3g} {'OK' if rel < 1e-2 else 'WRONG'}", flush=True)
    m, k, n = args.m, args.k, args.n
    qg, qw, sx, p, s, x, _, units = _inputs(m, k, n, levels=args.levels)
    wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)

    def bench(fn):
        fn()  # compile and warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return triton.testing.do_bench(graph.replay, warmup=10, rep=50, return_mode="median") * 1e3

    t_bf16 = bench(lambda: torch.nn.functional.linear(x, wb))
    print(f"time M={m} K={k} N={n}: bf16 {t_bf16:.2f} us", flush=True)
    # the Triton kernel's winner at these sizes (H100, 2026-12-07): 64 x 128 SWAP tiles, 4 warps
    tcfg = Config.make(num_warps=4, num_stages=4, BLOCK_M=128, BLOCK_N=64, SUB_K=128, N_SUB=1, GROUP_M=8, SWAP=1,
                       SPLIT_K=1)
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    t_tri = bench(lambda: triton_w4a4.launch_w4a4(tcfg, qw, sx, p, s, sx, out, False, 128, 0, units))
    print(f"  triton w4a4{' (levels)' if args.levels else ''} {t_tri:.2f} us ({t_bf16 / t_tri:.2f}x bf16)", flush=True)
    for i in picks:
        t = bench(lambda: g.launch_wgmma(cands[i], qg, sx, p, s, sx, out, False, 128, units))
        print(f"  gluon cfg{i} {dict(cands[i].meta)} w{cands[i].num_warps}: {t:.2f} us ({t_bf16 / t:.2f}x bf16)",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
