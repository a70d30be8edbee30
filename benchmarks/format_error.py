"""Weight reconstruction error of the specq formats and their options (docs/formats.md quotes it).

    .venv/bin/python benchmarks/format_error.py                 # random gaussian + the default model
    .venv/bin/python benchmarks/format_error.py --no-model      # random gaussian only

For each variant: relative Frobenius error ||W - deq(quant(W))|| / ||W|| summed over all matrices
(sqrt of total squared error over total squared norm), and the share of matrices the variant makes
better than the baseline of its format. Rotated variants quantize W @ H (block-diagonal Hadamard
along K, as w4a16/w4a4 store it) and measure the error in the rotated basis, which is the same as
in the original basis because H is orthogonal.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch

from specq.formats import hadamard, int4, mxfp4


def _variants(g: int):
    yield "mxfp4 floor (spec)", "mxfp4", lambda w: mxfp4.dequantize(*mxfp4.quantize(w), w.dtype)
    yield "mxfp4 mse", "mxfp4", lambda w: mxfp4.dequantize(*mxfp4.quantize(w, scale_rule="mse"), w.dtype)
    yield f"int4 g{g} plain", "int4", lambda w: int4.dequantize(*int4.quantize(w, g))
    yield f"int4 g{g} clip search", "int4", lambda w: int4.dequantize(*int4.quantize(w, g, clip_ratio="search"))
    # as specq.transform does: rotate in float32, round to the model dtype, quantize
    def rot(w):
        return hadamard.hadamard_transform(w.float(), 64).to(w.dtype)

    yield f"int4 g{g} plain, Hadamard 64", "int4", lambda w: int4.dequantize(*int4.quantize(rot(w), g))
    yield f"int4 g{g} clip search, Hadamard 64", "int4", \
        lambda w: int4.dequantize(*int4.quantize(rot(w), g, clip_ratio="search"))


def measure(named_weights, group_size: int) -> list[dict]:
    totals: dict[str, dict] = {}
    for _, w in named_weights:
        base_err = {}
        for label, fmt, f in _variants(group_size):
            ref = hadamard.hadamard_transform(w.float(), 64) if "Hadamard" in label else w.float()
            err = (f(w).float() - ref).double().square().sum().item()
            t = totals.setdefault(label, {"variant": label, "err": 0.0, "norm": 0.0, "better": 0, "n": 0})
            t["err"] += err
            t["norm"] += ref.double().square().sum().item()
            t["n"] += 1
            key = (fmt, "Hadamard" in label)
            if key not in base_err:
                base_err[key] = err
            elif err < base_err[key]:
                t["better"] += 1
    rows = []
    for t in totals.values():
        rows.append({"variant": t["variant"], "rel_error": (t["err"] / t["norm"]) ** 0.5,
                     "matrices": t["n"], "improved_matrices": t["better"]})
    return rows


def _print(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'variant':40s} {'rel. error':>10s} {'improved':>9s}")
    for r in rows:
        print(f"{r['variant']:40s} {r['rel_error']:10.5f} {r['improved_matrices']:4d}/{r['matrices']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-model", action="store_true", help="skip the default model")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    ap.add_argument("--group-size", type=int, default=64, help="INT4 group size (default 64; matrices whose K it or 64 does not divide are skipped)")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__}
    gauss = [(f"gauss{i}", torch.randn(n, k, dtype=torch.bfloat16))
             for i, (n, k) in enumerate([(1536, 576), (576, 1536), (4096, 4096)])]
    out["int4_group_size"] = args.group_size
    out["gaussian_bf16"] = measure(gauss, args.group_size)
    if not args.no_model:
        import specq

        model, _ = specq.load(dtype=torch.bfloat16)
        mats = [(name, m.weight.detach()) for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and m.weight.shape[1] % math.lcm(64, args.group_size) == 0
                and "lm_head" not in name]
        out["default_model_bf16"] = measure(mats, args.group_size)
        out["default_model_matrices"] = len(mats)
    if args.json:
        print(json.dumps(out, indent=1))
        return
    _print("random gaussian bf16 weights (1536x576, 576x1536, 4096x4096)", out["gaussian_bf16"])
    if "default_model_bf16" in out:
        _print(f"default model (SmolLM2-135M-Instruct) bf16, {out['default_model_matrices']} linear weights "
               "(lm_head is the tied embedding, excluded)", out["default_model_bf16"])


if __name__ == "__main__":
    main()
