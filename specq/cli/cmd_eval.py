"""`specq eval [MODEL]`: perplexity, weight bytes and draft agreement per mode, as a table (or JSON).

Thin: load (specq.load, or specq.from_pretrained for a specq checkpoint), transform to the requested
modes, call specq.evaluation.evaluate, print.
"""

from __future__ import annotations

import json
import sys

import click

from specq.cli.options import ALL_MODES, parse_lm_head_modes, parse_modes

DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32",
          "float16": "float16", "fp16": "float16"}


def _parse_pairs(text: str | None, modes) -> list[tuple[str, str]] | None:
    if text is None:
        return None
    pairs = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.split(":")
        if len(parts) != 2 or not all(parts):
            raise click.BadParameter(f"{item!r} is not DRAFT:VERIFIER (e.g. mxfp4:bf16)", param_hint="--pairs")
        for m in parts:
            if m not in modes:
                raise click.BadParameter(f"{item!r}: mode {m!r} is not among --modes {','.join(modes)}",
                                         param_hint="--pairs")
        pairs.append((parts[0], parts[1]))
    return pairs


def _load(model, modes, recipe, dtype, quiet, lm_head_modes=None):
    """(multi-mode model, tokenizer, display name)."""
    import torch

    import specq
    from specq.loading import DEFAULT_NAME, ModelLoadError, SpecqCheckpointError

    torch_dtype = getattr(torch, dtype)
    name = model or f"{DEFAULT_NAME} (embedded default)"
    try:
        base, tokenizer = specq.load(model, dtype=torch_dtype)
    except SpecqCheckpointError:
        if lm_head_modes is not None:
            raise click.UsageError("--lm-head-modes applies when converting; a specq checkpoint already has its "
                                   "head formats (see `specq inspect`)") from None
        from transformers import AutoTokenizer

        from specq.hub.checkpoint import from_pretrained  # the hub layer; imported only when needed
        from specq.hub.errors import HubError

        try:
            mm = from_pretrained(model, modes=modes, dtype=torch_dtype, progress=not quiet)
            tokenizer = AutoTokenizer.from_pretrained(model)
        except (OSError, ValueError, HubError) as e:
            raise click.ClickException(f"could not load the specq checkpoint {model}: {e}") from e
        return mm, tokenizer, name
    except ModelLoadError as e:
        raise click.ClickException(str(e)) from e
    modes = modes or ALL_MODES
    if not quiet:
        click.echo(f"specq eval: transforming {name} to modes {','.join(modes)} ...", err=True)
    try:
        mm = specq.transform(base, modes=modes, recipe=recipe, lm_head_modes=lm_head_modes)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise click.ClickException(f"could not transform {name}: {e}") from e
    return mm, tokenizer, name


@click.command("eval")
@click.argument("model", required=False)
@click.option("--modes", default=None,
              help="Comma-separated modes to transform for (or load from a specq checkpoint) and evaluate "
                   "[default: bf16,mxfp4,w4a16,w4a4; for a specq checkpoint, all it holds].")
@click.option("--pairs", default=None,
              help="Comma-separated DRAFT:VERIFIER mode pairs for the agreement table "
                   "[default: mxfp4:bf16,w4a4:w4a16, those within --modes].")
@click.option("--recipe", default=None, help="Recipe name or YAML path (default: the family's, else 'default').")
@click.option("--lm-head-modes", "lm_head_modes", metavar="MODES", default=None,
              help="Comma-separated quantized modes (mxfp4, w4a16, w4a4) in which the output head runs quantized "
                   "(float in the others, bf16 always) [default: the recipe's, a float head].")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="bfloat16", show_default=True,
              help="Dtype the model is loaded and run in.")
@click.option("--prompts", "n_prompts", type=click.IntRange(min=1), default=None,
              help="Use only the first N of the shipped prompts [default: all 16].")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Greedy continuation length per prompt.")
@click.option("--max-length", type=click.IntRange(min=2), default=512, show_default=True,
              help="Perplexity window, in tokens.")
@click.option("--gamma", type=click.IntRange(min=1), default=4, show_default=True,
              help="Draft length for the simulated tokens per verify round.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the JSON report to this file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output on stderr.")
def eval_cmd(model, modes, pairs, recipe, lm_head_modes, dtype, n_prompts, max_new_tokens, max_length, gamma,
             as_json, out, quiet):
    """Perplexity and weight bytes per mode, and greedy top-1 agreement of drafts with verifiers
    (MXFP4 -> BF16, W4A4 -> W4A16), on the text and prompt sets specq ships.

    MODEL is a Hub id, a local directory (Hugging Face format or a specq checkpoint) or a .gguf
    file; with none, the embedded default model.
    """
    from specq.evaluation import evaluate, load_eval_prompts

    modes = parse_modes(modes) if modes is not None else None
    pair_list = _parse_pairs(pairs, modes or ALL_MODES)
    lm_head_modes = parse_lm_head_modes(lm_head_modes, modes or ALL_MODES)
    mm, tokenizer, name = _load(model, modes, recipe, DTYPES[dtype], quiet, lm_head_modes)
    prompts = load_eval_prompts()
    if n_prompts is not None:
        prompts = prompts[:n_prompts]
    try:
        report = evaluate(mm, tokenizer, modes=modes, pairs=pair_list, prompts=prompts,
                          max_new_tokens=max_new_tokens, max_length=max_length, gamma=gamma,
                          progress=not quiet, name=name)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    data = report.to_dict()
    data["settings"]["prompt_set"] = "shipped" if n_prompts is None else f"shipped[:{n_prompts}]"
    if out:
        import os
        import tempfile

        folder = os.path.dirname(os.path.abspath(out))
        fd, tmp = tempfile.mkstemp(prefix=".eval-", suffix=".json", dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, out)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(report.format_table())
    sys.stdout.flush()
