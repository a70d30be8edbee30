"""A cache of dequantized weights for the reference ops.

Why: where no 4-bit kernel exists (the CPU), the reference ops dequantize the whole weight on every
call. For decoding that is one full dequantization of every matrix per token — on the default model
about 50x the cost of the matmul itself. Keeping the dense copy next to the packed one trades memory
(one dense copy per packed weight and dtype) for speed; the numbers are unchanged (the cached tensor
is exactly what dequantize returns).

Entries are keyed by the identity of the packed tensor and invalidated when the packed tensor or its
scales are written in place (their version counters) or freed (a weakref callback drops the entry).
Set SPECQ_DEQUANT_CACHE=0 to turn it off (then every call dequantizes, as before).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Callable

import torch

_lock = threading.Lock()
_entries: dict[tuple[int, torch.dtype], tuple] = {}


def enabled() -> bool:
    return os.environ.get("SPECQ_DEQUANT_CACHE", "1") != "0"


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter; they cannot be written in place
        return -1


def dequantized(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                dequantize: Callable[[torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]) -> torch.Tensor:
    """`dequantize(packed, scales, dtype)`, remembered while `packed` lives and neither tensor changes."""
    if not enabled() or torch.is_grad_enabled() and (packed.requires_grad or scales.requires_grad):
        return dequantize(packed, scales, dtype)
    key = (id(packed), dtype)
    stamp = (packed.data_ptr(), _version(packed), scales.data_ptr(), _version(scales), tuple(packed.shape))
    with _lock:
        hit = _entries.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    with torch.no_grad():
        w = dequantize(packed, scales, dtype)
    if hit is None:
        weakref.finalize(packed, _drop, id(packed))
    with _lock:
        _entries[key] = (stamp, w)
    return w


def _drop(packed_id: int) -> None:
    with _lock:
        for key in [k for k in _entries if k[0] == packed_id]:
            del _entries[key]


def clear() -> None:
    """Forget every cached weight (frees their memory)."""
    with _lock:
        _entries.clear()
