"""Shared pieces of the Triton kernels: interpreter detection, launch-config choice with a cache.

The kernels run in two worlds:

- on a CUDA GPU, where each kernel picks its tile configuration by timing a small, bounded set of
  candidates once per (kernel, shape bucket) and caching the winner for the process and on disk
  (``DiskCache``: a later process on the same GPU model does not time again);
- under ``TRITON_INTERPRET=1`` (CPU CI), where there is nothing to time and the interpreter computes
  bf16/fp16 ``tl.dot`` wrongly, so the kernels take a ``DOT_FP32`` flag that upcasts dot operands.

``TRITON_INTERPRET`` is read when triton is imported, so this module reads it at import too: a
process either interprets every kernel or none (tests run the interpreter in a subprocess).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

log = logging.getLogger(__name__)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Programmatic dependent launch between the W4A4 pre-kernel and the Gluon GEMM (Hopper): the GEMM's prologue
# runs under the pre-kernel's tail. Off until it has run on a GPU (written 2026-12-08 in a session whose device
# was withdrawn: checked in SASS only); SPECQ_PDL=1 turns it on.
PDL_ENABLED = os.environ.get("SPECQ_PDL", "0") not in ("", "0") and not INTERPRET

# SPECQ_AUTOTUNE=0 skips timing and takes each candidate list's first entry (a sane default).
AUTOTUNE = os.environ.get("SPECQ_AUTOTUNE", "1") not in ("", "0") and not INTERPRET


def _fix_interpreter_scalar_index() -> None:
    """triton 3.6's interpreter turns a scalar into a Python int with ``int(array_of_shape_(1,))``,
    which numpy >= 2.4 rejects, so any loop bound that is a kernel argument (``range(0, K, BK)``)
    fails under TRITON_INTERPRET=1. Patch that one conversion (interpreter mode only)."""
    try:
        import numpy as np
        from triton.runtime import interpreter as interp
        orig = interp._patch_lang_tensor
    except (ImportError, AttributeError):
        return
    if getattr(orig, "_specq_patched", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._specq_patched = True
    interp._patch_lang_tensor = patched


if INTERPRET:
    _fix_interpreter_scalar_index()


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def m_bucket(m: int) -> int:
    """Autotune key for the number of rows: exact up to 16 (decode and verify sizes differ a lot
    there), then powers of two, so a prefill of any length reuses a handful of tuned entries."""
    return m if m <= 16 else min(next_pow2(m), 4096)


@dataclass(frozen=True)
class Config:
    """One launch configuration: constexpr meta-parameters plus num_warps / num_stages."""
    meta: tuple  # sorted (name, value) pairs
    num_warps: int = 4
    num_stages: int = 3

    @staticmethod
    def make(num_warps: int = 4, num_stages: int = 3, **meta) -> "Config":
        return Config(tuple(sorted(meta.items())), num_warps, num_stages)

    def kwargs(self) -> dict:
        return dict(self.meta, num_warps=self.num_warps, num_stages=self.num_stages)

    def __getitem__(self, name):
        return dict(self.meta)[name]


class DiskCache:
    """The autotuner's winners on disk, so a new process on the same GPU skips the timing: one JSON file
    per GPU model and Triton version under ``SPECQ_AUTOTUNE_CACHE`` (default ``~/.cache/specq/autotune``;
    empty or 0 turns it off), {cache name: {str(key): config}}. A stored config is used only while it is
    still among the kernel's candidates, so a changed candidate list re-tunes. Writes merge with what other
    processes stored and go to a temp file renamed into place; a file that cannot be read is ignored and
    one that cannot be written only logs."""

    def __init__(self, path: Optional[str] = None):
        self._path = path
        self._data: Optional[dict] = None

    def path(self) -> Optional[str]:
        if self._path is None:
            root = os.environ.get("SPECQ_AUTOTUNE_CACHE", os.path.join(
                os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "specq", "autotune"))
            if root in ("", "0") or not torch.cuda.is_available():
                self._path = ""
            else:
                import triton
                gpu = re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name()).strip("_")
                self._path = os.path.join(root, f"{gpu}-triton{triton.__version__}.json")
        return self._path or None

    def _read(self) -> dict:
        path = self.path()
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError, TypeError):
            return {}
        # only {name: {key: entry}} sections: a damaged one is dropped (and rewritten by the next store)
        return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}

    def lookup(self, name: str, key, candidates: Sequence["Config"]) -> Optional["Config"]:
        if self.path() is None:
            return None
        if self._data is None:
            self._data = self._read()
        entry = self._data.get(name, {}).get(str(key))
        if not isinstance(entry, dict):
            return None
        try:
            cfg = Config(tuple(sorted(entry["meta"].items())), int(entry["num_warps"]), int(entry["num_stages"]))
        except (KeyError, AttributeError, TypeError, ValueError):
            return None
        return cfg if cfg in candidates else None

    def store(self, name: str, key, cfg: "Config") -> None:
        path = self.path()
        if path is None:
            return
        data = self._read()  # merge with what other processes wrote since
        data.setdefault(name, {})[str(key)] = dict(meta=dict(cfg.meta), num_warps=cfg.num_warps,
                                                   num_stages=cfg.num_stages)
        self._data = data
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("specq: could not write the autotune cache %s (%s); set SPECQ_AUTOTUNE_CACHE to a "
                        "writable directory, or to 0 to turn it off", path, e)
            self._path = ""
            with contextlib.suppress(OSError):
                os.unlink(tmp)


DISK = DiskCache()


@dataclass
class ConfigCache:
    """Per-process cache of the fastest config for each key, backed by ``DISK``.

    ``pick(key, candidates, launch)`` returns the cached winner (this process's, else one stored on disk
    by an earlier process on the same GPU model), or times each candidate with
    ``launch(config)`` (which must run the kernel once, writing only its own outputs) and caches the
    fastest. Candidates that fail to compile (Triton rejects some tile shapes with a pass failure, not
    only with out-of-resources) are skipped. While a CUDA graph is being captured nothing can be
    timed: the first candidate that compiles is used and not cached, so a later eager call still tunes.
    """
    name: str
    best: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def pick(self, key, candidates: Sequence[Config], launch: Callable[[Config], None]) -> Config:
        hit = self.best.get(key)
        if hit is not None:
            return hit
        with self.lock:
            hit = self.best.get(key)
            if hit is not None:
                return hit
            if INTERPRET:  # nothing to time and nothing that fails to compile
                return candidates[0]
            stored = DISK.lookup(self.name, key, candidates) if AUTOTUNE else None
            if stored is not None:
                self.best[key] = stored
                return stored
            capturing = torch.cuda.is_current_stream_capturing()
            if not AUTOTUNE or len(candidates) == 1 or capturing:
                # no timing: the first candidate that compiles (Triton's compiler rejects some tile
                # shapes outright, e.g. a pass failure for a small SUB_K with a wide tile)
                best = self._first_that_compiles(candidates, launch)
                if not capturing:
                    self.best[key] = best
                return best
            from triton.testing import do_bench
            timings, last_error = [], None
            for cfg in candidates:
                try:
                    t = do_bench(lambda: launch(cfg), warmup=3, rep=15, return_mode="median")
                except Exception as e:  # noqa: BLE001  compile failure or out of resources: skip it
                    last_error = e
                    t = float("inf")
                timings.append(t)
            i = min(range(len(candidates)), key=timings.__getitem__)
            if timings[i] == float("inf"):
                raise RuntimeError(f"{self.name}: no launch configuration compiled for {key}") from last_error
            self.best[key] = candidates[i]
            DISK.store(self.name, key, candidates[i])
            return candidates[i]

    @staticmethod
    def _first_that_compiles(candidates: Sequence[Config], launch: Callable[[Config], None]) -> Config:
        last_error = None
        for cfg in candidates:
            try:
                launch(cfg)
                return cfg
            except Exception as e:  # noqa: BLE001  try the next configuration
                last_error = e
        raise RuntimeError("no launch configuration compiled") from last_error


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexprs that make tl.dot exact for ``dtype`` operands: the interpreter needs fp32 operands,
    and float32 inputs need IEEE fp32 products (not TF32) to match the float32 reference."""
    return {"DOT_FP32": INTERPRET, "IEEE": dtype == torch.float32}
