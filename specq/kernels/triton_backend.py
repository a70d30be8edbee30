"""Triton implementations of the specq ops, registered as their CUDA kernels.

``specq/kernels/ops.py`` imports this module on machines with CUDA; importing it registers
``linear_mxfp4``, ``linear_w4a16``, ``linear_w4a4`` and ``linear_dense`` below with
``<op>.register_kernel("cuda")``,
so ``torch.ops.specq.*`` on CUDA tensors runs them while CPU tensors keep the reference.

The functions are also callable directly (tests run them on CPU tensors under TRITON_INTERPRET=1).
Each validates its arguments with the ops' own checks, flattens x to [M, K], and runs:

- mxfp4: one weight-streaming / tiled kernel (``triton_wq``);
- w4a16: the Hadamard pre-kernel when had_block > 0 (``triton_act.rotate``), then ``triton_wq``;
- w4a4: one pre-kernel that rotates and quantizes x to INT4 (two for per-token scales), then the
  INT8-tensor-core kernel (``triton_w4a4``; on Hopper above 128 rows the pipelined Gluon kernel of
  ``gluon_w4a4``); at the sizes a weight-streaming kernel serves
  (``triton_wq.streams_weights``: M <= 16 in bf16, M <= 4 in fp16) the pre-kernel writes the
  fake-quantized x instead and the W4A16 streaming kernel runs on it;
- dense (bf16/fp16 weights): at 1..4 rows of x the weight-streaming GEMV of ``triton_dense_gemv``
  where it times faster than F.linear for the shape, else F.linear;
- ``decode_attention`` (specq.kernels.attention_op): the split-KV kernel of ``triton_attention``.

Shapes the kernels do not cover (an INT4 group size with no power-of-two divisor >= 16, a Hadamard
block over 256 columns, ...) fall back to the same math in PyTorch, so every valid call works.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from specq.formats import activation, hadamard, int4
from specq.kernels import ops as _ops
from specq.kernels.dequant_cache import cached_by_storage
from specq.kernels import (attention_op, gluon_w4a4, triton_act, triton_attention, triton_dense_gemv, triton_w4a4,
                           triton_wq)

log = logging.getLogger(__name__)
_warned: set = set()


def _fallback(what: str) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning("specq: no Triton kernel for %s; using PyTorch for it", what)


def _as_2d(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _device_ctx(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def linear_mxfp4(x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor]) -> Tensor:
    n, _ = _ops.check_mxfp4_args(x, packed, scales, bias)
    with _device_ctx(x):
        y = triton_wq.wq_matmul(_as_2d(x), packed, scales, bias, triton_wq.FORMAT_MXFP4, 32)
    return y.reshape(*x.shape[:-1], n)


def _rotated_2d(x: Tensor, had_block: int) -> Tensor:
    x2 = _as_2d(x)
    if had_block == 0:
        return x2
    if triton_act.supported(x2.shape[1], had_block, 0):
        return triton_act.rotate(x2, had_block)
    _fallback(f"a Hadamard block of {had_block}")
    return hadamard.hadamard_transform(x2, had_block)


def linear_w4a16(x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor],
                 group_size: int, had_block: int) -> Tensor:
    n, _ = _ops.check_int4_args("specq.linear_w4a16", x, packed, scales, bias, group_size, had_block)
    with _device_ctx(x):
        x2 = _rotated_2d(x, had_block)
        if triton_wq.supported_int4_group(group_size):
            y = triton_wq.wq_matmul(x2, packed, scales, bias, triton_wq.FORMAT_INT4, group_size)
        else:
            _fallback(f"INT4 group size {group_size}")
            y = F.linear(x2, int4.dequantize(packed, scales, x.dtype), bias)
    return y.reshape(*x.shape[:-1], n)


# Scales derived for scale levels: without host syncs (no checks), kept per scales storage (cached_by_storage).
def _snapped_levels(scales: Tensor, scale_levels: int) -> tuple[Tensor, Tensor]:
    """(uint8 levels, fp32 units) of ``int4.snap_scales``: what the integer-level GEMMs take."""
    return cached_by_storage(scales, ("levels", scale_levels),
                             lambda: int4.snap_scales(scales, scale_levels, check=False))


def _snapped_scales(scales: Tensor, scale_levels: int, dtype: torch.dtype) -> Tensor:
    """The snapped scales in ``dtype``, for the kernels that take float scales."""
    return cached_by_storage(scales, ("snapped", scale_levels, dtype),
                             lambda: int4.snapped_scales(scales, scale_levels, check=False).to(dtype))


def linear_w4a4(x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor],
                group_size: int, act_group_size: int, had_block: int, scale_levels: int = 0) -> Tensor:
    n, k = _ops.check_int4_args("specq.linear_w4a4", x, packed, scales, bias, group_size, had_block,
                                act_group_size, scale_levels)
    def float_scales():  # snapped (scale_levels > 0) in x.dtype, as stored ones are, for kernels taking float scales
        return _snapped_scales(scales, scale_levels, x.dtype) if scale_levels else scales

    act_levels = _ops.activation_levels(act_group_size, scale_levels)
    with _device_ctx(x):
        x2 = _as_2d(x)
        if not triton_w4a4.supported(group_size, act_group_size):
            _fallback(f"W4A4 with group size {group_size} and activation group {act_group_size}")
            return _ops.reference_w4a4(x, packed, scales, bias, act_group_size, had_block, scale_levels)
        if (triton_wq.streams_weights(x2, triton_wq.FORMAT_INT4, group_size)
                and triton_act.supported(k, had_block, act_group_size)):
            # decode and verify sizes: the INT8 tensor-core kernel pads M to 16 rows and is 2-4x slower
            # than the weight-streaming kernels, so quantize x (the reference's own fake-quantized
            # activation, in x.dtype) and run the W4A16 streaming kernel on it
            xq = triton_act.fake_quantize(x2, act_group_size, had_block, levels=act_levels)
            y = triton_wq.wq_matmul(xq, packed, float_scales(), bias, triton_wq.FORMAT_INT4, group_size)
            return y.reshape(*x.shape[:-1], n)
        # With scale levels the GEMM sums all of K in int32 (weights q * level; grouped activations come as
        # code * v with one unit per token, so the GEMM sees per-token activations either way). The Gluon
        # kernel (Hopper, large M) takes that only where its integer form is on; otherwise it runs its rescaling
        # form on the snapped scales (per-token activations) or the Triton kernel's integer path serves.
        integer = bool(scale_levels)
        wgmma = gluon_w4a4.supported(x2.shape[0], n, k, group_size, 0 if integer else act_group_size, x2.device)
        if integer and wgmma and not gluon_w4a4.LEVELS_ENABLED:
            if act_group_size:  # grouped activations need an integer form: the Triton one
                wgmma = False
            else:  # per token: the rescaling Gluon form on the snapped scales
                integer = False
        order = triton_w4a4.ORDER_WGMMA if wgmma else triton_w4a4.ORDER_WORDS
        if triton_act.supported(k, had_block, act_group_size, codes=True, order=order):
            q, sx = triton_act.quantize(x2, act_group_size, had_block, order, levels=act_levels)
        else:
            _fallback(f"activation quantization with had_block {had_block}, group {act_group_size}")
            xr = hadamard.hadamard_transform(x2, had_block) if had_block > 0 else x2
            q, sx = (activation.quantize_int4_levels(xr, act_group_size, act_levels) if act_levels
                     else activation.quantize_int4(xr, act_group_size))
            q = triton_w4a4.to_k_order(q, order).contiguous()
            sx = sx.reshape(q.shape[0], -1).contiguous()
        if integer:
            levels, units = _snapped_levels(scales, scale_levels)
            if wgmma:
                y = gluon_w4a4.w4a4_matmul(q, sx, packed, levels, bias, group_size, x.dtype, units=units)
            else:
                y = triton_w4a4.w4a4_matmul(q, sx, packed, levels, bias, group_size, 0, x.dtype, units=units)
        elif wgmma:
            y = gluon_w4a4.w4a4_matmul(q, sx, packed, float_scales(), bias, group_size, x.dtype)
        else:
            y = triton_w4a4.w4a4_matmul(q, sx, packed, float_scales(), bias, group_size, act_group_size, x.dtype)
    return y.reshape(*x.shape[:-1], n)


def linear_dense(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """F.linear, or at 1..4 rows of x the dense GEMV where it times faster for the shape."""
    x2 = _as_2d(x)
    if not triton_dense_gemv.supported(x2, weight) or (bias is not None and bias.dtype != x.dtype):
        return F.linear(x, weight, bias)
    with _device_ctx(x):
        y = triton_dense_gemv.gemv(x2, weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


_REGISTERED = False


def register() -> None:
    """Make the functions above the CUDA kernels of torch.ops.specq.* (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _ops.linear_mxfp4_op.register_kernel("cuda")(linear_mxfp4)
    _ops.linear_w4a16_op.register_kernel("cuda")(linear_w4a16)
    _ops.linear_w4a4_op.register_kernel("cuda")(linear_w4a4)
    _ops.linear_dense_op.register_kernel("cuda")(linear_dense)
    attention_op.decode_attention_op.register_kernel("cuda")(triton_attention.decode_attention)
    _REGISTERED = True


register()
