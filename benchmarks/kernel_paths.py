"""Which 4-bit weight-only kernel to use at each small M: the CUDA-core GEMV, the tensor-core GEMV or the
tiled tensor-core kernel (GPU).

    python benchmarks/kernel_paths.py --out benchmarks/results/kernel_paths_h100.md

For K x N in the Llama-3-8B shapes and M in 1..32 it times ``triton_wq.wq_matmul`` with
``path="gemv"`` (launches of <= 4 rows, each streaming the weights), ``path="mma"`` (launches of <= 16
rows, weights decoded into mma.sync registers) and ``path="dot"`` (the tiled tensor-core kernel), next to
bf16 ``F.linear`` and torch's int4 tinygemm, with the method of benchmarks/kernels.py (CUDA-graph replays,
weights rotated past L2). ``GEMV_MAX_M`` and ``MMA_MAX_M`` in specq/kernels/triton_wq.py are chosen from
this table.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import kernels as kb  # noqa: E402  (benchmarks/kernels.py)

MS = [1, 2, 3, 4, 5, 8, 12, 16, 32]
PATHS = ("gemv", "mma", "dot")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in kb.SHAPES))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernel_paths.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import specq.kernels.ops  # noqa: F401
    from specq.kernels import triton_wq

    torch.manual_seed(0)
    copy_bw = kb.measure_copy_bandwidth()
    dev = torch.device("cuda")
    ms = [int(v) for v in args.ms.split(",")]
    lines = [f"# GEMV vs tensor-core path for 4-bit weights ({torch.cuda.get_device_name()})", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             "- command: `python benchmarks/kernel_paths.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`",
             f"- copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write); times in us (median of CUDA-graph "
             "replays, weights rotated past L2); `%bw` = weight + activation bytes / time / copy bandwidth", ""]
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        lines += [f"## K={k}, N={n}", "",
                  "| M | bf16 | tinygemm | mxfp4 gemv | mxfp4 mma | mxfp4 dot | w4a16 gemv | w4a16 mma | w4a16 dot "
                  "| best mxfp4 %bw | best w4a16 %bw |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        sets = {}
        for kind in ("bf16", "tinygemm", "mxfp4", "int4"):
            one, nbytes = kb.make_weights(kind, n, k, dev)
            copies = max(1, min(64, math.ceil(kb.L2_FLUSH_BYTES / nbytes)))
            sets[kind] = ([one] + [kb.make_weights(kind, n, k, dev)[0] for _ in range(copies - 1)], nbytes)
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            t = {}

            def timed(name, wkind, fn):
                ws, _ = sets[wkind]
                try:
                    t[name] = kb._bench(lambda: [fn(w) for w in ws], len(ws)) * 1e6
                except Exception as e:  # noqa: BLE001  report and go on
                    print(f"{name} M={m}: {type(e).__name__}: {str(e)[:200]}")

            timed("bf16", "bf16", lambda w: kb.call("bf16", x, w))
            timed("tinygemm", "tinygemm", lambda w: kb.call("tinygemm", x, w))
            for fmt_name, wkind, fmt, g in (("mxfp4", "mxfp4", triton_wq.FORMAT_MXFP4, 32),
                                            ("w4a16", "int4", triton_wq.FORMAT_INT4, 128)):
                for path in PATHS:
                    timed(f"{fmt_name} {path}", wkind,
                          lambda w, fmt=fmt, g=g, path=path: triton_wq.wq_matmul(x, w[0], w[1], None, fmt, g, path=path))

            def pct(fmt_name, wkind):
                best = min(t.get(f"{fmt_name} {path}", math.inf) for path in PATHS)
                moved = sets[wkind][1] + m * k * 2 + m * n * 2
                return f"{100 * moved / (best * 1e-6) / copy_bw:.0f}%" if best < math.inf else "-"

            cell = lambda name: f"{t[name]:.2f}" if name in t else "-"  # noqa: E731
            row = (f"| {m} | {cell('bf16')} | {cell('tinygemm')} | "
                   + " | ".join(cell(f"{f} {p}") for f in ("mxfp4", "w4a16") for p in PATHS)
                   + f" | {pct('mxfp4', 'mxfp4')} | {pct('w4a16', 'int4')} |")
            print(shape, row, flush=True)
            lines.append(row)
        lines.append("")
        del sets
        torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
