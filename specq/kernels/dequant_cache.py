"""A cache of weights derived from packed ones: dequantized copies (reference ops) and kernel layouts.

Why: where no 4-bit kernel reads our packed layout directly (the CPU), an op must first turn the
packed weight into something it can multiply with: the reference ops dequantize the whole weight,
the CPU INT4 kernel (cpu_int4.py) repacks it into aten's int4pack tiles. Doing that on every call
costs, for decoding, one full conversion of every matrix per token — on the default model about 50x
the cost of the matmul itself. Keeping the derived copy next to the packed one trades memory for
speed; the numbers are unchanged (the cached tensor is exactly what the conversion returns).

Entries are keyed by the identity of the packed tensor and a tag (what was derived, in which dtype),
and invalidated when the packed tensor or its scales are written in place (their version counters
and storage pointers) or freed (a weakref callback drops the entries). Compiled code (inductor) passes
the module's own buffer objects to the ops, so the same entries serve eager and compiled steps.
Set SPECQ_DEQUANT_CACHE=0 to stop caching dequantized weights (then every call dequantizes, as
before); the int4pack layout has its own switch (SPECQ_INT4_CPU=0 turns that kernel off).
"""

from __future__ import annotations

import collections
import os
import threading
import weakref
from typing import Callable, Hashable

import torch

_lock = threading.Lock()
_entries: dict[tuple[int, Hashable], tuple] = {}
_watched: set[int] = set()  # ids of packed tensors with a finalizer registered


def enabled() -> bool:
    return os.environ.get("SPECQ_DEQUANT_CACHE", "1") != "0"


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter; they cannot be written in place
        return -1


def cached(packed: torch.Tensor, scales: torch.Tensor, tag: Hashable, build: Callable[[], object]):
    """`build()`, remembered under (packed, tag) while `packed` lives and neither tensor changes."""
    if torch.is_grad_enabled() and (packed.requires_grad or scales.requires_grad):
        return build()
    pid = id(packed)
    key = (pid, tag)
    stamp = (packed.data_ptr(), _version(packed), scales.data_ptr(), _version(scales), tuple(packed.shape))
    with _lock:
        hit = _entries.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    with torch.no_grad():
        value = build()
    with _lock:
        new = pid not in _watched
        _watched.add(pid)
        _entries[key] = (stamp, value)
    if new:
        weakref.finalize(packed, _drop, pid)
    return value


def dequantized(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                dequantize: Callable[[torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]) -> torch.Tensor:
    """`dequantize(packed, scales, dtype)`, remembered while `packed` lives and neither tensor changes."""
    if not enabled():
        return dequantize(packed, scales, dtype)
    return cached(packed, scales, ("dequantized", dtype, dequantize),
                  lambda: dequantize(packed, scales, dtype))


# Derived tensors keyed by a tensor's storage and geometry rather than its Python object: compiled steps pass
# fused sibling weights as fresh as_strided views of one storage on every call, which the id-keyed entries above
# would never find again. Each entry holds the tensor it was derived from, so that storage cannot be freed and
# its address reused by another weight while the entry exists; the oldest entries go beyond _BY_STORAGE_SIZE.
_by_storage: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_BY_STORAGE_SIZE = 4096


def cached_by_storage(t: torch.Tensor, tag: Hashable, build: Callable[[], object]):
    """``build()`` (derived from ``t`` alone), remembered per storage, geometry and version of ``t``. During a
    CUDA graph capture a miss is built but not kept: the capture records its kernels instead of running them."""
    key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device, tag)
    version = _version(t)
    with _lock:
        hit = _by_storage.get(key)
        if hit is not None and hit[1] == version:
            _by_storage.move_to_end(key)
            return hit[2]
    with torch.no_grad():
        value = build()
    if not (t.is_cuda and torch.cuda.is_current_stream_capturing()):
        with _lock:
            _by_storage[key] = (t, version, value)
            if len(_by_storage) > _BY_STORAGE_SIZE:
                _by_storage.popitem(last=False)
    return value


def _drop(packed_id: int) -> None:
    with _lock:
        _watched.discard(packed_id)
        for key in [k for k in _entries if k[0] == packed_id]:
            del _entries[key]


def clear() -> None:
    """Forget every cached weight (frees their memory)."""
    with _lock:
        _entries.clear()
        _by_storage.clear()
