"""What a specq checkpoint holds, read from its config.json and index only (no tensor is loaded).

For a Hub repo, only those two small files are downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from specq.hub.checkpoint import CONFIG_FILE, bytes_per_mode, read_checkpoint_meta
from specq.hub.layout import INDEX_FILE, quantization_config


def checkpoint_info(path_or_repo: str | os.PathLike, *, revision: str | None = None, token: str | None = None,
                    endpoint: str | None = None) -> dict:
    """{source, format_version, modes, bytes_per_mode, recipe, rotation, formats, files, layers, ...}."""
    p = Path(os.fspath(path_or_repo)).expanduser()
    if p.is_dir():
        config, index = read_checkpoint_meta(p)
        where = str(p)
    else:
        config, index = _fetch_meta(os.fspath(path_or_repo), revision, token, endpoint)
        where = f"{path_or_repo}@{revision or 'main'}"
    q = quantization_config(config, where)
    plan = q["plan"]
    layers = []
    for e in plan["matmuls"]:
        layers.append({"module": e["module"], "out_features": e["out_features"], "in_features": e["in_features"],
                       "action": e["action"], "int4_group_size": e.get("int4_group_size"),
                       "act_group_size": e.get("act_group_size"), "had_block": e.get("had_block"),
                       "w4a4_scale_levels": e.get("w4a4_scale_levels") or 0,
                       "mxfp4_scale_rule": e.get("mxfp4_scale_rule"),
                       # quantized only in these modes (the head under lm_head_modes); None: in every one
                       "modes": e.get("modes"),
                       "reason": e.get("reason") if e["action"] != "quantize" or e.get("modes") else None})
    files = {}
    for name, meta in sorted(index.get("files", {}).items()):
        files[name] = {"group": meta.get("group"), "size": meta.get("size"), "sha256": meta.get("sha256")}
    return {"source": where, "format_version": q["format_version"], "specq_version": q.get("specq_version"),
            "model_type": config.get("model_type"), "architectures": config.get("architectures"),
            "dtype": plan.get("dtype"), "modes": q["modes"], "bytes_per_mode": bytes_per_mode(index, q["modes"]),
            "recipe": q.get("recipe"), "rotation": q.get("rotation"), "formats": q.get("formats"),
            "group_sizes": q.get("group_sizes"), "lm_head_modes": plan.get("lm_head_modes", []), "files": files,
            "quantized_layers": sum(1 for e in layers if e["action"] == "quantize"), "layers": layers}


def _fetch_meta(repo_id: str, revision, token, endpoint) -> tuple[dict, dict]:
    from huggingface_hub import HfApi, hf_hub_download

    from specq.hub.errors import CheckpointError
    from specq.hub.push import _hub_error

    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise CheckpointError(f"No such checkpoint directory: {repo_id!r} (and it is not a Hub repo id of the form "
                              "'namespace/name').")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        sha = api.repo_info(repo_id, revision=revision, repo_type="model").sha
        out = []
        for name in (CONFIG_FILE, INDEX_FILE):
            path = hf_hub_download(repo_id, name, revision=sha, token=token, endpoint=endpoint)
            out.append(json.loads(Path(path).read_text(encoding="utf-8")))
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, repo_id, api.endpoint, writing=False, revision=revision) from e
    return out[0], out[1]
