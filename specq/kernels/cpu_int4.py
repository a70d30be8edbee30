"""The CPU kernel of ``specq::linear_w4a16`` and ``specq::linear_w4a4``: aten's INT4 matmul.

Why: the reference ops multiply with a dense dequantized copy of the weight (cached, see
dequant_cache.py), so on the CPU a 4-bit mode read as many weight bytes per token as bf16, and a
4-bit draft cost as much as the bf16 target it drafts for. PyTorch ships a CPU kernel that reads
4-bit codes directly, ``aten._weight_int4pack_mm_for_cpu``; at the default model's shapes and one
token it is ~3x faster than the bf16 GEMV (benchmarks/ops_cpu.py).

Mapping our layout onto it (docs/formats.md): our int32 words hold u = q + 8 (0..15) per element, and
w = q * scale. ``aten._convert_weight_to_int4pack_for_cpu`` takes those u as int32 [N, K] and returns
its own uint8 tile layout; the matmul dequantizes ``(u - 8) * scale + zero`` with
``scale_and_zero`` [K/g, N, 2], so ours is (scale, 0). The repacked weight is built once per packed
tensor and dtype and kept next to it (dequant_cache.cached: invalidated by in-place writes, dropped
with the tensor); no dense copy is made.

When it runs: x on the CPU in bfloat16 or float16, INT4 group size 32/64/128/256, N a multiple of 16
(the kernel's limits), no gradient needed for the scales. Everything else runs the reference, in
particular float32 x, whose results tests pin bit for bit. The Hadamard rotation (and, for w4a4, the
activation fake-quantization) of x is the reference's own code, applied before the matmul.

Numbers: the kernel forms q * scale exactly in float32, accumulates in float32 and rounds the output
once to x.dtype; the reference first rounds each q * scale to x.dtype. Both are within the rounding
bound of an x.dtype GEMM of the float64 math (tests/test_cpu_int4.py), not bit-identical to each
other. Set SPECQ_INT4_CPU=0 to run the reference instead.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from specq.formats import int4
from specq.kernels import ops as _ops
from specq.kernels.dequant_cache import cached

GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs N % 16 == 0
X_DTYPES = (torch.bfloat16, torch.float16)  # float32 keeps the reference (bit-exact tests)
_INNER_K_TILES = 2  # a CUDA tiling parameter; the CPU conversion accepts and ignores it

_AVAILABLE = all(hasattr(torch.ops.aten, name) for name in
                 ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"))


def enabled() -> bool:
    return _AVAILABLE and os.environ.get("SPECQ_INT4_CPU", "1") != "0"


def usable(x: Tensor, packed: Tensor, scales: Tensor, group_size: int) -> bool:
    """Whether the kernel covers this call (else the caller runs the reference)."""
    return (enabled() and x.device.type == "cpu" and x.dtype in X_DTYPES and x.numel() > 0
            and group_size in GROUP_SIZES and packed.shape[0] % N_MULTIPLE == 0
            and not (torch.is_grad_enabled() and scales.requires_grad))


def repack(packed: Tensor, scales: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(int4pack weight, scale_and_zero [K/g, N, 2] in dtype) for the aten kernel; traceable."""
    u = int4.unpack(packed).to(torch.int32) + 8  # the stored nibbles 0..15, [N, K]
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), _INNER_K_TILES)
    s = scales.t().to(dtype)  # rounded to x.dtype first, as the reference's dequantize does
    scale_and_zero = torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()
    return weight, scale_and_zero


def int4pack_mm(x: Tensor, weight: Tensor, scale_and_zero: Tensor, bias: Optional[Tensor],
                group_size: int) -> Tensor:
    """x [..., K] times a repacked weight (N = scale_and_zero.shape[1]), + bias."""
    n, k = scale_and_zero.shape[1], x.shape[-1]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, k).contiguous(), weight, group_size,
                                                   scale_and_zero)
    y = y.reshape(*x.shape[:-1], n)
    return y if bias is None else y + bias


def int4_matmul(x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor], group_size: int,
                scale_levels: int = 0) -> Tensor:
    """x [..., K] @ int4.dequantize(packed, S(scales)).T + bias, through the int4pack kernel (the
    repacked weight is cached next to the packed one); S: the scales, or where scale_levels > 0 W4A4's
    snapped ones (``int4.snapped_scales``), cached apart from W4A16's repacked weight of the same copy."""
    def build():
        return repack(packed, int4.snapped_scales(scales, scale_levels) if scale_levels else scales, x.dtype)

    weight, scale_and_zero = cached(packed, scales, ("int4pack_cpu", x.dtype, scale_levels), build)
    return int4pack_mm(x, weight, scale_and_zero, bias, group_size)


def linear_w4a16(x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor],
                 group_size: int, had_block: int) -> Tensor:
    _ops.check_int4_args("specq.linear_w4a16", x, packed, scales, bias, group_size, had_block)
    if not usable(x, packed, scales, group_size):
        return _ops.reference_w4a16(x, packed, scales, bias, had_block)
    return int4_matmul(_ops.rotate(x, had_block), packed, scales, bias, group_size)


def linear_w4a4(x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor],
                group_size: int, act_group_size: int, had_block: int, scale_levels: int = 0) -> Tensor:
    _ops.check_int4_args("specq.linear_w4a4", x, packed, scales, bias, group_size, had_block, act_group_size,
                         scale_levels)
    if not usable(x, packed, scales, group_size):
        return _ops.reference_w4a4(x, packed, scales, bias, act_group_size, had_block, scale_levels)
    return int4_matmul(_ops.activation_w4a4(x, act_group_size, had_block, scale_levels), packed, scales, bias,
                       group_size, scale_levels)


_ops.linear_w4a16_op.register_kernel("cpu")(linear_w4a16)
_ops.linear_w4a4_op.register_kernel("cpu")(linear_w4a4)
