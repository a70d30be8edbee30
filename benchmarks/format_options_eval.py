"""End-to-end effect of the format options on the default model: MXFP4 scale rule and INT4 clipping.

    .venv/bin/python benchmarks/format_options_eval.py [--dtype float32] [--max-new-tokens 64]

Transforms SmolLM2-135M-Instruct twice with the default recipe, once as shipped (MXFP4 floor rule,
plain INT4 scales) and once with ``mxfp4_scale_rule: mse`` and ``int4_clip_ratio: search``, and runs
``specq.evaluation.evaluate`` on each: perplexity per mode on the shipped texts and greedy top-1
agreement MXFP4 -> BF16 and W4A4 -> W4A16 on the shipped prompts. docs/formats.md quotes the result.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

VARIANTS = {
    "spec (floor, plain INT4)": {"base": "default", "mxfp4_scale_rule": "floor", "int4_clip_ratio": None},
    "mse + clip search": {"base": "default", "mxfp4_scale_rule": "mse", "int4_clip_ratio": "search"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=512)
    args = ap.parse_args()

    import specq
    from specq.evaluation import evaluate

    base, tok = specq.load(dtype=getattr(torch, args.dtype))
    out = {"date": time.strftime("%Y-%m-%d"), "dtype": args.dtype, "torch": torch.__version__, "variants": {}}
    for label, recipe in VARIANTS.items():
        model = specq.transform(copy.deepcopy(base), modes=("bf16", "mxfp4", "w4a16", "w4a4"),
                                recipe=dict(recipe, name=label))
        rep = evaluate(model, tok, max_new_tokens=args.max_new_tokens, max_length=args.max_length, progress=False)
        out["variants"][label] = {
            "perplexity": {m: round(v["perplexity"], 3) for m, v in rep.modes.items()},
            "agreement": {f"{p['draft']}->{p['verifier']}": round(p["agreement"], 4) for p in rep.pairs},
            "tokens_per_round_gamma4": {f"{p['draft']}->{p['verifier']}": round(p["tokens_per_round"], 3)
                                        for p in rep.pairs},
            "seconds": round(rep.seconds, 1),
        }
        print(json.dumps({label: out["variants"][label]}), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
