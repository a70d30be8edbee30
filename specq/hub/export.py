"""Export one mode of a specq checkpoint as a compressed-tensors checkpoint (for vLLM and friends).

compressed-tensors stores a quantized Linear `L` as
    L.weight_packed   the packed 4-bit values
    L.weight_scale    per-group scales
    L.weight_shape    int32 [2] = [out_features, in_features]        (pack-quantized only)
and describes the scheme in config.json's quantization_config (quant_method "compressed-tensors",
"format", "config_groups" with per-group `weights` quantization args and `targets`, and "ignore").

specq stores its formats in those very layouts (see specq/formats), so export is a rename:
    w4a16 -> "pack-quantized":        int4_packed (int32 [N, K/8], q+8 LSB-first) -> weight_packed,
                                      int4_scales ([N, K/g], model dtype)          -> weight_scale
    mxfp4 -> "mxfp4-pack-quantized":  mxfp4_packed (uint8 [N, K/2], even element low nibble) -> weight_packed,
                                      mxfp4_scales (uint8 E8M0 [N, K/32])                     -> weight_scale

Rotation: specq's INT4 weights are quantized from W @ H and the runtime rotates activations online;
an engine reading compressed-tensors does not. So a rotated w4a16 export is refused, unless
`requantize=True` and the checkpoint holds the bf16 weights: then each matmul is quantized again
from its unrotated weight (same group size). That model is a plain W4A16 model, NOT bit-identical
to specq's w4a16 mode; the export's README says so.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from specq.hub.errors import ExportError
from specq.hub.layout import check_shards, files_for_groups, groups_for_modes, quantization_config, resolve_modes

logger = logging.getLogger(__name__)

EXPORT_MODES = ("w4a16", "mxfp4")
FORMAT_NAME = {"w4a16": "pack-quantized", "mxfp4": "mxfp4-pack-quantized"}


def export_compressed_tensors(src: str | os.PathLike, out: str | os.PathLike, mode: str, *,
                              requantize: bool = False, revision: str | None = None, token: str | None = None,
                              endpoint: str | None = None, max_shard_size: int | str = "5GB",
                              progress: bool = False) -> Path:
    """Write `mode` of the specq checkpoint `src` (dir or Hub id) to `out` in compressed-tensors layout."""
    from specq.hub.checkpoint import _make_readable, _read_shards, _replace_dir, read_checkpoint_meta, \
        resolve_checkpoint

    if mode not in EXPORT_MODES:
        raise ExportError(f"compressed-tensors export supports modes {', '.join(EXPORT_MODES)}, not {mode!r} "
                          "(w4a4 needs specq's online activation quantization and rotation).")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory; choose a new --out path.")
    folder = resolve_checkpoint(src, modes=None, revision=revision, token=token, endpoint=endpoint,
                                progress=progress)
    config, index = read_checkpoint_meta(folder)
    q = quantization_config(config, str(src))
    plan = q["plan"]
    from specq.passes.plan import entry_modes

    # a head quantized only in lm_head_modes is exported quantized in those modes, unless it is tied to the
    # input embedding (engines re-tie lm_head to the float embedding): then it stays float, in "ignore"
    entries = [e for e in plan["matmuls"] if mode in entry_modes(e, plan["modes"])
               and not (e.get("modes") and e.get("tied_to_embedding"))]
    float_heads = [e for e in plan["matmuls"] if e.get("modes") and e not in entries]
    rotated = [e["module"] for e in entries if e.get("had_block")]
    need = [mode]
    if mode == "w4a16" and rotated:
        if not requantize:
            raise ExportError(
                f"Cannot export w4a16: the INT4 weights of {len(rotated)} matmuls (e.g. {rotated[0]}) were quantized "
                f"after a Hadamard rotation (blocks of {sorted({e['had_block'] for e in entries if e.get('had_block')})}) that specq "
                "applies to activations online, and vLLM / compressed-tensors cannot apply it. Either re-convert with a "
                "recipe without rotation (had_block: 0), or pass --requantize to quantize the bf16 weights again "
                "without rotation (needs mode bf16 in the checkpoint; the result is a plain W4A16 model).")
        if "bf16" not in q["modes"]:
            raise ExportError("--requantize needs the bf16 weights, but this checkpoint holds only modes "
                              f"{', '.join(q['modes'])}. Re-convert with --modes including bf16, or with a recipe "
                              "without rotation (had_block: 0).")
        need = ["bf16"]
    elif mode not in q["modes"]:
        raise ExportError(f"{src} does not hold mode {mode!r} (it holds {', '.join(q['modes'])}); re-convert with "
                          f"--modes including {mode}.")
    conv1d = [e["module"] for e in entries if e["layout"] != "out_in"]
    if conv1d:
        raise ExportError(f"Cannot export {conv1d[0]} (and {len(conv1d) - 1} more): its weight is stored [in, out] "
                          "(a transformers Conv1D, e.g. GPT-2), which compressed-tensors' packed Linear layout does "
                          "not describe.")
    need = resolve_modes(q["modes"], need, str(src))
    files = files_for_groups(index, groups_for_modes(need))
    check_shards(folder, index, files)
    state = _read_shards(folder, files, progress)
    if not config.get("tie_word_embeddings", False):  # tied names are re-tied by the loader: store them once
        for alias, name in (index.get("aliases") or {}).items():
            if name in state:
                state[alias] = state[name].clone()

    for e in float_heads:  # their packed tensors (of other modes) are not part of the export
        for k in ("mxfp4_packed", "mxfp4_scales", "int4_packed", "int4_scales"):
            state.pop(f"{e['module']}.{k}", None)
    tensors, groups = _convert(state, entries, mode, requantize and mode == "w4a16" and bool(rotated))
    kept = sorted(e["module"] for e in plan["matmuls"] if e["action"] != "quantize" or e in float_heads)
    out_config = {k: v for k, v in config.items() if k != "quantization_config"}
    out_config["quantization_config"] = compressed_tensors_config(mode, groups, kept)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        from safetensors.torch import save_file

        _save_sharded(tensors, tmp, max_shard_size, save_file)
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
        for name in os.listdir(folder):  # tokenizer files, generation config, chat template, ...
            if name in ("config.json", "README.md") or name.endswith(".safetensors") or name.endswith(".index.json"):
                continue
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)
        (tmp / "README.md").write_text(_readme(src, mode, requantize and bool(rotated)))
        _make_readable(tmp)
        if out.exists():
            out.rmdir()
        _replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ExportError(f"Could not write {out}: {e}. Nothing was written there.") from e
        raise
    return out


def _save_sharded(tensors: dict, folder: Path, max_shard_size, save_file) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json (HF convention)."""
    from specq.hub.checkpoint import _parse_size, _split

    shards = _split(dict(sorted(tensors.items())), _parse_size(max_shard_size))
    if len(shards) == 1:
        save_file({k: v.contiguous() for k, v in shards[0].items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(v.numel() * v.element_size() for v in shard.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def _convert(state: dict, entries: list, mode: str, requantize: bool):
    """Rename (or, with requantize, re-quantize) every quantized matmul; returns tensors and group sizes."""
    tensors = dict(state)
    groups: dict[int, list[str]] = {}
    for e in entries:
        m = e["module"]
        if mode == "mxfp4":
            packed, scales, group = tensors.pop(f"{m}.mxfp4_packed"), tensors.pop(f"{m}.mxfp4_scales"), 32
        elif requantize:
            from specq.formats import int4

            w = tensors.pop(f"{m}.weight")
            group = e["int4_group_size"]
            packed, scales = int4.quantize(w.contiguous(), group)
            scales = scales.to(w.dtype)
        else:
            packed, scales, group = tensors.pop(f"{m}.int4_packed"), tensors.pop(f"{m}.int4_scales"), \
                e["int4_group_size"]
        tensors.pop(f"{m}.weight", None)  # a bf16 copy, if the checkpoint has one, is not part of the export
        for k in (f"{m}.mxfp4_packed", f"{m}.mxfp4_scales", f"{m}.int4_packed", f"{m}.int4_scales"):
            tensors.pop(k, None)
        tensors[f"{m}.weight_packed"] = packed
        tensors[f"{m}.weight_scale"] = scales
        if mode == "w4a16":
            tensors[f"{m}.weight_shape"] = torch.tensor([e["out_features"], e["in_features"]], dtype=torch.int32)
        groups.setdefault(group, []).append(m)
    return tensors, groups


def compressed_tensors_config(mode: str, groups: dict[int, list[str]], ignore: list[str]) -> dict:
    """quantization_config of a compressed-tensors checkpoint: one config group per group size."""
    fmt = FORMAT_NAME[mode]
    config_groups = {}
    for i, (group_size, modules) in enumerate(sorted(groups.items())):
        weights = {"num_bits": 4, "type": "int" if mode == "w4a16" else "float", "symmetric": True,
                   "group_size": group_size, "strategy": "group", "block_structure": None, "dynamic": False,
                   "actorder": None, "observer": "minmax", "observer_kwargs": {}}
        if mode == "mxfp4":
            weights.update(scale_dtype="torch.uint8", zp_dtype="torch.uint8")
        config_groups[f"group_{i}"] = {"targets": sorted(modules), "weights": weights, "input_activations": None,
                                       "output_activations": None, "format": fmt}
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": sorted(ignore), "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}}


def _readme(src, mode: str, requantized: bool) -> str:
    note = ("The INT4 weights were quantized again from the bf16 weights WITHOUT specq's Hadamard rotation, so this "
            "model is a plain W4A16 model: it does not reproduce specq's w4a16 mode bit for bit.\n"
            if requantized else
            f"The packed tensors are specq's {mode} tensors, renamed: this model computes what specq's {mode} mode "
            "computes (up to the engine's kernels).\n")
    return (f"---\nlibrary_name: transformers\ntags: [\"compressed-tensors\", \"specq\", \"{mode}\"]\n---\n\n"
            f"# {mode} export of {src}\n\nWritten by `specq export --format compressed-tensors --mode {mode}` "
            f"({FORMAT_NAME[mode]}), for engines that read compressed-tensors checkpoints (e.g. vLLM).\n\n{note}")
