"""The on-disk layout of a specq checkpoint: which tensors go to which shard, and the index.

A checkpoint folder holds

    config.json                      the model's config + quantization_config (quant_method "specq")
    model.safetensors.index.json     weight_map (tensor -> shard, as transformers expects) and, per shard,
                                     its group, size and sha256 (checked before a shard is read)
    model-common-00001-of-00001.safetensors   tensors every mode needs (embeddings, norms, biases, ...)
    model-bf16-*.safetensors         the model's own weights of the converted matmuls (mode bf16)
    model-mxfp4-*.safetensors        mxfp4_packed / mxfp4_scales (mode mxfp4)
    model-int4-*.safetensors         int4_packed / int4_scales (ONE copy, modes w4a16 and w4a4)
    generation_config.json, tokenizer files, README.md

Shards are grouped by mode so that loading a subset of modes opens only those files, and a Hub pull
downloads only those files. A group appears only when a requested mode needs it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from specq.hub.errors import CheckpointError, FormatVersionError

FORMAT_VERSION = 1
QUANT_METHOD = "specq"
INDEX_FILE = "model.safetensors.index.json"
ALL_MODES = ("bf16", "mxfp4", "w4a16", "w4a4")
COMMON = "common"
# mode -> the shard groups it reads besides "common"
MODE_GROUPS = {"bf16": ("bf16",), "mxfp4": ("mxfp4",), "w4a16": ("int4",), "w4a4": ("int4",)}
# MultiModeLinear tensor attribute -> shard group (anything else, e.g. bias, is common)
TENSOR_GROUP = {"weight": "bf16", "mxfp4_packed": "mxfp4", "mxfp4_scales": "mxfp4",
                "int4_packed": "int4", "int4_scales": "int4"}


def shard_name(group: str, i: int, n: int) -> str:
    return f"model-{group}-{i:05d}-of-{n:05d}.safetensors"


def groups_for_modes(modes) -> list[str]:
    groups = [COMMON]
    for m in modes:
        for g in MODE_GROUPS[m]:
            if g not in groups:
                groups.append(g)
    return groups


def quantization_config(config: dict, where: str = "checkpoint") -> dict:
    """The checkpoint's quantization_config, validated (method, format version, modes)."""
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{where} is not a specq checkpoint (config.json has no quantization_config with "
                              f'quant_method "{QUANT_METHOD}"). Convert a model with `specq convert` first.')
    version = q.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{where}: quantization_config has no integer format_version.")
    if version > FORMAT_VERSION:
        raise FormatVersionError(f"{where} uses specq checkpoint format version {version}, but this specq reads "
                                 f"versions up to {FORMAT_VERSION}. Upgrade specq (pip install -U specq).")
    modes = q.get("modes")
    if not isinstance(modes, list) or not modes or any(m not in ALL_MODES for m in modes):
        raise CheckpointError(f"{where}: quantization_config.modes must be a non-empty subset of {ALL_MODES}, "
                              f"got {modes!r}.")
    return q


def resolve_modes(stored, requested, where: str = "checkpoint") -> list[str]:
    """Requested modes (None: all stored), validated against what the checkpoint holds, in stored order."""
    if requested is None:
        return list(stored)
    if isinstance(requested, str):
        requested = [m.strip() for m in requested.split(",") if m.strip()]
    requested = list(dict.fromkeys(requested))
    unknown = [m for m in requested if m not in ALL_MODES]
    if unknown:
        raise CheckpointError(f"Unknown mode(s) {unknown}; modes are {', '.join(ALL_MODES)}.")
    missing = [m for m in requested if m not in stored]
    if missing:
        raise CheckpointError(f"{where} does not hold mode(s) {missing}; it holds {', '.join(stored)}. "
                              "Re-convert with those modes (specq convert --modes ...).")
    if not requested:
        raise CheckpointError("Ask for at least one mode.")
    return [m for m in stored if m in requested]


def files_for_groups(index: dict, groups) -> list[str]:
    files = index.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{INDEX_FILE} has no 'files' table; the checkpoint is damaged or not from specq.")
    return [f for f, meta in files.items() if meta.get("group") in groups]


def shard_files_to_skip(config: dict, index: dict, modes) -> list[str]:
    """Shard files a download can leave out when only `modes` will be loaded."""
    q = quantization_config(config)
    wanted = resolve_modes(q["modes"], modes)
    keep = set(files_for_groups(index, groups_for_modes(wanted)))
    return sorted(f for f in index.get("files", {}) if f not in keep)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_shards(folder: Path, index: dict, files, verify: bool = True) -> None:
    """Every needed shard exists, has the recorded size and (if `verify`) the recorded sha256."""
    for name in files:
        meta = index["files"][name]
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"Shard {name} is missing from {folder}. Re-download the checkpoint "
                                  "(specq.from_pretrained / `specq convert` again), or load only modes it holds.")
        if path.stat().st_size != meta.get("size"):
            raise CheckpointError(f"Shard {name} in {folder} has {path.stat().st_size} bytes, the index says "
                                  f"{meta.get('size')}: the file is truncated or corrupt. Re-download it.")
        if verify and file_sha256(path) != meta.get("sha256"):
            raise CheckpointError(f"Shard {name} in {folder} fails its sha256 checksum: the file is corrupt. "
                                  "Re-download or re-convert the checkpoint.")
