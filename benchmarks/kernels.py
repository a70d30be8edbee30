"""Kernel benchmark: specq's 4-bit matmuls against bf16 F.linear and torch's int4 tinygemm (GPU).

    python benchmarks/kernels.py --out benchmarks/results/kernels_h100.md

For K x N in {4096x4096, 4096x14336, 14336x4096} and M in {1, 2, 4, 8, 16, 32, 64, 256, 1024}
it times (median, CUDA-graph replays, so launch overhead is what a captured decode step sees):

- ``bf16``       torch.nn.functional.linear with bf16 weights (cuBLAS)
- ``dense``      torch.ops.specq.linear_dense, the same bf16 weights: specq's weight-streaming GEMV at
                 M <= 4 where it timed faster than cuBLAS for the shape, else F.linear
- ``tinygemm``   torch.ops.aten._weight_int4pack_mm, group 128 (gpt-fast's int4 path)
- ``mxfp4``      torch.ops.specq.linear_mxfp4
- ``w4a16``      torch.ops.specq.linear_w4a16, group 128, no rotation
- ``w4a16+h``    the same with had_block=128 (includes the rotation pre-kernel)
- ``w4a4/tok+h`` torch.ops.specq.linear_w4a4, group 128, per-token INT4 activations, had_block=128
- ``w4a4/g32+h`` the same with activation groups of 32
- ``w4a4-gemm``  the W4A4 INT8-tensor-core kernel alone, on activations quantized beforehand
                 (per token), to separate it from the rotation + quantization pre-kernels
- ``w4a4-wgmma`` the same for the pipelined Gluon kernel (``gluon_w4a4``, Hopper, M > 128), which the op
                 runs there instead of the Triton one
- ``w4a4/tok+h+L16``  ``w4a4/tok+h`` with scale levels 16 (the group scales snapped to integer multiples
                 of a per-row unit, ``int4.snap_scales``): the integer-level kernels, no rescale per group
                 (on Hopper the Gluon form only with SPECQ_W4A4_GLUON_LEVELS=1)
- ``w4a4/g32+h+L16``  ``w4a4/g32+h`` with scale levels 16 (activation groups snapped to a per-token unit
                 too, so the same integer GEMM serves)
- ``w4a4-gemm-L16``, ``w4a4-wgmma-L16``  the integer-level forms of the two GEMMs alone
- ``w4a4-act``   those pre-kernels alone (Hadamard 128 + per-token INT4 codes; bytes: x read, codes
                 written; the TFLOP/s column counts the matmul it feeds)

Bytes counted (one pass, the convention of the copy measurement, which counts read + write): packed
weights + scales + activations read + output written. The copy bandwidth and the bf16 matmul rate
are measured at the start on the same GPU. Weights are rotated among enough copies to exceed L2
several times, so a GEMV cannot be served from cache. Inputs are random (never zeros).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
MS = [1, 2, 4, 8, 16, 32, 64, 256, 1024]
L2_FLUSH_BYTES = 256 << 20  # rotate weight copies until this many bytes separate two uses of one copy


def _bench(fn, reps: int) -> float:
    """Median seconds of one call of ``fn`` (which runs ``reps`` calls) from CUDA-graph replays."""
    from triton.testing import do_bench_cudagraph

    fn()  # compile / autotune outside the capture
    torch.cuda.synchronize()
    ms = do_bench_cudagraph(fn, rep=50, return_mode="median")
    return ms * 1e-3 / reps


def measure_copy_bandwidth() -> float:
    n = 1 << 28  # 1 GiB of fp32
    a = torch.randn(n // 4, device="cuda").repeat(4)
    b = torch.empty_like(a)
    from triton.testing import do_bench

    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    del a, b
    return 2 * n * 4 / (ms * 1e-3)


def measure_bf16_rate() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    from triton.testing import do_bench

    ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    return 2 * n ** 3 / (ms * 1e-3)


def _tinygemm_weights(n: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weights in tinygemm's packed layout (values are irrelevant to its speed)."""
    raw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
    packed = torch.ops.aten._convert_weight_to_int4pack(raw, 8)
    sz = torch.randn(k // 128, n, 2, device=device, dtype=torch.bfloat16) * 0.01
    return packed, sz


def make_weights(kind: str, n: int, k: int, device):
    """One copy of the weights for ``kind`` plus its size in bytes."""
    from specq.formats import int4, mxfp4

    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    if kind in ("bf16", "dense"):
        return (w,), w.numel() * 2
    if kind == "tinygemm":
        p, sz = _tinygemm_weights(n, k, device)
        return (p, sz), p.numel() * p.element_size() + sz.numel() * 2
    if kind == "mxfp4":
        p, s = mxfp4.quantize(w)
        return (p, s), p.numel() + s.numel()
    p, s = int4.quantize(w, 128)
    if kind == "int4-levels":  # the packed weights, uint8 scale levels and fp32 units the level GEMMs read
        lv, unit = int4.snap_scales(s, 16)
        return (p, lv, unit), p.numel() * 4 + lv.numel() + unit.numel() * 4
    return (p, s), p.numel() * 4 + s.numel() * s.element_size()


def call(kind: str, x: torch.Tensor, wts: tuple):
    if kind == "bf16":
        return F.linear(x, wts[0])
    if kind == "dense":  # specq's dense op: its GEMV at <= 4 rows where faster, else F.linear
        return torch.ops.specq.linear_dense(x, wts[0], None)
    if kind == "tinygemm":
        return torch.ops.aten._weight_int4pack_mm(x, wts[0], 128, wts[1])
    if kind == "mxfp4":
        return torch.ops.specq.linear_mxfp4(x, wts[0], wts[1], None)
    if kind == "w4a16":
        return torch.ops.specq.linear_w4a16(x, wts[0], wts[1], None, 128, 0)
    if kind == "w4a16+h":
        return torch.ops.specq.linear_w4a16(x, wts[0], wts[1], None, 128, 128)
    if kind == "w4a4/tok+h":
        return torch.ops.specq.linear_w4a4(x, wts[0], wts[1], None, 128, 0, 128)
    if kind == "w4a4/g32+h":
        return torch.ops.specq.linear_w4a4(x, wts[0], wts[1], None, 128, 32, 128)
    if kind == "w4a4/tok+h+L16":
        return torch.ops.specq.linear_w4a4(x, wts[0], wts[1], None, 128, 0, 128, 16)
    if kind == "w4a4/g32+h+L16":
        return torch.ops.specq.linear_w4a4(x, wts[0], wts[1], None, 128, 32, 128, 16)
    if kind == "w4a4-act":
        from specq.kernels import triton_act

        return triton_act.quantize(x, 0, 128)
    if kind == "w4a4-gemm":
        from specq.kernels import triton_w4a4

        q, sx = x  # pre-quantized activations (see run())
        return triton_w4a4.w4a4_matmul(q, sx, wts[0], wts[1], None, 128, 0, torch.bfloat16)
    if kind == "w4a4-wgmma":
        from specq.kernels import gluon_w4a4

        q, sx = x
        return gluon_w4a4.w4a4_matmul(q, sx, wts[0], wts[1], None, 128, torch.bfloat16)
    if kind == "w4a4-gemm-L16":
        from specq.kernels import triton_w4a4

        q, sx = x
        return triton_w4a4.w4a4_matmul(q, sx, wts[0], wts[1], None, 128, 0, torch.bfloat16, units=wts[2])
    if kind == "w4a4-wgmma-L16":
        from specq.kernels import gluon_w4a4

        q, sx = x
        return gluon_w4a4.w4a4_matmul(q, sx, wts[0], wts[1], None, 128, torch.bfloat16, units=wts[2])
    raise ValueError(kind)


KINDS = ["bf16", "dense", "tinygemm", "mxfp4", "w4a16", "w4a16+h", "w4a4/tok+h", "w4a4/g32+h", "w4a4/tok+h+L16",
         "w4a4/g32+h+L16", "w4a4-gemm", "w4a4-wgmma", "w4a4-gemm-L16", "w4a4-wgmma-L16", "w4a4-act"]
PRE_QUANTIZED = ("w4a4-gemm", "w4a4-wgmma", "w4a4-gemm-L16", "w4a4-wgmma-L16")  # GEMMs timed on ready codes


def tuned_configs() -> dict:
    """The autotuner's pick per key of the specq Triton kernels timed so far (for reading the tables)."""
    from specq.kernels import gluon_w4a4, triton_w4a4, triton_wq

    return {cache.name: {str(key): dict(cfg.meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                         for key, cfg in cache.best.items()}
            for cache in (triton_w4a4._CACHE, gluon_w4a4._CACHE, triton_wq._CACHE)}


def run(shapes, ms, kinds, copy_bw, bf16_rate, log=print):
    dev = torch.device("cuda")
    rows = []
    for k, n in shapes:
        for kind in kinds:
            wkind = ("int4-levels" if kind.endswith("-L16") else "int4") if kind.startswith("w4") else kind
            one, nbytes = make_weights(wkind, n, k, dev)
            copies = max(1, min(64, math.ceil(L2_FLUSH_BYTES / nbytes)))
            wsets = [one] + [make_weights(wkind, n, k, dev)[0] for _ in range(copies - 1)]
            for m in ms:
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                if kind in PRE_QUANTIZED:
                    from specq.formats import activation
                    from specq.kernels import triton_w4a4

                    q, sx = activation.quantize_int4(x, 0)
                    order = triton_w4a4.ORDER_WGMMA if "wgmma" in kind else triton_w4a4.ORDER_WORDS
                    x = (triton_w4a4.to_k_order(q, order).contiguous(), sx.reshape(m, 1).contiguous())
                try:
                    def fn():
                        for ws in wsets:
                            call(kind, x, ws)
                    t = _bench(fn, len(wsets))
                except Exception as e:  # report, keep going (e.g. tinygemm missing on this build)
                    log(f"  {kind} K={k} N={n} M={m}: FAILED {type(e).__name__}: {str(e)[:200]}")
                    continue
                if kind == "w4a4-act":  # x read, codes written (the scales are negligible)
                    moved = m * k * 3
                else:
                    moved = nbytes + m * k * (1 if kind in PRE_QUANTIZED else 2) + m * n * 2
                row = dict(kind=kind, K=k, N=n, M=m, us=t * 1e6, GBps=moved / t / 1e9,
                           pct_bw=100 * moved / t / copy_bw, TFLOPs=2 * m * n * k / t / 1e12,
                           pct_mm=100 * 2 * m * n * k / t / bf16_rate, weight_bytes=nbytes)
                rows.append(row)
                log(f"  {kind:11s} K={k:5d} N={n:5d} M={m:4d}: {row['us']:8.2f} us  {row['GBps']:7.0f} GB/s "
                    f"({row['pct_bw']:5.1f}% copy)  {row['TFLOPs']:6.1f} TFLOP/s ({row['pct_mm']:5.1f}% bf16 mm)")
            del wsets, one
            torch.cuda.empty_cache()
    return rows


def goal_summary(by: dict) -> str:
    """The issue's goals, checked against the measured rows (computed, never hand-written)."""
    out = ["## Goals (issue 6) against these measurements", "",
           "| shape | goal | measured | met |", "|---|---|---|---|"]
    measured = sorted({key[3] for key in by})  # the M values of this run (--ms)
    for k, n in sorted({(key[1], key[2]) for key in by}):
        for kind in ("mxfp4", "w4a16"):
            pct = [by[(kind, k, n, m)]["pct_bw"] for m in measured if m <= 16 and (kind, k, n, m) in by]
            if pct:
                out.append(f"| {k}x{n} | {kind} M<=16 at >= 80% of copy BW | {min(pct):.0f}..{max(pct):.0f}% | "
                           f"{'yes' if min(pct) >= 80 else 'no'} |")
            sp = [(m, by[("tinygemm", k, n, m)]["us"] / by[(kind, k, n, m)]["us"]) for m in measured
                  if m <= 64 and (kind, k, n, m) in by and ("tinygemm", k, n, m) in by]
            if sp:
                slow = [f"M={m} ({v:.2f}x)" for m, v in sp if v < 1]
                out.append(f"| {k}x{n} | {kind} faster than tinygemm at every M<=64 | "
                           f"{'slower at ' + ', '.join(slow) if slow else 'all faster'} | {'no' if slow else 'yes'} |")
        for kind in ("w4a4/tok+h", "w4a4/g32+h", "w4a4/tok+h+L16", "w4a4/g32+h+L16"):
            sp = [(m, by[("bf16", k, n, m)]["us"] / by[(kind, k, n, m)]["us"]) for m in measured
                  if m >= 256 and (kind, k, n, m) in by and ("bf16", k, n, m) in by]
            if sp:
                out.append(f"| {k}x{n} | {kind} M>=256 >= 1.5x faster than bf16 | "
                           + ", ".join(f"M={m}: {v:.2f}x" for m, v in sp)
                           + f" | {'yes' if min(v for _, v in sp) >= 1.5 else 'no'} |")
    return "\n".join(out)


def to_markdown(rows, meta) -> str:
    lines = [f"# specq kernel benchmark ({meta['device']})", "",
             f"- date: {meta['date']}", f"- command: `{meta['command']}`",
             f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}",
             f"- measured copy bandwidth (read + write): {meta['copy_bw'] / 1e12:.2f} TB/s; "
             f"bf16 8192^3 matmul: {meta['bf16_rate'] / 1e12:.0f} TFLOP/s",
             "- time: median of CUDA-graph replays; weights rotated over copies > 256 MiB (no L2 reuse); "
             "random bf16 activations; group 128 for INT4; `+h` = Hadamard rotation of x (block 128) included",
             "- bytes = packed weights + scales + x read + y written; %copy = achieved / measured copy bandwidth",
             "- `vs bf16` and `vs tinygemm` = their time / this time (> 1: faster)", ""]
    by = {(r["kind"], r["K"], r["N"], r["M"]): r for r in rows}
    lines += goal_summary(by), ""
    for k, n in sorted({(r["K"], r["N"]) for r in rows}, key=lambda s: SHAPES.index(s) if s in SHAPES else 9):
        lines += [f"## K={k}, N={n}", "",
                  "| kernel | M | time (us) | GB/s | % copy BW | TFLOP/s | % bf16 mm | vs bf16 | vs tinygemm |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for kind in KINDS:
            for m in sorted({r["M"] for r in rows}):  # the measured rows (--ms may differ from MS)
                r = by.get((kind, k, n, m))
                if r is None:
                    continue
                b = by.get(("bf16", k, n, m))
                tg = by.get(("tinygemm", k, n, m))
                vb = f"{b['us'] / r['us']:.2f}x" if b else "-"
                vt = f"{tg['us'] / r['us']:.2f}x" if tg else "-"
                lines.append(f"| {kind} | {m} | {r['us']:.2f} | {r['GBps']:.0f} | {r['pct_bw']:.1f} | "
                             f"{r['TFLOPs']:.1f} | {r['pct_mm']:.1f} | {vb} | {vt} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the markdown table here (temp file + rename)")
    ap.add_argument("--json", help="write the raw rows here")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN,KxN,...")
    ap.add_argument("--kinds", default=",".join(KINDS))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import triton

    import specq.kernels.ops  # noqa: F401  (registers the ops and their Triton kernels)

    torch.manual_seed(0)
    t0 = time.time()
    copy_bw = measure_copy_bandwidth()
    bf16_rate = measure_bf16_rate()
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write), bf16 matmul {bf16_rate / 1e12:.0f} TFLOP/s")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    meta = dict(device=torch.cuda.get_device_name(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="python benchmarks/kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                copy_bw=copy_bw, bf16_rate=bf16_rate, host=platform.node())
    rows = []
    for shape in shapes:  # tables are rewritten after each shape, so a cut-off run keeps what it measured
        rows += run([shape], ms, args.kinds.split(","), copy_bw, bf16_rate)
        meta["seconds"] = time.time() - t0
        meta["tuned"] = tuned_configs()
        md = to_markdown(rows, meta)
        for path, text in ((args.out, md), (args.json, json.dumps(dict(meta=meta, rows=rows), indent=1))):
            if path:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                tmp = path + ".tmp"
                with open(tmp, "w") as f:
                    f.write(text + "\n")
                os.replace(tmp, path)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
