r"""End-to-end decoding speed of every specq strategy against Hugging Face's baselines.

    python benchmarks/e2e.py --model default --device cuda --out benchmarks/results   # real default model
    python benchmarks/e2e.py --model llama3-8b-shape --device cuda --steps             # random 8B-shaped
    python benchmarks/e2e.py --model tiny --device cpu --dtype float32 --strict        # CI-sized check

QSpec at batch 32 against specq's own W4A16 autoregressive decoding (issue 7):

    python benchmarks/e2e.py --model default --batch 32 --rows ar_w4a16@inductor,qspec@inductor
    python benchmarks/e2e.py --model llama3-8b-shape --batch 32 --rows ar_w4a16@inductor,qspec@inductor \
        --steps --step-batches 32 --new-tokens 128
    # the 8B shape at the default model's measured acceptance (the real run's batch in --step-batches,
    # same --gamma2):
    python benchmarks/e2e.py --model llama3-8b-shape --batch 32 --rows ar_w4a16@inductor,qspec@inductor \
        --steps --step-batches 32 --implied-from benchmarks/results/e2e_default_cuda.json

Defaults: batch 1, a 128-token prompt, 256 new tokens, greedy, EOS ignored, the same prompt for every
benchmark row. `--batch B` decodes B different prompt rows at once (bench.make_prompt) and tok/s counts all
B x new tokens; at B > 1 the two-level speculative rows (qspec, mlspecqd2, ngram_bf16) use per-row
acceptance (each row keeps its own cache position and all the drafts it accepted;
`--no-per-row`: the batch advances by its smallest accepted count). Autoregressive and three-level
rows are the same either way.
Writes e2e_<tag>.md (a commit-ready table with device, date and command) and e2e_<tag>.json.
On a random-weight model acceptance means nothing: `--steps` adds the cost of each compiled step
(one CUDA graph replay per forward) per mode and query length, at each of `--step-batches`, which
is what transfers to a real model of that shape (`--implied-from REAL.json` turns the costs at the
real run's batch into the speed the real model's measured acceptance implies; with per-row on, the
steps of the speculative rows are also timed with per-row positions, and per-row rows use those).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from specq.runtime import bench  # noqa: E402
from specq.passes.plan import MODES  # noqa: E402


def build(args):
    dtype = getattr(torch, args.dtype)
    tok = None
    if args.model == "llama3-8b-shape":
        model = bench.random_model(bench.LLAMA3_8B_SHAPE, dtype=dtype, device=args.device)
    elif args.model == "tiny":
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from tiny_models import make_tiny_model

        model = make_tiny_model("llama", dtype=dtype).to(args.device)
    else:
        import specq

        model, tok = specq.load(None if args.model == "default" else args.model, dtype=dtype, device=args.device)
    return model, tok


def parse_step_shape(text: str, parser) -> tuple:
    """"w4a16:5" -> ("w4a16", 5); "round:w4a4:w4a16:4" -> ("round", "w4a4", "w4a16", 4)."""
    f = text.strip().split(":")
    try:
        if f[0] == "round" and len(f) == 4 and f[1] in MODES and f[2] in MODES:
            return ("round", f[1], f[2], int(f[3]))
        if len(f) == 2 and f[0] in MODES:
            return (f[0], int(f[1]))
    except ValueError:
        pass
    parser.error(f"--step-shapes: {text!r} is not MODE:Q or round:DRAFT:TARGET:GAMMA (modes {', '.join(MODES)})")


def recipe_with(model, settings: list, parser) -> dict | None:
    """The model's recipe with KEY=VALUE overrides (values parsed as YAML), or None (the recipe as is)."""
    if not settings:
        return None
    import yaml

    from specq.passes.plan import load_recipe

    rec = load_recipe(None, getattr(getattr(model, "config", None), "model_type", None))
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in rec:
            parser.error(f"--recipe-set {item!r}: expected KEY=VALUE with KEY one of {sorted(rec)}")
        rec[key] = yaml.safe_load(value)
    return rec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="default | llama3-8b-shape | tiny | Hub id / dir / .gguf")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows", default=",".join(bench.ROWS))
    p.add_argument("--batch", type=int, default=1, help="prompt rows decoded together (different rows)")
    p.add_argument("--per-row", action=argparse.BooleanOptionalAction, default=None,
                   help="per-row acceptance for the two-level speculative rows (default: on when --batch > 1)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--gamma2", type=int, default=4, help="draft tokens per round of 2-level rows")
    p.add_argument("--gamma3", default="4,4", help="gammas of the 3-level row (ngram, mxfp4)")
    p.add_argument("--gamma-ngram", type=int, default=8, help="draft tokens per round of ngram -> bf16")
    p.add_argument("--compile", default="auto", help="auto | inductor | none (eager steps, still CUDA graphs)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--strict", action="store_true", help="fail unless lossless rows give identical tokens")
    p.add_argument("--steps", action="store_true", help="also time each compiled step (CUDA only)")
    p.add_argument("--step-batches", default="1", help="comma-separated batch sizes of the step timings")
    p.add_argument("--steps-compile", default=None, help="compile setting of the step timings (default: --compile)")
    p.add_argument("--lm-head-modes", default=None,
                   help="quantized modes whose output head runs quantized, e.g. mxfp4 (recipe key lm_head_modes; "
                        "default: the recipe's, a float head)")
    p.add_argument("--recipe-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the model's recipe (YAML value), e.g. w4a4_scale_levels=16 or "
                        "act_group_size=0; repeatable")
    p.add_argument("--step-shapes", default=None,
                   help="time only these steps, comma-separated MODE:Q or round:DRAFT:TARGET:GAMMA "
                        "(e.g. w4a16:1,w4a4:1,w4a16:5,round:w4a4:w4a16:4); default: every mode at q=1, "
                        "the verifies and rounds of the rows")
    p.add_argument("--implied-from", default=None, help="a real model's e2e JSON: implied speed at this shape "
                   "(needs --steps with the real run's batch in --step-batches)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    compile_ = None if args.compile == "none" else args.compile
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r.partition("@")[0] not in bench.ROWS or r.partition("@")[2] not in ("", "none", "inductor", "eager", "aot_eager")]
    if unknown:
        p.error(f"unknown rows {unknown}; rows are {bench.ROWS}")
    if args.batch < 1:
        p.error("--batch must be >= 1")
    per_row = (args.batch > 1) if args.per_row is None else (args.per_row and args.batch > 1)
    step_batches = [int(x) for x in args.step_batches.split(",") if x.strip()]
    step_shapes = [parse_step_shape(x, p) for x in (args.step_shapes or "").split(",") if x.strip()]
    gamma3 = [int(x) for x in args.gamma3.split(",")]
    gamma = {"mlspecqd2": args.gamma2, "qspec": args.gamma2, "mlspecqd3": gamma3, "ngram_bf16": args.gamma_ngram}
    real = None
    if args.implied_from:  # checked before any model is built or timed
        real = json.load(open(args.implied_from))
        real_meta = real.get("meta", {})
        real_batch = int(real_meta.get("batch", 1))  # JSONs written before --batch: batch 1
        if not args.steps:
            p.error("--implied-from needs --steps (the step costs it combines with the real run's forwards)")
        if real_batch not in step_batches:
            p.error(f"{args.implied_from} ran at batch {real_batch}: its implied speed needs step costs at "
                    f"that batch; add {real_batch} to --step-batches (now {args.step_batches})")
        real_gamma = real_meta.get("gamma") or {}
        for name in ("qspec", "mlspecqd2"):
            if name in real_gamma and int(real_gamma[name]) != args.gamma2:
                p.error(f"{args.implied_from} ran {name} with gamma {real_gamma[name]}, the verify steps here "
                        f"are timed at q = --gamma2 + 1 = {args.gamma2 + 1}; pass --gamma2 {real_gamma[name]}")
    tag = args.tag or f"{args.model.replace('/', '_')}_{args.device}"
    os.makedirs(args.out, exist_ok=True)
    log = lambda *a: print(*a, flush=True)  # noqa: E731

    t0 = time.perf_counter()
    model, tok = build(args)
    log(f"[e2e] built {args.model} in {time.perf_counter() - t0:.1f} s")
    modes = sorted({m for r in rows for m in bench.NEEDED_MODES.get(r.partition("@")[0], ())} | {"bf16"},
                   key=["bf16", "mxfp4", "w4a16", "w4a4"].index)
    t0 = time.perf_counter()
    if modes != ["bf16"]:
        import specq

        lm_head = [m for m in (args.lm_head_modes or "").split(",") if m]
        specq.transform(model, modes=tuple(modes), lm_head_modes=lm_head or None,
                        recipe=recipe_with(model, args.recipe_set, p))
    transform_s = time.perf_counter() - t0
    log(f"[e2e] transform {modes} in {transform_s:.1f} s")
    ids = bench.make_prompt(model, tok, args.prompt_len, batch=args.batch)
    failed = None
    try:
        results = bench.run_rows(model, ids, args.new_tokens, rows=rows, gamma=gamma, compile=compile_,
                                 repeats=args.repeats, strict=args.strict, log=log, per_row=per_row)
    except bench.LosslessError as e:  # write the tables anyway, then fail
        failed, results = e, e.rows

    costs = []
    if args.steps:
        shapes = []
        for m in modes:
            shapes.append((m, 1))
        shapes += [("bf16", args.gamma2 + 1), ("mxfp4", gamma3[0] + 1), ("bf16", gamma3[1] + 1)]
        if "w4a16" in modes:
            shapes.append(("w4a16", args.gamma2 + 1))
        if "mxfp4" in modes:
            shapes.append(("round", "mxfp4", "bf16", args.gamma2))
        if "w4a4" in modes:
            shapes.append(("round", "w4a4", "w4a16", args.gamma2))
        if args.step_shapes:
            shapes = step_shapes
        # the steps of per-row decoding (two-level rows only): draft steps, verifies, whole rounds
        row_shapes = list(dict.fromkeys(
            s for s in shapes if s[0] == "round" or (s[0] in ("mxfp4", "w4a4") and s[1] == 1)
            or s in (("bf16", args.gamma2 + 1), ("w4a16", args.gamma2 + 1))))
        sc = args.steps_compile or args.compile
        sc = None if sc == "none" else sc
        for b in step_batches:
            costs += bench.step_costs(model, batch=b, shapes=shapes, compile=sc, position=args.prompt_len,
                                      log=log)
            real_per_row = real is not None and real_meta.get("per_row") and b == real_batch
            if b > 1 and (per_row or real_per_row):
                costs += bench.step_costs(model, batch=b, shapes=row_shapes, compile=sc,
                                          position=args.prompt_len, log=log, row_positions=True)

    implied, implied_costs = {}, {}
    if real is not None and costs:
        for rows_suffix, on in (("", False), ("@rows", True)):
            cb = {c["step"]: c["ms"] for c in costs
                  if c.get("ms") and c["batch"] == real_batch and bool(c.get("per_row")) == on}
            label = " per-row" if on else ""
            table = {m: cb.get(f"{m} q=1{label}") for m in modes}  # draft and autoregressive steps (w4a4 too)
            table["bf16@verify"] = cb.get(f"bf16 q={args.gamma2 + 1}{label}")
            table["w4a16@verify"] = cb.get(f"w4a16 q={args.gamma2 + 1}{label}")
            table["mxfp4@verify"] = cb.get(f"mxfp4 q={gamma3[0] + 1}{label}")
            implied_costs.update({k + rows_suffix: v for k, v in table.items() if v})
        real_new = int(real_meta.get("new_tokens", args.new_tokens))
        implied = bench.implied_speed(real["rows"], implied_costs, real_new, batch=real_batch)

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    meta = dict(model=args.model, device=device_name, dtype=args.dtype, torch=torch.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="python benchmarks/e2e.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                batch=args.batch, per_row=per_row, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                gamma=gamma, transform_s=transform_s, compile=args.compile, lm_head_modes=args.lm_head_modes,
                recipe_set=args.recipe_set)
    md = [f"# End-to-end decoding: {args.model}", "",
          f"- device: {device_name}; torch {torch.__version__}; dtype {args.dtype}; date {meta['date']}",
          f"- command: `{meta['command']}`",
          f"- batch {args.batch}, per-row acceptance {'on' if per_row else 'off'}, prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens per row (tok/s counts all {args.batch} rows), greedy, EOS ignored; "
          f"gamma {gamma}; compile={args.compile}"
          + (f"; output head quantized in {args.lm_head_modes}" if args.lm_head_modes else ""), "",
          bench.markdown_table(results), ""]
    if costs:
        md += ["## Step costs (one CUDA graph replay per forward, median)", "", "| step | batch | ms | setup s |",
               "|---|---|---|---|"]
        md += [f"| {c['step']} | {c['batch']} | {c.get('ms')} | {c.get('setup_s', c.get('error'))} |" for c in costs]
        md.append("")
    if implied:
        md += ["## Speed implied at this shape by the real model's acceptance", "",
               f"- real run: {args.implied_from} ({real_meta.get('model')}, batch {real_meta.get('batch', 1)}, "
               f"per-row {'on' if real_meta.get('per_row') else 'off'}, {real_meta.get('new_tokens')} new tokens per row); "
               f"its forwards per level x these step costs (ms, batch {real_meta.get('batch', 1)}; "
               f"'@rows': per-row steps): {implied_costs}", "",
               "| row | tok/s |", "|---|---|"]
        md += [f"| {k} | {v:.1f} |" for k, v in implied.items()]
        md.append("")
    text = "\n".join(md)
    print(text, flush=True)
    payload = dict(meta=meta, rows=[r.as_dict() for r in results], step_costs=costs, implied=implied,
                   implied_costs=implied_costs)
    bench.dump_json(os.path.join(args.out, f"e2e_{tag}.json"), payload)
    md_path = os.path.join(args.out, f"e2e_{tag}.md")
    tmp = md_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, md_path)
    if failed is not None:
        raise SystemExit(f"[e2e] FAILED: {failed}")
    return results


if __name__ == "__main__":
    main()
