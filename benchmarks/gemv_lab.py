"""The 4-bit GEMV (M <= 4) on the GPU: every launch configuration next to a read floor.

    python benchmarks/gemv_lab.py --out benchmarks/results/gemv_lab_h100.md --json ...json
    ncu --section ... python benchmarks/gemv_lab.py --profile lab.json   # the winners, a few eager launches

For each weight shape of a Llama-3-8B decode step (fused q/k/v and gate/up, as the compiled steps run
them) and the issue's shapes, MXFP4 and INT4 (group 128), M in --ms, it times every candidate of
``triton_gemv.candidates`` with the method of benchmarks/kernels.py (CUDA-graph replays, weight copies
rotated past L2) and reports the best next to a read floor: a Triton kernel that only streams the same
number of bytes (16-byte loads, a persistent grid, one sum per program), the fastest any kernel reading
these weights once can be at this size on this GPU. ``%copy`` is against the 1 GiB copy bandwidth, as
in benchmarks/kernels.py.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import kernels as kb  # noqa: E402  (benchmarks/kernels.py)

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 14336)]
FMTS = {"mxfp4": (0, 32), "int4": (1, 128)}


@triton.jit
def _stream_read(ptr, n, out, BLOCK: tl.constexpr):
    """Read n int32 words once (grid-stride, 16-byte loads) and write one sum per program."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    offs = tl.arange(0, BLOCK)
    for start in range(pid * BLOCK, n, nprog * BLOCK):
        acc += tl.load(ptr + start + offs, mask=start + offs < n, other=0)
    tl.store(out + pid, tl.sum(acc, 0))


def read_floor(nbytes: int, sms: int) -> tuple[float, str]:
    """Fastest time to stream ``nbytes`` once (rotated copies), over a few grid/block/warp choices."""
    n = nbytes // 4
    copies = max(1, min(64, math.ceil(kb.L2_FLUSH_BYTES / nbytes)))
    bufs = [torch.randint(-2 ** 31, 2 ** 31 - 1, (n,), dtype=torch.int32, device="cuda") for _ in range(copies)]
    best = (float("inf"), "")
    for block, warps in ((1024, 4), (2048, 8), (4096, 8)):
        for per_sm in (2, 4, 8):
            grid = sms * per_sm
            out = torch.empty(grid, dtype=torch.int32, device="cuda")

            def fn():
                for b in bufs:
                    _stream_read[(grid,)](b, n, out, BLOCK=block, num_warps=warps)
            t = kb._bench(fn, len(bufs))
            best = min(best, (t, f"BLOCK={block} warps={warps} {per_sm}/SM"))
    return best


def kernel_module(name: str):
    """The kernel under test: ``gemv`` (CUDA cores, M <= 4) or ``mma`` (tensor cores, M <= 16)."""
    from specq.kernels import triton_gemv, triton_mma_gemv
    return {"gemv": triton_gemv, "mma": triton_mma_gemv}[name]


def time_configs(fname: str, k: int, n: int, m: int, log, kernel: str = "gemv") -> tuple[list[dict], int]:
    """Every candidate config of ``kernel`` for format ``fname`` at M = m, and the weights' bytes."""
    mod = kernel_module(kernel)
    fmt, group = FMTS[fname]
    (p, s), nbytes = kb.make_weights(fname, n, k, "cuda")
    copies = max(1, min(64, math.ceil(kb.L2_FLUSH_BYTES / nbytes)))
    wsets = [(p, s)] + [kb.make_weights(fname, n, k, "cuda")[0] for _ in range(copies - 1)]
    wsets = [(w.view(torch.int32) if fmt == 0 else w, sc) for w, sc in wsets]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    rows = []
    for cfg in (mod.candidates(k, fmt) if kernel == "mma" else mod.candidates(k)):
        def fn(cfg=cfg):
            for w, sc in wsets:
                mod.gemv(x, w, sc, None, fmt, group, config=cfg, out=y)
        try:
            t = kb._bench(fn, len(wsets))
        except Exception as e:  # noqa: BLE001  a config that does not compile: report and go on
            log(f"    {cfg}: FAILED {type(e).__name__}: {str(e)[:120]}")
            continue
        moved = nbytes + m * k * 2 + m * n * 2
        rows.append(dict(cfg=dict(cfg.meta), warps=cfg.num_warps, us=t * 1e6, bytes=moved))
    return rows, nbytes


