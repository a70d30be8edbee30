"""What W4A4 scale levels cost the draft: W4A4 -> W4A16 greedy top-1 agreement with the group scales as stored
and snapped to integer levels (recipe key ``w4a4_scale_levels``, ``int4.snap_scales``), on the embedded default
model (CPU is enough: agreement does not depend on the kernels).

    python benchmarks/scale_levels_eval.py [--dtype float32] [--act-groups 0,32] [--levels 0,16] [--out FILE.md]

For each activation grouping, the verifier's (W4A16's) greedy continuations of the shipped prompts are generated
once and every levels setting's W4A4 argmax is compared with them (``specq.evaluation.top1_agreement``; tokens per
round: greedy speculative decoding with gamma 4 simulated along the verifier's sequence).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--act-groups", default="0,32", help="W4A4 activation groups (0 = per token)")
    ap.add_argument("--levels", default="0,16", help="w4a4_scale_levels values (0 = the scales as stored)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args(argv)

    import specq
    from specq import evaluation as ev
    from specq.passes.plan import load_recipe

    model, tok = specq.load(dtype=getattr(torch, args.dtype))
    prompts = ev.encode_prompts(tok, ev.load_eval_prompts())
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    rows = []
    for ag in (int(a) for a in args.act_groups.split(",")):
        cont = v_argmax = None
        for levels in (int(v) for v in args.levels.split(",")):
            rec = load_recipe("default") | {"act_group_size": ag, "w4a4_scale_levels": levels}
            mm = specq.transform(copy.deepcopy(model), modes=("w4a16", "w4a4"), recipe=rec)
            if cont is None:  # W4A16 does not depend on the levels: one set of continuations per grouping
                cont = ev.greedy_continuations(ev.ModeRunner(mm, "w4a16"), prompts, args.new_tokens, eos, pad)
                v_argmax = ev.teacher_forced_argmax(ev.ModeRunner(mm, "w4a16"), cont)
            r = ev.top1_agreement(ev.ModeRunner(mm, "w4a4"), ev.ModeRunner(mm, "w4a16"), cont,
                                  verifier_argmax=v_argmax)
            rows.append((ag, levels, r))
            print(f"act_group {ag:>2}  levels {levels:>2}: agreement {r.agreement:.4f}  "
                  f"tokens/round (gamma 4) {r.tokens_per_round:.3f}  positions {r.positions}", flush=True)
    lines = [f"# W4A4 scale levels: draft agreement on the default model ({args.dtype}, CPU)", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
             f"{platform.machine()} CPU",
             f"- command: `python benchmarks/scale_levels_eval.py --dtype {args.dtype} --act-groups {args.act_groups} "
             f"--levels {args.levels}`",
             "- W4A4 -> W4A16 greedy top-1 agreement over the shipped prompts "
             f"({args.new_tokens} new tokens); tokens/round: gamma 4, simulated", "",
             "| activation group | scale levels | agreement | tokens/round | positions |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {ag or 'per token'} | {lv or 'as stored'} | {r.agreement:.4f} | {r.tokens_per_round:.3f} | "
              f"{r.positions} |" for ag, lv, r in rows]
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, args.out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
