"""What an MXFP4 lm_head (recipe key `lm_head_modes: [mxfp4]`) costs the MXFP4 draft in agreement.

    .venv/bin/python benchmarks/lm_head_mxfp4_cpu.py [--dtype bfloat16] [--max-new-tokens 64] [--gamma 4]

Transforms the default model (SmolLM2-135M-Instruct, tied lm_head) to modes bf16 + mxfp4 with the
default recipe twice: float head in every mode (as shipped), and lm_head_modes=["mxfp4"]. For each:

* `specq.evaluation.evaluate` (what `specq eval` prints): perplexity per mode on the shipped text,
  MXFP4 -> BF16 greedy top-1 agreement along BF16's greedy continuations of the 16 shipped prompts,
  and the simulated tokens per verify round for gamma;
* real ML-SpecQD decoding, `specq.generate(levels=["mxfp4", "bf16"], gamma)`, batch 1, greedy, on the
  same prompts: acceptance rate and mean accepted length of the mxfp4 level (eager, no compile).

Prints a markdown table and the JSON of all numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

VARIANTS = {"float head (default)": None, "MXFP4 head in mxfp4 mode": ["mxfp4"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=4)
    args = ap.parse_args()

    import specq
    from specq.evaluation import encode_prompts, evaluate, load_eval_prompts

    base, tok = specq.load(dtype=getattr(torch, args.dtype))
    prompts = encode_prompts(tok, load_eval_prompts())
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dtype": args.dtype,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "variants": {}}
    for label, head_modes in VARIANTS.items():
        mm = specq.transform(copy.deepcopy(base), modes=("bf16", "mxfp4"), lm_head_modes=head_modes)
        rep = evaluate(mm, tok, modes=("bf16", "mxfp4"), pairs=[("mxfp4", "bf16")],
                       max_new_tokens=args.max_new_tokens, gamma=args.gamma, progress=False)
        pair = rep.pairs[0]
        drafted = accepted = row_rounds = new = 0
        t0 = time.perf_counter()
        for ids in prompts:
            res = specq.generate(mm, torch.tensor([ids]), max_new_tokens=args.max_new_tokens,
                                 levels=["mxfp4", "bf16"], gamma=args.gamma)
            lvl = res.stats.levels[0]
            drafted, accepted, row_rounds = drafted + lvl.drafted, accepted + lvl.accepted, row_rounds + lvl.row_rounds
            new += res.stats.new_tokens
        out["variants"][label] = {
            "lm_head_modes": head_modes or [], "perplexity": {m: r["perplexity"] for m, r in rep.modes.items()},
            "weight_MB": {m: r["weight_bytes"] / 1e6 for m, r in rep.modes.items()},
            "agreement": pair["agreement"], "positions": pair["positions"],
            "sim_tokens_per_round": pair["tokens_per_round"],
            "specdec": {"acceptance": accepted / drafted, "mean_accepted_length": accepted / row_rounds,
                        "drafted": drafted, "new_tokens": new, "seconds": time.perf_counter() - t0},
        }
    g = args.gamma
    print(f"| variant | mxfp4 weight MB | mxfp4 perplexity | top-1 agreement mxfp4->bf16 | simulated tokens/round "
          f"(gamma {g}) | specdec acceptance | mean accepted length (gamma {g}) |")
    print("|---|---|---|---|---|---|---|")
    for label, v in out["variants"].items():
        s = v["specdec"]
        print(f"| {label} | {v['weight_MB']['mxfp4']:.1f} | {v['perplexity']['mxfp4']:.3f} | {v['agreement']:.4f} "
              f"({v['positions']} pos.) | {v['sim_tokens_per_round']:.2f} | {s['acceptance']:.3f} "
              f"({s['drafted']} drafted) | {s['mean_accepted_length']:.2f} |")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
