"""CPU decoding on inductor-compiled steps vs HF generate(), default model, bf16, batch 1, greedy.

The compiled-steps loop (specq.runtime.compiled.compiled_generate) with compile="inductor" on the CPU:
inductor's C++ kernels remove most of the per-op Python overhead that dominates a 135M model on 2 cores.
The first call of each strategy compiles (its time is printed, not counted); the second is timed.
Tokens are compared with HF generate() in the same dtype (bf16 may drift by rounding; reported).
Appends a table to benchmarks/results/cpu_e2e.md.

    .venv/bin/python benchmarks/cpu_compiled.py [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import time

import torch

PROMPT = "Write a Python function that checks whether a number is prime, and explain how it works."
STRATEGIES = {"specq autoregressive (inductor)": (["bf16"], 4), "ngram -> bf16 (inductor)": (["ngram", "bf16"], 4)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu_e2e.md"))
    args = ap.parse_args()
    import specq
    from specq.runtime.compiled import compiled_generate

    model, tok = specq.load(dtype=torch.bfloat16)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    n, T = args.new_tokens, ids.shape[1]
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        hf = (ref.shape[1] - T) / (time.perf_counter() - t0)
    rows = [("HF generate()", hf, "-", "baseline", "-")]
    for name, (levels, gamma) in STRATEGIES.items():
        t0 = time.perf_counter()
        compiled_generate(model, ids, n, levels=levels, gamma=gamma, compile="inductor")
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = compiled_generate(model, ids, n, levels=levels, gamma=gamma, compile="inductor")
        tps = (out.sequences.shape[1] - T) / (time.perf_counter() - t0)
        same = torch.equal(out.sequences[0, T:], ref[0, T:out.sequences.shape[1]])
        rows.append((name, tps, f"{first:.0f}", "yes" if same else "no (bf16 rounding)", "-"))
        print(f"{name}: {tps:.1f} tok/s (first call {first:.0f} s), same tokens as HF: {same}")
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["", "## Compiled steps on the CPU (inductor), bf16", "",
             f"- device: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; date: {now}",
             f"- command: `python benchmarks/cpu_compiled.py --new-tokens {n}`",
             "- 1 chat prompt, batch 1, greedy; first call (compile) not timed", "",
             "| strategy | tokens/s | vs HF bf16 | first call s | same tokens as HF bf16 |", "|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]:.1f} | {r[1] / hf:.2f}x | {r[2]} | {r[3]} |" for r in rows]
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
