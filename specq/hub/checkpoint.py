"""save_pretrained / from_pretrained for multi-mode models (the layout is described in layout.py).

Saving writes only the tensors of the model's modes (a model transformed without "bf16" has no
float copy of its quantized matmuls), sharded by mode group, with a sha256 per shard in the index.
Everything is written into a temporary sibling directory that is renamed at the end, so a failure
(disk full, interrupt) leaves no partial checkpoint behind.

Loading rebuilds the model skeleton from config.json without initialising weights (transformers'
`no_init_weights`, so non-persistent buffers such as rotary tables are computed as usual), installs
EMPTY MultiModeLinears from the saved plan (`apply_plan(..., quantize=False)`), checks the shards it
needs against the index, and reads only those shards. Nothing is re-quantized: the loaded model is
the saved model, tensor for tensor, so its logits are identical in every mode.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from specq.hub.errors import CheckpointError
from specq.hub.layout import (COMMON, FORMAT_VERSION, INDEX_FILE, MODE_GROUPS, QUANT_METHOD, TENSOR_GROUP,
                              check_shards, file_sha256, files_for_groups, groups_for_modes, quantization_config,
                              resolve_modes, shard_name)

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


# ------------------------------------------------------------------------------------------------ save


def save_pretrained(model, save_directory: str | os.PathLike, *, tokenizer=None,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES, base_model: str | None = None,
                    eval_results: dict | None = None, card: bool = True, overwrite: bool = True,
                    progress: bool = False) -> Path:
    """Write the multi-mode `model` (from `specq.transform`) as a specq checkpoint into `save_directory`.

    tokenizer: saved alongside (recommended). base_model: the Hub id the model was converted from
    (for the model card). eval_results: {mode: {"perplexity": ..., "agreement": ...}} from
    `specq eval`, shown on the model card. overwrite: replace an existing specq checkpoint there
    (a non-empty directory that is not a specq checkpoint is never replaced).
    """
    from specq.transform.transform import PLAN_ATTR, multimode_linears

    plan = getattr(model, PLAN_ATTR, None)
    if plan is None:
        raise CheckpointError(f"{type(model).__name__} is not a specq multi-mode model (no specq_plan): "
                              "call specq.transform(model, modes=...) before saving.")
    target = Path(save_directory)
    _check_target(target, overwrite)
    modes = list(plan["modes"])
    max_bytes = _parse_size(max_shard_size)

    groups, aliases = _tensors_by_group(model, multimode_linears(model))
    quant = _quantization_config(model, plan)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        index = _write_shards(tmp, groups, aliases, max_bytes, progress)
        index["metadata"]["modes"] = modes
        _write_json(tmp / INDEX_FILE, index)
        config = model.config.to_dict()
        config["quantization_config"] = quant
        config["dtype"] = plan.get("dtype") or config.get("dtype")
        _write_json(tmp / CONFIG_FILE, config)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card:
            from specq.hub.card import render_card

            (tmp / "README.md").write_text(render_card(config, index, base_model=base_model,
                                                       eval_results=eval_results), encoding="utf-8")
        _make_readable(tmp)
        _replace_dir(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise CheckpointError(f"No space left on device while writing the checkpoint to {target}. Nothing was "
                                  "written there; free some space or choose another --out directory.") from e
        if isinstance(e, OSError):
            raise CheckpointError(f"Could not write the checkpoint to {target}: {e}. Nothing was written there.") from e
        raise
    logger.info("saved specq checkpoint (modes %s) to %s", ",".join(modes), target)
    return target


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory; choose another output path.")
    if target.is_dir() and any(target.iterdir()):
        is_specq = (target / INDEX_FILE).is_file() and (target / CONFIG_FILE).is_file()
        if not is_specq:
            raise CheckpointError(f"{target} is a non-empty directory that is not a specq checkpoint; refusing to "
                                  "replace it. Choose an empty or new output directory.")
        if not overwrite:
            raise CheckpointError(f"{target} already holds a specq checkpoint; pass overwrite=True to replace it.")


def _replace_dir(tmp: Path, target: Path) -> None:
    """Rename tmp -> target; an existing target is moved aside first and removed only after success."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a 0700 directory (and safetensors 0600 files); give them the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _tensors_by_group(model, mmls):
    """{group: {name: tensor}} of everything the checkpoint stores, and {alias: name} for tied tensors.

    A tied tensor (e.g. lm_head <-> embeddings) is stored once; if one of its names belongs to the
    common group it is stored there, so loading any subset of modes still finds it. The float weight
    of a module that runs float in a quantized mode too (the head under `lm_head_modes`) is common:
    modes other than bf16 need it.
    """
    mml_paths = {path for path, _ in mmls}
    float_beyond_bf16 = {path for path, m in mmls if any(x != "bf16" for x in m.float_modes)}

    def group_of(name):
        owner, _, attr = name.rpartition(".")
        if owner not in mml_paths or (attr == "weight" and owner in float_beyond_bf16):
            return COMMON
        return TENSOR_GROUP.get(attr, COMMON)

    by_storage: dict[tuple, list[str]] = {}
    tensors = model.state_dict()
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        by_storage.setdefault(key if t.numel() else ("empty", name), []).append(name)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    aliases: dict[str, str] = {}
    for names in by_storage.values():
        canonical = next((n for n in names if group_of(n) == COMMON), names[0])
        groups.setdefault(group_of(canonical), {})[canonical] = tensors[canonical]
        aliases.update({n: canonical for n in names if n != canonical})
    return groups, aliases


