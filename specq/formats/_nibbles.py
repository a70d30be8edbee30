"""Decode bytes that hold two 4-bit codes (low nibble first) through a 256-entry table.

Both 4-bit formats store element 2i in the low nibble and 2i+1 in the high nibble of byte i (INT4's
int32 words are little-endian bytes in that same order). Decoding is then one gather per byte.
The gather is done on machine words that hold both decoded values at once (two bf16/fp16 in an
int32, two float32 in an int64): on CPU that is ~4x faster than gathering a [256, 2] table with
int64 indices, which matters because the reference ops dequantize on every call.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake


def cacheable(t: torch.Tensor) -> bool:
    """Whether constant tables made for ``t`` may be cached: not while ``t`` is a fake tensor
    (AOT tracing, e.g. of a custom op's backward), where a cached real tensor would leak in."""
    return not is_fake(t)

_WORD = {1: torch.int16, 2: torch.int32, 4: torch.int64}  # element size in bytes -> word holding two elements
_CACHE: dict = {}


def pair_table(values: tuple, dtype: torch.dtype, device: torch.device, cache: bool = True) -> torch.Tensor:
    """[256, 2] table in ``dtype``: byte b -> (values[b & 15], values[b >> 4])."""
    key = (values, dtype, device)
    t = _CACHE.get(key) if cache else None
    if t is None:
        rows = [(values[b & 0xF], values[b >> 4]) for b in range(256)]
        t = torch.tensor(rows, dtype=torch.float64).to(dtype=dtype, device=device).contiguous()
        if cache:
            _CACHE[key] = t
    return t


def gather_pairs(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of a [T, 2] ``table`` at int32 indices ``idx`` (any shape) -> [*idx.shape, 2]."""
    flat = idx.reshape(-1)
    word = _WORD.get(table.element_size())
    if word is None:  # float64: no 128-bit word; gather rows of the [T, 2] table
        return torch.index_select(table, 0, flat).reshape(*idx.shape, 2)
    words = table.view(word).reshape(table.shape[0])
    return torch.index_select(words, 0, flat).view(table.dtype).reshape(*idx.shape, 2)


def decode_bytes(codes: torch.Tensor, values: tuple, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [..., M] -> [..., 2M] in ``dtype``: each byte becomes (values[low], values[high])."""
    table = pair_table(values, dtype, codes.device, cacheable(codes))
    out = gather_pairs(table, codes.to(torch.int32))
    return out.reshape(*codes.shape[:-1], 2 * codes.shape[-1])
