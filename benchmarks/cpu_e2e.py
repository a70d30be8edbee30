"""CPU end-to-end decoding speed on the embedded default model (SmolLM2-135M-Instruct), batch 1, greedy.

One command, the whole table (benchmarks/results/cpu_e2e.md):

    .venv/bin/python benchmarks/cpu_e2e.py [--new-tokens 128] [--prompts 4] [--repeats 3] [--quick]

Part 1, bfloat16 (the speed goal): HF generate() in bf16 is the baseline; every specq strategy runs
eagerly (specq.generate) and on inductor-compiled CPU steps (specq/runtime/compiled_cpu.py: frozen
weights, the specq ops decomposed into aten's INT4 kernel, grouped-query SDPA), on the same chat
prompts, the model transformed with the default recipe. Rows are timed in R rounds; in a round each
prompt runs HF generate() and then every row, so slow spells of a shared VM hit a row and its baseline
alike. A row's tokens/s is the median over rounds of (new tokens / decode time, prefill included),
its speed-up the median of per-round ratios to HF. Compiled rows are compiled before
timing (their first-call time is reported). Tokens are compared with HF bf16 per prompt: "identical"
counts prompts whose whole output equals HF's; otherwise the first differing position is reported.
In bf16 a multi-token verify, and compiled code's fused kernels, round differently from HF's one-token
eager steps, so tokens can drift at near-ties; that is a property of bf16, not of the algorithms:

Part 2, float32 (losslessness): the strategies again, eager and compiled, in float32, against HF
generate() in float32: their tokens must be identical (asserted after the table is written).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import subprocess
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

# (name, levels, gamma, compiled)
BF16_ROWS = [
    ("specq autoregressive", ["bf16"], 1, False),
    ("ngram -> bf16", ["ngram", "bf16"], 4, False),
    ("w4a16 -> bf16", ["w4a16", "bf16"], 3, False),
    ("ngram -> w4a16 -> bf16", ["ngram", "w4a16", "bf16"], [4, 3], False),
    ("ngram -> mxfp4 -> bf16 (ML-SpecQD)", ["ngram", "mxfp4", "bf16"], [4, 3], False),
    ("specq autoregressive", ["bf16"], 1, True),
    ("ngram -> bf16", ["ngram", "bf16"], 4, True),
    ("ngram -> bf16", ["ngram", "bf16"], 8, True),
    ("w4a16 -> bf16", ["w4a16", "bf16"], 2, True),
    ("w4a16 -> bf16", ["w4a16", "bf16"], 3, True),
    ("ngram -> w4a16 -> bf16", ["ngram", "w4a16", "bf16"], [4, 2], True),
    ("ngram -> mxfp4 -> bf16 (ML-SpecQD)", ["ngram", "mxfp4", "bf16"], [4, 2], True),
]
FP32_ROWS = [
    ("ngram -> bf16", ["ngram", "bf16"], 4, False),
    ("w4a16 -> bf16", ["w4a16", "bf16"], 3, False),
    ("ngram -> w4a16 -> bf16", ["ngram", "w4a16", "bf16"], [4, 3], False),
    ("ngram -> mxfp4 -> bf16 (ML-SpecQD)", ["ngram", "mxfp4", "bf16"], [4, 3], False),
    ("specq autoregressive", ["bf16"], 1, True),
    ("ngram -> bf16", ["ngram", "bf16"], 4, True),
    ("w4a16 -> bf16", ["w4a16", "bf16"], 3, True),
]
QUICK = {"specq autoregressive", "ngram -> bf16", "w4a16 -> bf16"}


def _encode(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]


def _label(name, gamma, compiled):
    g = "" if gamma == 1 else f", gamma {gamma if isinstance(gamma, int) else ','.join(map(str, gamma))}"
    return f"{name}{g}", "inductor (frozen)" if compiled else "eager"


def _hf(model, ids, n):
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        return out, time.perf_counter() - t0


def _specq(model, ids, n, levels, gamma, compiled):
    import specq

    if compiled:
        from specq.runtime.compiled import compiled_generate

        t0 = time.perf_counter()
        out = compiled_generate(model, ids, n, levels=levels, gamma=gamma, compile="inductor")
    else:
        t0 = time.perf_counter()
        out = specq.generate(model, ids, n, levels=levels, gamma=gamma)
    return out.sequences, time.perf_counter() - t0, out.stats


def _first_diff(seq, ref, prompt_len):
    """None when the outputs are identical, else the first differing new-token position."""
    if torch.equal(seq, ref):
        return None
    a, b = seq[0, prompt_len:], ref[0, prompt_len:]
    n = min(len(a), len(b))
    same = (a[:n] == b[:n]).to(torch.int64).cumprod(0).sum()
    return int(same)


def _device() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
        flags = next((ln.split(":", 1)[1].split() for ln in out.splitlines() if ln.startswith("Flags")), [])
        extra = ", ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags)
        return f"{model or platform.processor()} ({os.cpu_count()} cores; {extra})"
    except (OSError, subprocess.SubprocessError):
        return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _transform(model):
    import specq

    t0 = time.perf_counter()
    specq.transform(model, modes=("bf16", "mxfp4", "w4a16"))  # default recipe (self-calibrated MXFP4)
    specq.set_mode(model, "bf16")
    return time.perf_counter() - t0


def _warm(model, prompts, rows, n_new, log):
    """First call of every compiled row (compiles the graphs it needs that earlier rows did not: rows
    share the model's compiled steps); returns {row key: seconds}. The longest prompt and the full token
    count, so that the static cache allocated here fits every timed call (a larger one would be new
    steps, compiled again)."""
    first = {}
    longest = max(prompts, key=lambda ids: ids.shape[1])
    for name, levels, gamma, compiled in rows:
        if not compiled:
            continue
        t0 = time.perf_counter()
        _specq(model, longest, n_new, levels, gamma, compiled)
        first[(name, str(gamma), compiled)] = time.perf_counter() - t0
        log(f"  compiled {_label(name, gamma, compiled)[0]}: first call {first[(name, str(gamma), compiled)]:.0f} s")
    return first


def bf16_part(args, tok, log):
    import specq

    model, _ = specq.load(dtype=torch.bfloat16)
    prompts = [_encode(tok, p) for p in PROMPTS[: args.prompts]]
    rows = [r for r in BF16_ROWS if not args.quick or r[0] in QUICK]
    log(f"bf16: transform {_transform(model):.0f} s")
    _hf(model, prompts[0], 8)  # warm-up: first-call allocations, oneDNN kernel selection
    for name, levels, gamma, compiled in rows:
        if not compiled:
            _specq(model, prompts[0], 8, levels, gamma, False)
    first = _warm(model, prompts, rows, args.new_tokens, log)
    refs, hf_tps = None, []
    results = {(r[0], str(r[2]), r[3]): dict(tps=[], ratio=[], diffs=None, stats=None) for r in rows}
    for rnd in range(args.repeats):
        # per prompt, HF and then every row (order reversed every other round): each row is timed in
        # the same minute as the baseline it is divided by
        order = rows if rnd % 2 == 0 else rows[::-1]
        tot = {key: [0, 0.0, [], []] for key in results}
        hf_tok, hf_sec, outs = 0, 0.0, []
        for j, ids in enumerate(prompts):
            out, dt = _hf(model, ids, args.new_tokens)
            outs.append(out)
            hf_tok += out.shape[1] - ids.shape[1]
            hf_sec += dt
            ref = (refs or outs)[j]
            for name, levels, gamma, compiled in order:
                seq, dt, st = _specq(model, ids, args.new_tokens, levels, gamma, compiled)
                t = tot[(name, str(gamma), compiled)]
                t[0] += seq.shape[1] - ids.shape[1]
                t[1] += dt
                t[2].append(_first_diff(seq, ref, ids.shape[1]))
                t[3].append(st)
        refs = refs or outs
        hf_tps.append(hf_tok / hf_sec)
        log(f"round {rnd + 1}: HF generate bf16 {hf_tok / hf_sec:.1f} tok/s (load {os.getloadavg()[0]:.2f})")
        for name, levels, gamma, compiled in rows:
            key = (name, str(gamma), compiled)
            toks, secs, diffs, stats = tot[key]
            r = results[key]
            r["tps"].append(toks / secs)
            r["ratio"].append(toks / secs / hf_tps[-1])
            if r["diffs"] is not None and r["diffs"] != diffs:
                log(f"  WARNING {name}: tokens changed between rounds ({r['diffs']} vs {diffs})")
            r["diffs"], r["stats"] = diffs, stats
            log(f"  {_label(name, gamma, compiled)[0]:45s} {_label(name, gamma, compiled)[1]:18s} "
                f"{toks / secs:6.1f} tok/s  {toks / secs / hf_tps[-1]:.2f}x")
    return rows, results, hf_tps, first


def fp32_part(args, tok, log):
    import specq

    model, _ = specq.load(dtype=torch.float32)
    prompts = [_encode(tok, p) for p in PROMPTS[: args.prompts]]
    rows = [r for r in FP32_ROWS if not args.quick or r[0] in QUICK]
    log(f"float32: transform {_transform(model):.0f} s")
    refs, secs, toks = [], 0.0, 0
    for ids in prompts:
        out, dt = _hf(model, ids, args.new_tokens)
        refs.append(out)
        secs += dt
        toks += out.shape[1] - ids.shape[1]
    hf = toks / secs
    out_rows = []
    for name, levels, gamma, compiled in rows:
        diffs, toks, secs = [], 0, 0.0
        _specq(model, prompts[0], 8, levels, gamma, compiled)  # compile / warm up
        for ids, ref in zip(prompts, refs):
            seq, dt, _ = _specq(model, ids, args.new_tokens, levels, gamma, compiled)
            diffs.append(_first_diff(seq, ref, ids.shape[1]))
            toks += seq.shape[1] - ids.shape[1]
            secs += dt
        out_rows.append((name, gamma, compiled, toks / secs, diffs))
        log(f"  float32 {_label(name, gamma, compiled)[0]:40s} {_label(name, gamma, compiled)[1]:18s} "
            f"{toks / secs:6.1f} tok/s identical to HF float32: {all(d is None for d in diffs)}")
    return hf, out_rows


def _acceptance(stats_list) -> str:
    levels = stats_list[0].levels[:-1]
    parts = []
    for i, lv in enumerate(levels):
        drafted = sum(s.levels[i].drafted for s in stats_list)
        accepted = sum(s.levels[i].accepted for s in stats_list)
        parts.append(f"{lv.name} {accepted / max(1, drafted):.2f}")
    return ", ".join(parts) or "-"


def _same(diffs) -> str:
    n = sum(d is None for d in diffs)
    rest = [d for d in diffs if d is not None]
    return f"{n}/{len(diffs)}" + (f" (others from token {min(rest)})" if rest else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    ap.add_argument("--quick", action="store_true", help="only autoregressive, ngram and w4a16 rows")
    ap.add_argument("--skip-fp32", action="store_true", help="skip the float32 losslessness part")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu_e2e.md"))
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    import specq

    _, tok = specq.load(dtype=torch.bfloat16)
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    rows, results, hf_tps, first = bf16_part(args, tok, log)
    fp32 = None if args.skip_fp32 else fp32_part(args, tok, log)
    hf = statistics.median(hf_tps)

    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python benchmarks/cpu_e2e.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# CPU end-to-end decoding: SmolLM2-135M-Instruct, batch 1, greedy",
        "",
        f"- device: {_device()}; torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"transformers {__import__('transformers').__version__}",
        f"- date: {now}; load average (1 min) {load_start[0]:.2f} before, {os.getloadavg()[0]:.2f} after; "
        f"run time {(time.perf_counter() - t_start) / 60:.0f} min",
        f"- command: `{cmd.strip()}`",
        f"- {args.prompts} chat prompts (benchmarks/cpu_e2e.py), up to {args.new_tokens} new tokens each (EOS "
        f"stops, as in HF generate()); default recipe; tokens/s = new tokens / decode time (prefill "
        f"included), median of {args.repeats} rounds (min-max in brackets); within a round each prompt runs "
        f"HF and then every row, so 'vs HF bf16' is the median of per-round ratios",
        "- compiled = specq's compiled steps with inductor on the CPU (frozen weights, INT4 kernel, grouped "
        "SDPA; specq/runtime/compiled_cpu.py); first call = the row's first generate() call, which compiles "
        "the graphs (one per mode and query length) that rows above it did not already compile (not timed)",
        "",
        "## bfloat16: speed against HF generate() bf16",
        "",
        "| strategy | steps | tokens/s | vs HF bf16 | first call s | identical to HF bf16 | acceptance |",
        "|---|---|---|---|---|---|---|",
        f"| HF generate() | eager | {hf:.1f} [{min(hf_tps):.1f}-{max(hf_tps):.1f}] | 1.00x | - | baseline | - |",
    ]
    # vs HF: the median over rounds of (row tokens/s / HF tokens/s of the same round), min-max in brackets
    for name, levels, gamma, compiled in rows:
        key = (name, str(gamma), compiled)
        r = results[key]
        tps = statistics.median(r["tps"])
        label, steps = _label(name, gamma, compiled)
        fc = f"{first[key]:.0f}" if key in first else "-"
        ratio = statistics.median(r["ratio"])
        lines.append(f"| {label} | {steps} | {tps:.1f} [{min(r['tps']):.1f}-{max(r['tps']):.1f}] | "
                     f"{ratio:.2f}x [{min(r['ratio']):.2f}-{max(r['ratio']):.2f}] | {fc} | {_same(r['diffs'])} | "
                     f"{_acceptance(r['stats'])} |")
    failures = []
    if fp32 is not None:
        hf32, rows32 = fp32
        lines += ["", "## float32: lossless (tokens must equal HF generate() float32)", "",
                  "| strategy | steps | tokens/s | identical to HF float32 |", "|---|---|---|---|",
                  f"| HF generate() | eager | {hf32:.1f} | reference |"]
        for name, gamma, compiled, tps, diffs in rows32:
            label, steps = _label(name, gamma, compiled)
            lines.append(f"| {label} | {steps} | {tps:.1f} | {_same(diffs)} |")
            if any(d is not None for d in diffs):
                failures.append(f"{label} ({steps}): {diffs}")
    lines.append("")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, args.out)
    print("\n".join(lines))
    if failures:
        raise AssertionError("float32 tokens differ from HF float32: " + "; ".join(failures))


if __name__ == "__main__":
    main()