def _write_shards(tmp: Path, groups, aliases, max_bytes: int, progress: bool) -> dict:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    weight_map, files, group_bytes = {}, {}, {}
    total = sum(t.numel() * t.element_size() for g in groups.values() for t in g.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing shards", disable=not progress,
               file=sys.stderr)
    order = [g for g in (COMMON, "bf16", "mxfp4", "int4") if g in groups]
    for group in order:
        shards = _split(groups[group], max_bytes)
        group_bytes[group] = 0
        for i, shard in enumerate(shards, 1):
            name = shard_name(group, i, len(shards))
            payload = _unshare({k: v.detach().to("cpu").contiguous() for k, v in shard.items()})
            save_file(payload, str(tmp / name), metadata={"format": "pt"})  # one key: safetensors orders metadata by hash
            nbytes = sum(v.numel() * v.element_size() for v in payload.values())
            group_bytes[group] += nbytes
            files[name] = {"group": group, "size": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name),
                           "tensor_bytes": nbytes}
            weight_map.update({k: name for k in shard})
            bar.update(nbytes)
    bar.close()
    for alias, name in aliases.items():
        weight_map[alias] = weight_map[name]
    return {"metadata": {"total_size": total, "format": QUANT_METHOD, "format_version": FORMAT_VERSION,
                         "group_bytes": group_bytes},
            "weight_map": dict(sorted(weight_map.items())), "files": files, "aliases": aliases}


def _split(tensors: dict, max_bytes: int) -> list[dict]:
    shards, cur, size = [], {}, 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += n
    if cur or not shards:
        shards.append(cur)
    return shards


def _unshare(tensors: dict) -> dict:
    """safetensors refuses tensors sharing memory within one file; clone all but the first of each."""
    seen, out = set(), {}
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    return out


def _quantization_config(model, plan: dict) -> dict:
    """config.json's quantization_config: what a reader needs to know without opening the plan."""
    import specq

    from specq.passes.plan import entry_modes

    modes = list(plan["modes"])
    quantized = [e for e in plan["matmuls"] if e["action"] == "quantize"]
    in_mode = {m: [e for e in quantized if m in entry_modes(e, modes)] for m in ("mxfp4", "w4a4")}
    int4_entries = [e for e in quantized if {"w4a16", "w4a4"} & set(entry_modes(e, modes))]
    formats = {}
    if "bf16" in modes:
        formats["bf16"] = {"format": "dense", "dtype": plan.get("dtype")}
    if "mxfp4" in modes:
        formats["mxfp4"] = {"format": "mxfp4", "element": "e2m1", "scale": "e8m0", "block_size": 32,
                            "scale_rules": sorted({e.get("mxfp4_scale_rule") or "floor" for e in in_mode["mxfp4"]}),
                            "tensors": ["mxfp4_packed", "mxfp4_scales"]}
    int4_groups = sorted({e["int4_group_size"] for e in int4_entries if e.get("int4_group_size")})
    if "w4a16" in modes or "w4a4" in modes:
        int4 = {"format": "int4", "symmetric": True, "group_sizes": int4_groups, "packing": "int32-lsb-first",
                "tensors": ["int4_packed", "int4_scales"], "shared_with": [m for m in ("w4a16", "w4a4") if m in modes]}
        if "w4a16" in modes:
            formats["w4a16"] = dict(int4, activations="dense")
        if "w4a4" in modes:
            formats["w4a4"] = dict(int4, activations="int4-dynamic-symmetric",
                                   act_group_sizes=sorted({e.get("act_group_size") or 0 for e in in_mode["w4a4"]}),
                                   # 0: the group scales as stored; L: snapped to multiples 0..L of a row unit
                                   scale_levels=sorted({e.get("w4a4_scale_levels") or 0 for e in in_mode["w4a4"]}))
    blocks = sorted({e.get("had_block") or 0 for e in int4_entries})
    rotation = {"type": "hadamard", "online": True, "applies_to": ["w4a16", "w4a4"], "block_sizes": blocks,
                "convention": "W_rot = W @ H (block-diagonal along K); y = (x @ H) @ W_rot.T"}
    if blocks == [0] or not blocks:
        rotation = {"type": "none"}
    out = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "specq_version": specq.__version__,
           "modes": modes, "formats": formats, "group_sizes": {"int4": int4_groups, "mxfp4": 32},
           "recipe": plan.get("recipe"), "rotation": rotation, "plan": plan}
    if plan.get("lm_head_modes"):  # the output head is quantized in these modes only (float in the others)
        out["lm_head_modes"] = list(plan["lm_head_modes"])
    return out


# ------------------------------------------------------------------------------------------------ load


