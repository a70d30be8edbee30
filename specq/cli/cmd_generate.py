"""`specq generate [MODEL] --prompt ... --levels ngram,mxfp4,bf16 --gamma 4 [--stats] [--json]`

Thin: load the model (specq.load, or specq.from_pretrained for a specq checkpoint), transform it to
the modes the levels name, encode the prompt (chat template for instruct models), call
specq.generate with a streamer that prints text as it is accepted, print the stats table.
"""

from __future__ import annotations

import json
import sys

import click

MODE_NAMES = ("bf16", "mxfp4", "w4a16", "w4a4")
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32",
          "float16": "float16", "fp16": "float16"}


def _modes_needed(levels: list[str]) -> tuple[str, ...]:
    modes = []
    for spec in levels:
        parts = spec.split(":")
        if parts[0] in MODE_NAMES:
            modes.append(parts[0])
        elif parts[0] == "shallow" and len(parts) > 2:
            modes.append(parts[2])
    return tuple(dict.fromkeys(modes))


def _load(model, modes, dtype, quiet):
    import torch

    import specq
    from specq.loading import ModelLoadError, SpecqCheckpointError

    try:
        base, tokenizer = specq.load(model, dtype=getattr(torch, dtype))
    except SpecqCheckpointError:
        from transformers import AutoTokenizer

        from specq.hub.checkpoint import from_pretrained  # the hub layer; imported only when needed

        return from_pretrained(model, modes=modes), AutoTokenizer.from_pretrained(model)
    except ModelLoadError as e:
        raise click.ClickException(str(e)) from e
    if modes and modes != ("bf16",):
        if not quiet:
            click.echo(f"specq generate: transforming to modes {','.join(modes)} ...", err=True)
        base = specq.transform(base, modes=modes)
    return base, tokenizer


def _encode(tokenizer, prompt: str, chat: bool | None):
    use_chat = chat if chat is not None else bool(getattr(tokenizer, "chat_template", None))
    if use_chat:
        out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        return out["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


class TextStreamer:
    """Prints the decoded text of row 0 as tokens are accepted (decoding the whole suffix each time,
    so multi-token characters come out right)."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, new_tokens):
        self.tokens.extend(new_tokens[0].tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)


def _report_compiles() -> None:
    """Compiling takes long on a CPU: say so up front, and print each graph as it is compiled."""
    import logging

    click.echo("specq generate: compiling decoding steps with inductor (one graph per mode and query length; "
               "~30-50 s each on a 2-core CPU) ...", err=True)
    logger = logging.getLogger("specq.runtime.compiled")
    if not any(getattr(h, "_specq_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("specq generate: %(message)s"))
        handler._specq_cli = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


@click.command("generate")
@click.argument("model", required=False)
@click.option("--prompt", required=True, help="The prompt (the chat template is applied for instruct models).")
@click.option("--levels", default="ngram,mxfp4,bf16", show_default=True,
              help="Comma-separated levels, cheapest drafter first, target last: modes (bf16, mxfp4, w4a16, "
                   "w4a4), ngram[:N], shallow:LAYERS[:MODE].")
@click.option("--gamma", default="4", show_default=True,
              help="Tokens drafted per round: one int, or one per drafting level (comma-separated).")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="0 = greedy (exactly the target's tokens); > 0 samples with the rejection rule.")
@click.option("--top-k", type=click.IntRange(min=1), default=None)
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=None)
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="bfloat16", show_default=True)
@click.option("--chat/--no-chat", default=None, help="Apply the chat template [default: if the tokenizer has one].")
@click.option("--compile", "compile_", type=click.Choice(["none", "inductor"]), default="none", show_default=True,
              help="inductor: decode on compiled steps (greedy only; text printed at the end). On the CPU each "
                   "graph (one per mode and query length) takes ~30-50 s to compile and then runs ~2x faster "
                   "than eager: worth it for long or repeated generations, not for one short answer.")
@click.option("--stats", "show_stats", is_flag=True, help="Print per-level statistics after the text.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text and stats) instead of streaming.")
def generate(model, prompt, levels, gamma, max_new_tokens, temperature, top_k, top_p, seed, dtype, chat,
             compile_, show_stats, as_json):
    """Generate text with (multi-level) speculative decoding; lossless."""
    level_list = [s.strip() for s in levels.split(",") if s.strip()]
    try:
        gammas = [int(g) for g in gamma.split(",")]
    except ValueError:
        raise click.BadParameter(f"{gamma!r} is not an int or a comma-separated list of ints", param_hint="--gamma")
    gamma_arg = gammas[0] if len(gammas) == 1 else gammas
    compiled = compile_ != "none"
    if compiled and temperature != 0:
        raise click.BadParameter("compiled steps decode greedily; use --temperature 0 or --compile none",
                                 param_hint="--compile")
    mm, tokenizer = _load(model, _modes_needed(level_list), DTYPES[dtype], as_json)
    input_ids = _encode(tokenizer, prompt, chat)

    import specq

    streamer = None if as_json or compiled else TextStreamer(tokenizer)
    if compiled and not as_json:
        _report_compiles()
    try:
        out = specq.generate(mm, input_ids, max_new_tokens=max_new_tokens, levels=level_list, gamma=gamma_arg,
                             temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, streamer=streamer,
                             compile=compile_ if compiled else False)
    except (ValueError, NotImplementedError) as e:
        raise click.ClickException(str(e)) from e
    new = out.sequences[0, input_ids.shape[1]:input_ids.shape[1] + out.num_new_tokens[0]]
    if compiled and not as_json:
        click.echo(tokenizer.decode(new, skip_special_tokens=True), nl=False)
    if as_json:
        click.echo(json.dumps(dict(text=tokenizer.decode(new, skip_special_tokens=True), tokens=new.tolist(),
                                   levels=level_list, stats=out.stats.as_dict()), indent=2))
        return
    click.echo()
    if show_stats:
        click.echo(out.stats.table())