def profile(path: str, shapes: set) -> None:
    """A few eager launches of each (shape in ``shapes``, format, M = 1) winner, for ncu."""
    from specq.kernels.triton_common import Config

    res = json.load(open(path))
    for r in res["rows"]:
        if r["M"] != 1 or (r["K"], r["N"]) not in shapes:
            continue
        fmt, group = FMTS[r["fmt"]]
        (p, s), _ = kb.make_weights(r["fmt"], r["N"], r["K"], "cuda")
        w = p.view(torch.int32) if fmt == 0 else p
        x = torch.randn(1, r["K"], device="cuda", dtype=torch.bfloat16)
        c = r["best"]
        cfg = Config.make(num_warps=c["warps"], num_stages=1, **c["cfg"])
        print(f"profile {r.get('kernel', 'gemv')} {r['fmt']} {r['K']}x{r['N']} {cfg}", flush=True)
        for _ in range(2):
            kernel_module(r.get("kernel", "gemv")).gemv(x, w, s, None, fmt, group, config=cfg)
    torch.cuda.synchronize()


def to_markdown(rows, meta) -> str:
    out = [f"# 4-bit GEMV lab ({meta['device']})", "", f"- date: {meta['date']}", f"- command: `{meta['command']}`",
           f"- torch {meta['torch']}, triton {meta['triton']}; copy bandwidth (1 GiB, read + write) "
           f"{meta['copy_bw'] / 1e12:.2f} TB/s",
           "- time: median of CUDA-graph replays, weight copies rotated past L2; bytes = packed weights + scales "
           "+ x + y; `read floor` = a kernel that only streams the same bytes", "",
           "| shape KxN | fmt | M | kernel | time (us) | %copy | config | read floor (us) | %copy | floor / time |",
           "|---|---|---:|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        c, fl = r["best"], r["floor_us"]
        out.append(f"| {r['K']}x{r['N']} | {r['fmt']} | {r['M']} | {r.get('kernel', 'gemv')} | {c['us']:.2f} | "
                   f"{100 * c['bytes'] / (c['us'] * 1e-6) / meta['copy_bw']:.1f} | "
                   + " ".join(f"{k}={v}" for k, v in c["cfg"].items()) + f" w{c['warps']} | {fl:.2f} | "
                   f"{100 * r['weight_bytes'] / (fl * 1e-6) / meta['copy_bw']:.1f} | {fl / c['us']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--json")
    ap.add_argument("--ms", default="1,4")
    ap.add_argument("--fmts", default="mxfp4,int4")
    ap.add_argument("--kernels", default="gemv", help="gemv (CUDA cores, M <= 4), mma (tensor cores, M <= 16)")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--profile", help="lab JSON: launch its M = 1 winners a few times (for ncu)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gemv_lab.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.profile:
        profile(args.profile, {tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")})
        return 0
    torch.manual_seed(0)
    copy_bw = kb.measure_copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    meta = dict(device=torch.cuda.get_device_name(), copy_bw=copy_bw, torch=torch.__version__,
                triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="python benchmarks/gemv_lab.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s, {sms} SMs", flush=True)
    rows, floors = [], {}
    t0 = time.time()
    # M outermost: a run cut short still has every shape at the first M
    for m in (int(v) for v in args.ms.split(",")):
        for shape in args.shapes.split(","):
            k, n = (int(v) for v in shape.split("x"))
            for fname, kernel in itertools.product(args.fmts.split(","), args.kernels.split(",")):
                if m > kernel_module(kernel).MAX_ROWS:
                    continue
                timed, nbytes = time_configs(fname, k, n, m, print, kernel)
                torch.cuda.empty_cache()  # the weight copies of this shape
                if not timed:
                    continue
                if nbytes not in floors:
                    floors[nbytes] = read_floor(nbytes, sms)
                r = dict(K=k, N=n, fmt=fname, M=m, kernel=kernel, weight_bytes=nbytes,
                         floor_us=floors[nbytes][0] * 1e6, floor_cfg=floors[nbytes][1],
                         best=min(timed, key=lambda c: c["us"]), all=timed)
                rows.append(r)
                print(f"{k}x{n} {fname} M={m} {kernel}: {r['best']['us']:.2f} us, floor {r['floor_us']:.2f} us "
                      f"({time.time() - t0:.0f} s)", flush=True)
                md = to_markdown(rows, meta)
                for path, text in ((args.out, md), (args.json, json.dumps(dict(meta=meta, rows=rows), indent=1))):
                    if path:
                        tmp = path + ".tmp"
                        with open(tmp, "w") as f:
                            f.write(text + "\n")
                        os.replace(tmp, path)
    print(to_markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
