"""``torch.ops.specq.decode_attention``: grouped-query attention of a few query tokens over a static
KV cache, as one opaque op.

    decode_attention(query [B, Hq, q, D], key [B, Hkv, L, D], value [B, Hkv, L, D],
                     mask [B, 1, q, L] bool or None, scale) -> [B, q, Hq, D]

is ``softmax(scale * query @ key.T, masked) @ value`` with query head ``j * G + g`` reading key/value
head ``j`` (G = Hq / Hkv, transformers' repeat_kv order), returned in the layout attention modules
hand to their output projection ([B, q, Hq, D], contiguous). ``mask`` True = attend; None = attend
to all L positions. A row with no position to attend to gives zeros.

Why an op: at decode sizes (q <= a few tokens, L = the whole static cache) cuDNN's flash kernel
takes ~14 us per layer on the Llama-3-8B shape for ~1 us of cache bytes; the Triton kernel
(specq.kernels.triton_attention, registered for CUDA) splits the cache over many programs and skips
blocks the mask hides. The reference below (SDPA over repeated K/V) is the op on every other device
and the numerical definition the kernel is tested against.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# rows of one key/value head a kernel program holds: G * q (query heads per kv head x query tokens)
MAX_ROWS = 64
DTYPES = (torch.bfloat16, torch.float16)


def check_args(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor]) -> None:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("specq.decode_attention: query, key and value must be 4-D [B, heads, len, D], got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    b, hq, q, d = query.shape
    if key.shape != value.shape or key.shape[0] != b or key.shape[3] != d:
        raise ValueError(f"specq.decode_attention: key {tuple(key.shape)} and value {tuple(value.shape)} must "
                         f"both be [B={b}, Hkv, L, D={d}]")
    if hq % key.shape[1] != 0:
        raise ValueError(f"specq.decode_attention: {hq} query heads are not a multiple of {key.shape[1]} "
                         "key/value heads")
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4
                             or tuple(mask.shape) != (b, 1, q, key.shape[2])):
        raise ValueError(f"specq.decode_attention: mask must be bool [B, 1, q, L] = [{b}, 1, {q}, {key.shape[2]}], "
                         f"got {mask.dtype} {tuple(mask.shape)}")


def reference(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    """SDPA over K/V repeated to the query heads, in the [B, q, Hq, D] layout."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    if mask is not None:
        # rows with nothing to attend to: zeros (SDPA's own result for them varies by backend)
        empty = ~mask.any(-1, keepdim=True)  # [B, 1, q, 1]
        mask = mask | empty
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale)
    if mask is not None:
        out = out.masked_fill(empty, 0.0)
    return out.transpose(1, 2).contiguous()


@torch.library.custom_op("specq::decode_attention", mutates_args=())
def decode_attention_op(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    check_args(query, key, value, mask)
    return reference(query, key, value, mask, scale)


@decode_attention_op.register_fake
def _(query, key, value, mask, scale):
    check_args(query, key, value, mask)
    b, hq, q, d = query.shape
    return query.new_empty((b, q, hq, d))


def kernel_supports(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor]) -> bool:
    """Shapes and dtypes the CUDA kernel covers (the op falls back to the reference elsewhere):
    bf16/fp16, head dim a power of two in 16..256, G * q <= MAX_ROWS, unit stride along D."""
    b, hq, q, d = query.shape
    return (query.dtype in DTYPES and key.dtype == query.dtype and 16 <= d <= 256 and d & (d - 1) == 0
            and hq % key.shape[1] == 0 and (hq // key.shape[1]) * q <= MAX_ROWS
            and query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1
            and (mask is None or mask.stride(-1) == 1))
