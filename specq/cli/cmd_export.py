"""`specq export DIR --format compressed-tensors --mode w4a16|mxfp4 --out OUT`: for vLLM and friends."""

from __future__ import annotations

import json

import click


@click.command("export")
@click.argument("checkpoint")
@click.option("--format", "fmt", type=click.Choice(["compressed-tensors"]), default="compressed-tensors",
              show_default=True, help="Target checkpoint format.")
@click.option("--mode", type=click.Choice(["w4a16", "mxfp4"]), required=True, help="Which mode to export.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output directory (new or empty).")
@click.option("--requantize", is_flag=True,
              help="w4a16 of a rotated checkpoint: quantize the bf16 weights again without rotation "
                   "(a plain W4A16 model, not bit-identical to specq's w4a16 mode).")
@click.option("--revision", default=None, help="Branch, tag or commit when CHECKPOINT is a Hub repo.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def export(checkpoint, fmt, mode, out, requantize, revision, quiet, as_json):
    """Export one mode of a specq checkpoint (local directory or Hub repo id)."""
    from specq.cli.cmd_convert import fail
    from specq.hub.export import export_compressed_tensors

    try:
        path = export_compressed_tensors(checkpoint, out, mode, requantize=requantize, revision=revision,
                                         progress=not quiet)
    except Exception as e:  # noqa: BLE001
        fail(e)
    config = json.loads((path / "config.json").read_text())
    q = config["quantization_config"]
    if as_json:
        click.echo(json.dumps({"out": str(path), "format": q["format"], "mode": mode,
                               "quantized_modules": sum(len(g["targets"]) for g in q["config_groups"].values()),
                               "ignore": q["ignore"]}, indent=2))
        return
    n = sum(len(g["targets"]) for g in q["config_groups"].values())
    click.echo(f"exported {mode} of {checkpoint} to {path} ({fmt}, format {q['format']}, {n} quantized modules, "
               f"{len(q['ignore'])} kept dense)")
