"""`specq convert [MODEL]`: write a multi-mode specq checkpoint (and push it to the Hub).

Thin: parse options, call specq.hub.convert.convert, print a summary (or JSON). Exit codes are those
of specq.hub.errors (2 usage, 3 checkpoint/disk, 5 Hub, 7 model load, 8 transform, ...).
"""

from __future__ import annotations

import json
import sys

import click

from specq.cli.options import ALL_MODES, parse_lm_head_modes, parse_modes

DTYPES = ("bfloat16", "float16", "float32")


def fail(e: BaseException, quiet: bool = False):
    """Print one clear line for a known error and exit with its code."""
    from specq.hub.errors import EXIT_TRANSFORM, exit_code_for

    code = exit_code_for(e)
    if code == 1 and isinstance(e, (ValueError, TypeError)):
        code = EXIT_TRANSFORM
    text = str(e).strip()
    lines = text.splitlines()
    if len(lines) > 2 or len(text) > 1200:  # e.g. transformers' list of every supported config class
        text = "\n".join(lines[:2])[:1200] + " [...]"
    click.echo(f"error: {text}", err=True)
    sys.exit(code)


@click.command("convert")
@click.argument("model", required=False)
@click.option("--modes", default=",".join(ALL_MODES), show_default=True, help="Comma-separated modes to store.")
@click.option("--recipe", default=None, help="Recipe name or YAML path (default: the family's, else 'default').")
@click.option("--lm-head-modes", "lm_head_modes", metavar="MODES", default=None,
              help="Comma-separated quantized modes (mxfp4, w4a16, w4a4) in which the output head (lm_head) "
                   "runs quantized; it stays float in the others, bf16 always [default: the recipe's "
                   "lm_head_modes, i.e. a float head in every mode]. E.g. mxfp4 for faster MXFP4 drafts.")
@click.option("--w4a4-scale-levels", "w4a4_scale_levels", type=click.IntRange(0, 16), default=None,
              help="W4A4 snaps its weight and activation group scales to integer multiples 0..N of one unit per "
                   "row / token, so INT8 tensor cores sum all of K in int32 (16: the finest; 0: off) "
                   "[default: the recipe's w4a4_scale_levels, 16].")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output directory [default: ./<model name>-specq, unless only --push-to-hub is given].")
@click.option("--push-to-hub", "push_to_hub", metavar="REPO", default=None,
              help="Also upload the checkpoint to this Hub repo (created if needed), in one commit.")
@click.option("--private", is_flag=True, help="Create the Hub repo private.")
@click.option("--dtype", type=click.Choice(DTYPES), default="bfloat16", show_default=True,
              help="Dtype of the model's own weights (mode bf16) and of the INT4 scales.")
@click.option("--eval/--no-eval", "do_eval", default=True, show_default=True,
              help="Measure perplexity and draft agreement per mode (specq eval) for the model card.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or status lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def convert(model, modes, recipe, lm_head_modes, w4a4_scale_levels, out, push_to_hub, private, dtype, do_eval, quiet,
            as_json):
    """Convert MODEL (Hub id, local dir or .gguf; none = embedded default model) to a specq checkpoint."""
    modes = parse_modes(modes)
    lm_head_modes = parse_lm_head_modes(lm_head_modes, modes)
    if out is None and push_to_hub is None:
        from pathlib import Path

        name = Path(model).stem if model else "SmolLM2-135M-Instruct"
        out = f"{name.split('/')[-1]}-specq"

    # one bar over the stages (loading, quantizing, ...); the stages' own bars (writing bytes, uploading,
    # evaluation steps) appear under it. All on stderr, so --json output on stdout stays clean.
    from tqdm.auto import tqdm

    stages = ["loading", "quantizing"] + (["evaluating"] if do_eval else []) + ["writing"] + \
        (["uploading"] if push_to_hub else [])
    bar = tqdm(total=len(stages), desc="specq convert", unit="stage", file=sys.stderr, disable=quiet,
               bar_format="{desc} [{n_fmt}/{total_fmt}] {elapsed}")

    def on_stage(name):
        bar.set_description_str(f"specq convert: {name}", refresh=False)
        if bar.n < stages.index(name):
            bar.update(stages.index(name) - bar.n)

    from specq.hub.convert import convert as run

    try:
        result = run(model, modes=modes, recipe=recipe, lm_head_modes=lm_head_modes,
                     w4a4_scale_levels=w4a4_scale_levels, out=out,
                     push_to_hub=push_to_hub, private=private,
                     dtype=dtype, evaluate=do_eval, progress=not quiet, on_stage=on_stage)
        bar.set_description_str("specq convert: done", refresh=False)
        bar.update(len(stages) - bar.n)
    except KeyboardInterrupt:
        bar.close()
        click.echo("interrupted; nothing was left in the output directory", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 -- every known error becomes one line and an exit code
        bar.close()
        fail(e, quiet)
    bar.close()
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    lines = [f"converted {result.model}: modes {','.join(result.modes)}"]
    if result.out:
        lines.append(f"  written to {result.out} ({result.files} files)")
    for m, n in result.bytes_per_mode.items():
        r = (result.eval_results or {}).get(m, {})
        extra = f"  perplexity {r['perplexity']:.3f}" if r.get("perplexity") is not None else ""
        if r.get("agreement") is not None:
            extra += f"  agreement {r['agreement']:.3f} vs {r['verifier']}"
        lines.append(f"  {m:<6} {n / 1e6:10.2f} MB{extra}")
    if result.repo_id:
        lines.append(f"  pushed to {result.repo_id} @ {result.commit_sha[:12]}  {result.commit_url}")
    click.echo("\n".join(lines))
