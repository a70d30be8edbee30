"""Grouped-query SDPA: the query heads that share a key/value head attend as one head, same numbers.

Why: with grouped-query attention (SmolLM2: 9 query heads, 3 key/value heads) transformers' "sdpa"
path repeats K/V to 9 heads and calls PyTorch's CPU flash-attention kernel, whose cost grows with
(batch x heads) blocks rather than with work: one query token over 256 cached keys takes ~140 us per
layer on this 2-core machine, ~4 ms of a ~15 ms decoder step. Folding the G query heads of a group
into the query-length axis ([B, Hq, q, D] -> [B, Hkv, G*q, D], the mask repeated per head) gives the
kernel 3 blocks of G*q rows over the unrepeated K/V: ~40 us, and in bfloat16/float16 every output
element is computed exactly as before (each query row is independent in the kernel;
tests/test_compiled_cpu.py checks bit equality), so a model decodes the same tokens. float32 queries
are not folded: that kernel's float32 sums depend on the row count (~1 ulp).

On CUDA, calls at decode sizes (G x q <= 64 rows per key/value head, a bool mask or one query) go
to `torch.ops.specq.decode_attention` instead (specq.kernels.attention_op: a split-KV Triton kernel
that skips the cache blocks the mask hides). On the Llama-3-8B shape, one token over a 512-position
cache: 5.3 us against 20.9 us for the folded SDPA call (cuDNN) and its mask preparation; the decode
step went from 6.22 to 5.87 ms.

`grouped_sdpa(model)` switches the model's "sdpa" attention to this function for the duration of a
`with` block (the compiled CPU steps trace their graphs inside it); the mask is built by
transformers' own sdpa mask function. Calls it cannot fold (no GQA, float32, no mask with several
queries, a position bias, a per-head mask) go to transformers' sdpa function unchanged.
"""

from __future__ import annotations

import contextlib
import os

import torch

import specq.kernels.ops  # noqa: F401  (defines torch.ops.specq.*, registers the CUDA kernels)
from specq.kernels import attention_op

NAME = "specq_grouped_sdpa"
# Where folding is bit-identical: the bf16/fp16 kernel accumulates each row the same way whatever the
# number of rows; in float32 it does not (differences of ~1 ulp), so float32 keeps the plain path.
LOW_PRECISION = (torch.bfloat16, torch.float16)
_REGISTERED = False


# On CUDA, decode-sized calls go to specq's split-KV kernel (specq.kernels.attention_op):
# SPECQ_DECODE_ATTENTION=0 keeps SDPA (A/B measurements).
DECODE_ATTENTION = os.environ.get("SPECQ_DECODE_ATTENTION", "1") != "0"
DECODE_ATTENTION_DEVICES = ("cuda",)  # where the op has a kernel (elsewhere it is SDPA by definition)
_UNSUPPORTED_KWARGS = ("position_bias", "softcap", "sliding_window", "s_aux", "sinks")


def _decode_attention_fits(query, key, value, attention_mask, dropout, kwargs) -> bool:
    b, _, q, _ = query.shape
    mask_ok = (attention_mask is None and q == 1) or (
        attention_mask is not None and attention_mask.dtype == torch.bool
        and tuple(attention_mask.shape) == (b, 1, q, key.shape[2]))
    return (DECODE_ATTENTION and query.device.type in DECODE_ATTENTION_DEVICES and mask_ok and not dropout
            and not kwargs.get("output_attentions", False)
            and all(kwargs.get(k) is None for k in _UNSUPPORTED_KWARGS)
            and attention_op.kernel_supports(query, key, value, attention_mask))


def grouped_sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                   is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _decode_attention_fits(query, key, value, attention_mask, dropout, kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return torch.ops.specq.decode_attention(query, key, value, attention_mask, scale), None
    groups = getattr(module, "num_key_value_groups", 1)
    b, hq, q, d = query.shape
    hkv = key.shape[1]
    foldable = (groups > 1 and hq == hkv * groups and query.dtype in LOW_PRECISION
                and kwargs.get("position_bias") is None
                and not kwargs.get("output_attentions", False)
                and (attention_mask is not None or q == 1)
                and (attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1)))
    if not foldable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # query head j*G + g uses key/value head j (repeat_kv's order): rows (g, t) of folded head j
    qf = query.reshape(b, hkv, groups * q, d)
    mask = attention_mask
    if mask is not None:
        mb, _, mq, kl = mask.shape
        mask = mask[:, :, None].expand(mb, 1, groups, mq, kl).reshape(mb, 1, groups * mq, kl)
    out = torch.nn.functional.scaled_dot_product_attention(qf, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling, is_causal=False)
    return out.reshape(b, hq, q, d).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make NAME a transformers attention implementation, with sdpa's mask (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_sdpa_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _REGISTERED = True


def sdpa_configs(model: torch.nn.Module) -> list:
    configs = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "_attn_implementation", None) == "sdpa":
            configs[id(cfg)] = cfg
    return list(configs.values())


@contextlib.contextmanager
def grouped_sdpa(model: torch.nn.Module, configs: list | None = None):
    """Within the block, the model's "sdpa" attention runs grouped_sdpa_attention_forward.

    `configs`: the configs to switch (default: every config of the model's modules set to "sdpa";
    pass the list once found to save the module walk on every call)."""
    register()
    configs = sdpa_configs(model) if configs is None else configs
    # the plain attribute behind the `_attn_implementation` property (whose setter would also rewrite
    # every sub-config): each config found is switched and restored exactly
    for cfg in configs:
        cfg._attn_implementation_internal = NAME
    try:
        yield
    finally:
        for cfg in configs:
            cfg._attn_implementation_internal = "sdpa"
