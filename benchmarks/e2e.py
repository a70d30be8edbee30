"""End-to-end decoding speed of every specq strategy against Hugging Face's baselines.

    python benchmarks/e2e.py --model default --device cuda --out benchmarks/results   # real default model
    python benchmarks/e2e.py --model llama3-8b-shape --device cuda --steps             # random 8B-shaped
    python benchmarks/e2e.py --model tiny --device cpu --dtype float32 --strict        # CI-sized check

Batch 1, a 128-token prompt, 256 new tokens, greedy, EOS ignored, the same prompt for every row.
Writes e2e_<tag>.md (a commit-ready table with device, date and command) and e2e_<tag>.json.
On a random-weight model acceptance means nothing: `--steps` adds the cost of each compiled step
(one CUDA graph replay per forward) per mode and query length, which is what transfers to a real
model of that shape (`--implied-from REAL.json` turns them into the speed the real model's
measured acceptance implies).
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="default | llama3-8b-shape | tiny | Hub id / dir / .gguf")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows", default=",".join(bench.ROWS))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--gamma2", type=int, default=4, help="draft tokens per round of 2-level rows")
    p.add_argument("--gamma3", default="4,4", help="gammas of the 3-level row (ngram, mxfp4)")
    p.add_argument("--gamma-ngram", type=int, default=8, help="draft tokens per round of ngram -> bf16")
    p.add_argument("--compile", default="auto", help="auto | inductor | none (eager steps, still CUDA graphs)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--strict", action="store_true", help="fail unless lossless rows give identical tokens")
    p.add_argument("--steps", action="store_true", help="also time each compiled step (CUDA only)")
    p.add_argument("--step-batches", default="1")
    p.add_argument("--steps-compile", default=None, help="compile setting of the step timings (default: --compile)")
    p.add_argument("--implied-from", default=None, help="a real model's e2e JSON: implied speed at this shape")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    compile_ = None if args.compile == "none" else args.compile
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r.partition("@")[0] not in bench.ROWS or r.partition("@")[2] not in ("", "none", "inductor", "eager", "aot_eager")]
    if unknown:
        p.error(f"unknown rows {unknown}; rows are {bench.ROWS}")
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

        specq.transform(model, modes=tuple(modes))
    transform_s = time.perf_counter() - t0
    log(f"[e2e] transform {modes} in {transform_s:.1f} s")
    ids = bench.make_prompt(model, tok, args.prompt_len)
    gamma3 = [int(x) for x in args.gamma3.split(",")]
    gamma = {"mlspecqd2": args.gamma2, "qspec": args.gamma2, "mlspecqd3": gamma3, "ngram_bf16": args.gamma_ngram}
    failed = None
    try:
        results = bench.run_rows(model, ids, args.new_tokens, rows=rows, gamma=gamma, compile=compile_,
                                 repeats=args.repeats, strict=args.strict, log=log)
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
        sc = args.steps_compile or args.compile
        sc = None if sc == "none" else sc
        for b in [int(x) for x in args.step_batches.split(",")]:
            costs += bench.step_costs(model, batch=b, shapes=shapes, compile=sc, position=args.prompt_len,
                                      log=log)

    implied = {}
    if args.implied_from and costs:
        real = json.load(open(args.implied_from))
        c1 = {c["step"]: c["ms"] for c in costs if c.get("ms") and c["batch"] == 1}
        table = {m: c1.get(f"{m} q=1") for m in modes}
        table["bf16@verify"] = c1.get(f"bf16 q={args.gamma2 + 1}")
        table["w4a16@verify"] = c1.get(f"w4a16 q={args.gamma2 + 1}")
        table["mxfp4@verify"] = c1.get(f"mxfp4 q={gamma3[0] + 1}")
        implied = bench.implied_speed(real["rows"], {k: v for k, v in table.items() if v}, args.new_tokens)

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    meta = dict(model=args.model, device=device_name, dtype=args.dtype, torch=torch.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="python benchmarks/e2e.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                prompt_len=args.prompt_len, new_tokens=args.new_tokens, gamma=gamma, transform_s=transform_s,
                compile=args.compile)
    md = [f"# End-to-end decoding: {args.model}", "",
          f"- device: {device_name}; torch {torch.__version__}; dtype {args.dtype}; date {meta['date']}",
          f"- command: `{meta['command']}`",
          f"- batch 1, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, EOS ignored; "
          f"gamma {gamma}; compile={args.compile}", "",
          bench.markdown_table(results), ""]
    if costs:
        md += ["## Step costs (one CUDA graph replay per forward, median)", "", "| step | batch | ms | setup s |",
               "|---|---|---|---|"]
        md += [f"| {c['step']} | {c['batch']} | {c.get('ms')} | {c.get('setup_s', c.get('error'))} |" for c in costs]
        md.append("")
    if implied:
        md += ["## Speed implied at this shape by the real model's acceptance", "", "| row | tok/s |", "|---|---|"]
        md += [f"| {k} | {v:.1f} |" for k, v in implied.items()]
        md.append("")
    text = "\n".join(md)
    print(text, flush=True)
    payload = dict(meta=meta, rows=[r.as_dict() for r in results], step_costs=costs, implied=implied)
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
