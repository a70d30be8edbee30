"""`specq inspect DIR_OR_REPO`: modes, bytes per mode, recipe, layer table and format version.

Reads only config.json and the shard index (for a Hub repo, downloads only those two files).
"""

from __future__ import annotations

import json

import click


@click.command("inspect")
@click.argument("checkpoint")
@click.option("--revision", default=None, help="Branch, tag or commit of a Hub repo.")
@click.option("--layers/--no-layers", default=True, show_default=True, help="Print the per-layer table.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON on stdout.")
def inspect_cmd(checkpoint, revision, layers, as_json):
    """Show what a specq checkpoint (local directory or Hub repo id) holds."""
    from specq.cli.cmd_convert import fail
    from specq.hub.info import checkpoint_info

    try:
        info = checkpoint_info(checkpoint, revision=revision)
    except Exception as e:  # noqa: BLE001
        fail(e)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    rot = info["rotation"] or {}
    rot_text = rot.get("type", "none") + (f" online, blocks {rot.get('block_sizes')}" if rot.get("type") == "hadamard"
                                          else "")
    partial = sum(bool(e.get("modes")) for e in info["layers"])  # the head under lm_head_modes
    lines = [f"{info['source']}",
             f"  format version  {info['format_version']} (written by specq {info.get('specq_version')})",
             f"  model           {' '.join([info['model_type'] or '?'] + list(info.get('architectures') or []))}, dtype {info['dtype']}",
             f"  recipe          {info['recipe']}",
             f"  rotation        {rot_text}",
             f"  int4 groups     {info['group_sizes'].get('int4') if info.get('group_sizes') else '-'}",
             f"  layers          {info['quantized_layers']} of {len(info['layers'])} weight matmuls quantized"
             + (f" ({partial} of them in some modes only)" if partial else ""),
             f"  lm_head modes   {','.join(info.get('lm_head_modes') or []) or '- (float head in every mode)'}",
             "", f"  {'mode':<6} {'bytes':>14} {'MB':>10}"]
    for m, n in info["bytes_per_mode"].items():
        lines.append(f"  {m:<6} {n:>14,d} {n / 1e6:>10.2f}")
    lines += ["", f"  {'file':<44} {'group':<7} {'bytes':>12}"]
    for name, f in info["files"].items():
        lines.append(f"  {name:<44} {f['group']:<7} {f['size']:>12,d}")
    if layers:
        lines += ["", f"  {'module':<44} {'out x in':>13} {'action':<9} {'int4 g':>6} {'act g':>5} {'had':>4}"]
        for e in info["layers"]:
            shape = f"{e['out_features']}x{e['in_features']}"
            if e["action"] == "quantize":
                lines.append(f"  {e['module']:<44} {shape:>13} {'quantize':<9} {e['int4_group_size'] or '-':>6} "
                             f"{e['act_group_size'] if e['act_group_size'] is not None else '-':>5} "
                             f"{e['had_block'] or 0:>4}"
                             + (f"  w4a4 scale levels {e['w4a4_scale_levels']}" if e.get("w4a4_scale_levels") else "")
                             + (f"  only in {','.join(e['modes'])} (float in the other modes)" if e.get("modes")
                                else ""))
            else:
                lines.append(f"  {e['module']:<44} {shape:>13} {'keep':<9} ({e['reason']})")
    click.echo("\n".join(lines))
