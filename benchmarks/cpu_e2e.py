"""CPU end-to-end decoding speed on the embedded default model (SmolLM2-135M-Instruct), batch 1, greedy.

Compares, on the same chat prompts:
  - HF generate() in bfloat16 (the baseline of the goal) and in float32,
  - specq autoregressive (levels ["bf16"]: the lean static-cache loop, no drafting),
  - each specq speculative strategy,
and asserts that every specq strategy produces exactly the tokens of HF generate() in the dtype it
runs in (float32 for exactness: in bf16 a multi-token verify and one-token decoding round
differently, so bf16 speculative tokens may drift; their agreement with HF bf16 is reported instead).
Writes benchmarks/results/cpu_e2e.md (device, date, command, table).

    .venv/bin/python benchmarks/cpu_e2e.py [--new-tokens 128] [--prompts 3] [--strategies ...]
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import os
import platform
import sys
import time

import torch

PROMPTS = [
    "Write a Python function that checks whether a number is prime, and explain how it works.",
    "Summarize the following text in two sentences: The Industrial Revolution began in Britain in the late "
    "18th century. It transformed economies from agrarian to industrial, introduced steam power and "
    "mechanized textile production, and led to rapid urbanization as workers moved to cities for factory jobs.",
    "List five tips for staying productive while working from home, with one sentence each.",
    "Explain the difference between a list and a tuple in Python, with a short code example of each.",
]

STRATEGIES = {
    "specq autoregressive": ["bf16"],
    "ngram": ["ngram", "bf16"],
    "shallow:10": ["shallow:10", "bf16"],
    "ngram + shallow:10": ["ngram", "shallow:10", "bf16"],
    "ML-SpecQD mxfp4": ["mxfp4", "bf16"],
    "ML-SpecQD ngram + mxfp4": ["ngram", "mxfp4", "bf16"],
    "QSpec w4a4 -> w4a16 (target w4a16)": ["w4a4", "w4a16"],
}
MODE_STRATEGIES = {"ML-SpecQD mxfp4", "ML-SpecQD ngram + mxfp4", "QSpec w4a4 -> w4a16 (target w4a16)"}


def _encode(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]


def _hf_generate(model, ids, n):
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        return out, time.perf_counter() - t0


def _run_specq(model, ids, n, levels, gamma):
    import specq

    out = specq.generate(model, ids, max_new_tokens=n, levels=levels, gamma=gamma)
    return out.sequences, out.stats.time_s, out.stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--strategies", default=",".join(STRATEGIES),
                    help="comma-separated names from: " + ", ".join(STRATEGIES))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu_e2e.md"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for s in names:
        if s not in STRATEGIES:
            ap.error(f"unknown strategy {s!r}")

    import specq

    model32, tok = specq.load(dtype=torch.float32)
    model16, _ = specq.load(dtype=torch.bfloat16)
    model32.eval(), model16.eval()
    prompts = [_encode(tok, p) for p in PROMPTS[: args.prompts]]
    mm = None
    if any(s in MODE_STRATEGIES for s in names):
        t0 = time.perf_counter()
        mm = specq.transform(copy.deepcopy(model32), modes=("bf16", "mxfp4", "w4a16", "w4a4"))
        print(f"transform: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    # warm up (first-call allocations, oneDNN kernel selection)
    _hf_generate(model16, prompts[0], 8)
    _hf_generate(model32, prompts[0], 8)
    _run_specq(model32, prompts[0], 8, ["ngram", "bf16"], args.gamma)

    rows = []  # (name, dtype, tokens, seconds, exact, note)

    def add(name, dtype, tokens, seconds, exact, note=""):
        rows.append((name, dtype, tokens, seconds, exact, note))
        print(f"{name:40s} {dtype:9s} {tokens / seconds:7.1f} tok/s  exact={exact} {note}", file=sys.stderr)

    ref32, ref16 = [], []
    tot = [0, 0.0]
    for ids in prompts:
        out, dt = _hf_generate(model16, ids, args.new_tokens)
        ref16.append(out)
        tot[0] += out.shape[1] - ids.shape[1]
        tot[1] += dt
    add("HF generate()", "bfloat16", tot[0], tot[1], "baseline")
    tot = [0, 0.0]
    for ids in prompts:
        out, dt = _hf_generate(model32, ids, args.new_tokens)
        ref32.append(out)
        tot[0] += out.shape[1] - ids.shape[1]
        tot[1] += dt
    add("HF generate()", "float32", tot[0], tot[1], "reference")

    # specq autoregressive in bf16, for the like-for-like loop comparison
    tot, agree = [0, 0.0], 0
    for ids, ref in zip(prompts, ref16):
        seq, dt, _ = _run_specq(model16, ids, args.new_tokens, ["bf16"], args.gamma)
        tot[0] += seq.shape[1] - ids.shape[1]
        tot[1] += dt
        agree += int(torch.equal(seq, ref))
    add("specq autoregressive", "bfloat16", tot[0], tot[1], f"{agree}/{len(prompts)} = HF bf16")

    w4a16_refs = None
    for name in names:
        levels = STRATEGIES[name]
        model = mm if name in MODE_STRATEGIES else model32
        refs = ref32
        if levels[-1] == "w4a16":
            if w4a16_refs is None:
                with specq.mode(mm, "w4a16"):
                    w4a16_refs = [_hf_generate(mm, ids, args.new_tokens)[0] for ids in prompts]
            refs = w4a16_refs
        tot, acc = [0, 0.0], []
        for ids, ref in zip(prompts, refs):
            seq, dt, stats = _run_specq(model, ids, args.new_tokens, levels, args.gamma)
            if not torch.equal(seq, ref):
                raise AssertionError(f"{name}: tokens differ from target-only greedy decoding")
            tot[0] += seq.shape[1] - ids.shape[1]
            tot[1] += dt
            acc.append(stats)
        note = "; ".join(
            f"{lv.name}: accept {sum(s.levels[i].accepted for s in acc) / max(1, sum(s.levels[i].drafted for s in acc)):.2f}"
            for i, lv in enumerate(acc[0].levels[:-1]))
        add(name, "float32", tot[0], tot[1], "yes", note)

    base = rows[0][2] / rows[0][3]
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python benchmarks/cpu_e2e.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# CPU end-to-end decoding: SmolLM2-135M-Instruct, batch 1, greedy",
        "",
        f"- device: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        f"- date: {now}; 1-min load average at the end: {os.getloadavg()[0]:.1f} (other work on the machine "
        "slows every row alike; compare rows of one run)",
        f"- command: `{cmd.strip()}`",
        f"- {len(prompts)} chat prompts, {args.new_tokens} new tokens each, gamma {args.gamma}; tokens/s = all new "
        "tokens / all decode time (prefill included)",
        "- exact: the strategy's tokens equal HF generate() greedy tokens in the same dtype (asserted; QSpec: "
        "the w4a16 mode's own greedy tokens)",
        "",
        "| strategy | dtype | tokens/s | vs HF bf16 | exact | acceptance |",
        "|---|---|---|---|---|---|",
    ]
    for name, dtype, tokens, seconds, exact, note in rows:
        tps = tokens / seconds
        lines.append(f"| {name} | {dtype} | {tps:.1f} | {tps / base:.2f}x | {exact} | {note} |")
    lines.append("")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