def from_pretrained(path_or_repo: str | os.PathLike, modes=None, revision: str | None = None, *,
                    dtype=None, device: str | torch.device = "cpu", token: str | None = None,
                    endpoint: str | None = None, cache_dir: str | os.PathLike | None = None, verify: bool = True,
                    progress: bool = False):
    """Load a specq checkpoint (a local directory or a Hub repo id) as a multi-mode model.

    modes: the subset of the checkpoint's modes to load (None: all); only their shards are read
    (and downloaded). revision: branch, tag or commit sha on the Hub. verify: check every shard read
    against the sha256 in the index. The model is returned in eval mode, in mode "bf16" if loaded,
    else the first loaded mode.
    """
    folder = resolve_checkpoint(path_or_repo, modes=modes, revision=revision, token=token, endpoint=endpoint,
                                cache_dir=cache_dir, progress=progress)
    config, index = read_checkpoint_meta(folder)
    q = quantization_config(config, str(path_or_repo))
    modes = resolve_modes(q["modes"], modes, str(path_or_repo))
    files = files_for_groups(index, groups_for_modes(modes))
    check_shards(folder, index, files, verify=verify)

    model = build_skeleton(folder, config, dtype)
    from specq.transform.transform import apply_plan

    apply_plan(model, q["plan"], quantize=False, modes=modes)
    expected = set(model.state_dict().keys())
    # the float weight of a head quantized in lm_head_modes is common (other quantized modes run it
    # float); a load of only its quantized modes has no use for it
    unused = {f"{e['module']}.weight" for e in q["plan"]["matmuls"] if e.get("modes")} - expected
    state = _read_shards(folder, files, progress, skip=unused)
    for alias, name in (index.get("aliases") or {}).items():
        if alias in expected and name in state:
            state[alias] = state[name]
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path_or_repo}: the shards do not match the model built from its config and plan "
                              f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                              f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}). The checkpoint is damaged "
                              "or was written by an incompatible specq.")
    target_dtype = _as_dtype(dtype)
    if target_dtype is not None:
        state = {k: v.to(target_dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.config.quantization_config = q
    return model.to(device).eval()


def resolve_checkpoint(path_or_repo, *, modes=None, revision=None, token=None, endpoint=None, cache_dir=None,
                       progress=False) -> Path:
    """A local folder holding the checkpoint: the path itself, or a (partial) download from the Hub."""
    p = Path(os.fspath(path_or_repo)).expanduser()
    if p.is_dir():
        if revision is not None:
            raise CheckpointError(f"revision={revision!r} applies to Hub repos, but {p} is a local directory.")
        return p
    if p.exists():
        raise CheckpointError(f"{p} is a file; a specq checkpoint is a directory (or a Hub repo id).")
    name = os.fspath(path_or_repo)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"No such checkpoint directory: {name!r} (and it is not a Hub repo id of the form "
                              "'namespace/name').")
    from specq.hub.push import pull

    return pull(name, modes=modes, revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir,
                progress=progress)


def read_checkpoint_meta(folder: Path) -> tuple[dict, dict]:
    out = []
    for name in (CONFIG_FILE, INDEX_FILE):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder} has no {name}: it is not a specq checkpoint (write one with "
                                  "`specq convert`).")
        try:
            out.append(json.loads(path.read_text(encoding="utf-8")))
        except ValueError as e:
            raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged.") from e
    return out[0], out[1]


def build_skeleton(folder: Path, config: dict, dtype=None):
    """The model class of config.json, with uninitialised weights (they are all overwritten by the load)."""
    import transformers
    from transformers.initialization import no_init_weights

    cfg_dict = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = cfg_dict.pop("model_type", None)
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **cfg_dict)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{folder}: model_type {model_type!r} is not supported by this transformers "
                              f"({transformers.__version__}): {e}") from e
    torch_dtype = _as_dtype(dtype) or _as_dtype(config.get("dtype")) or torch.float32
    try:
        with no_init_weights():
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    except ValueError as e:
        raise CheckpointError(f"{folder}: unsupported architecture: {e}") from e
    gen_file = folder / "generation_config.json"
    if gen_file.is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    return model


def _read_shards(folder: Path, files, progress: bool, skip=()) -> dict:
    from safetensors import safe_open
    from tqdm.auto import tqdm

    state = {}
    for name in tqdm(files, desc="reading shards", disable=not progress, file=sys.stderr):
        with safe_open(str(folder / name), framework="pt", device="cpu") as f:
            for k in f.keys():
                if k not in skip:
                    state[k] = f.get_tensor(k)
    return state


def bytes_per_mode(index: dict, modes) -> dict[str, int]:
    """Checkpoint bytes a mode needs (its groups + common tensors), from the index."""
    gb = index.get("metadata", {}).get("group_bytes", {})
    return {m: gb.get(COMMON, 0) + sum(gb.get(g, 0) for g in MODE_GROUPS[m]) for m in modes}


def _as_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    for unit, mult in (("GB", 10**9), ("GIB", 1024**3), ("MB", 10**6), ("MIB", 1024**2), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
