"""The specq matmul ops: ``torch.ops.specq.linear_mxfp4 / linear_w4a16 / linear_w4a4``.

Each is a ``torch.library.custom_op`` (opaque to dynamo/export, so compiled and exported graphs keep
one node per quantized matmul) with:

- a fake (meta) implementation: checks shapes and dtypes, returns an empty [..., N] in x.dtype;
- a reference implementation for every device: dequantize the weight into x.dtype, rotate and
  (w4a4) fake-quantize the activation, ``F.linear``. It is the numerical definition of each op;
  faster kernels (Triton on CUDA, registered with ``<op>.register_kernel("cuda")`` from
  ``specq/kernels/triton_*.py``; aten's int4pack matmul for bf16/fp16 INT4 ops on the CPU, registered
  with ``register_kernel("cpu")`` from ``specq/kernels/cpu_int4.py``) must match it within the
  rounding of x.dtype.

Python wrappers of the same names (``linear_mxfp4(x, packed, scales, bias=None)`` ...) call the ops
with defaults filled in. The argument checks are public (``check_mxfp4_args``, ``check_int4_args``)
so other kernels can reuse the exact messages.

Semantics (see docs/ARCHITECTURE.md and docs/formats.md):

    linear_mxfp4(x, packed, scales, bias)        = x @ mxfp4.dequantize(packed, scales).T + bias
    linear_w4a16(x, packed, scales, bias, g, hb) = H(x) @ int4.dequantize(packed, scales).T + bias
    linear_w4a4(x, packed, scales, bias, g, ag, hb, L)
                                                 = Q_ag(H(x)) @ int4.dequantize(packed, S_L(scales)).T + bias

with H = block-diagonal Hadamard of block ``hb`` along K (identity when hb = 0), Q_ag = dynamic
symmetric INT4 fake quantization per token (ag = 0) or per group of ag along K, and S_L the group
scales as stored (L = 0) or snapped to integer multiples 0..L of a per-row unit (``int4.snapped_scales``:
what lets the INT8 tensor-core kernel sum over all of K in int32; L <= 16). With L > 0 and activation
groups (ag > 0), Q_ag snaps the activation group scales the same way to a per-token unit
(``activation.fake_quantize_int4(..., levels=L)``). The weight is
dequantized in x.dtype (bf16 products round like the hardware kernels do); bias must be in x.dtype.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from specq.formats import activation, hadamard, int4, mxfp4
from specq.kernels.dequant_cache import cached, dequantized

log = logging.getLogger(__name__)

X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- argument checks

def _check_x_and_bias(op: str, x: Tensor, n: int, k: int, bias: Optional[Tensor]) -> None:
    if x.dtype not in X_DTYPES:
        raise TypeError(f"{op}: x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have shape [..., K], got a scalar")
    if x.shape[-1] != k:
        raise ValueError(f"{op}: x.shape[-1] ({x.shape[-1]}) must equal the weight's K ({k}); "
                         f"x has shape {tuple(x.shape)}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != n:
            raise ValueError(f"{op}: bias must be 1-D [N] = [{n}], got shape {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: bias dtype {bias.dtype} must equal x dtype {x.dtype}; cast the bias")
        if bias.device != x.device:
            raise ValueError(f"{op}: bias is on {bias.device} but x on {x.device}")


def _check_2d(op: str, name: str, t: Tensor, dtype: Optional[torch.dtype]) -> None:
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {dtype}, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{op}: {name} is empty (shape {tuple(t.shape)}); a quantized weight needs N > 0 and K > 0")


def _check_devices(op: str, **tensors: Optional[Tensor]) -> None:
    devs = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got " +
                         ", ".join(f"{k} on {v}" for k, v in devs.items()))


def check_mxfp4_args(x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor]) -> tuple[int, int]:
    """Validate linear_mxfp4's arguments; returns (N, K)."""
    op = "specq.linear_mxfp4"
    _check_2d(op, "packed", packed, torch.uint8)
    _check_2d(op, "scales", scales, torch.uint8)
    n, k = packed.shape[0], 2 * packed.shape[1]
    if k % mxfp4.BLOCK_SIZE != 0:
        raise ValueError(f"{op}: K = 2 * packed.shape[1] = {k} must be a multiple of {mxfp4.BLOCK_SIZE}")
    if tuple(scales.shape) != (n, k // mxfp4.BLOCK_SIZE):
        raise ValueError(f"{op}: scales must have shape [N, K/32] = [{n}, {k // mxfp4.BLOCK_SIZE}], "
                         f"got {tuple(scales.shape)}")
    _check_x_and_bias(op, x, n, k, bias)
    _check_devices(op, x=x, packed=packed, scales=scales, bias=bias)
    return n, k


def check_int4_args(op: str, x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor],
                    group_size: int, had_block: int, act_group_size: int = 0, scale_levels: int = 0) -> tuple[int, int]:
    """Validate the arguments of linear_w4a16 / linear_w4a4 (``op`` names the op); returns (N, K)."""
    _check_2d(op, "packed", packed, torch.int32)
    _check_2d(op, "scales", scales, None)
    if not scales.is_floating_point():
        raise TypeError(f"{op}: scales must be a floating-point tensor, got {scales.dtype}")
    n, k = packed.shape[0], int4.PACK * packed.shape[1]
    if group_size <= 0 or k % group_size != 0:
        raise ValueError(f"{op}: group_size ({group_size}) must be positive and divide K ({k})")
    if tuple(scales.shape) != (n, k // group_size):
        raise ValueError(f"{op}: scales must have shape [N, K/group_size] = [{n}, {k // group_size}] "
                         f"for group_size {group_size}, got {tuple(scales.shape)}")
    if had_block < 0:
        raise ValueError(f"{op}: had_block must be >= 0 (0 = no rotation), got {had_block}")
    if had_block > 0:
        if k % had_block != 0:
            raise ValueError(f"{op}: had_block ({had_block}) must divide K ({k})")
        if not hadamard.supported(had_block):
            raise ValueError(f"{op}: no Hadamard matrix of order had_block={had_block}; use 2**a, 12*2**a, 20*2**a")
    if act_group_size < 0 or (act_group_size > 0 and k % act_group_size != 0):
        raise ValueError(f"{op}: act_group_size ({act_group_size}) must be 0 (per token) or divide K ({k})")
    if not 0 <= scale_levels <= int4.MAX_SCALE_LEVELS:
        raise ValueError(f"{op}: scale_levels ({scale_levels}) must be 0 (the group scales as stored) or 1.."
                         f"{int4.MAX_SCALE_LEVELS} (snapped to integer multiples of a per-row unit)")
    _check_x_and_bias(op, x, n, k, bias)
    _check_devices(op, x=x, packed=packed, scales=scales, bias=bias)
    return n, k


def _empty_out(x: Tensor, n: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], n))


# --------------------------------------------------------------------------- ops

@torch.library.custom_op("specq::linear_mxfp4", mutates_args=())
def linear_mxfp4_op(x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor]) -> Tensor:
    check_mxfp4_args(x, packed, scales, bias)
    w = dequantized(packed, scales, x.dtype, mxfp4.dequantize)
    return F.linear(x, w, bias)


@linear_mxfp4_op.register_fake
def _(x, packed, scales, bias):
    n, _ = check_mxfp4_args(x, packed, scales, bias)
    return _empty_out(x, n)


def rotate(x: Tensor, had_block: int) -> Tensor:
    """H(x): the block-diagonal Hadamard rotation every INT4 op applies to x first (0 = none)."""
    return hadamard.hadamard_transform(x, had_block) if had_block > 0 else x


def activation_levels(act_group_size: int, scale_levels: int) -> int:
    """The scale levels W4A4's activations take: the op's, for activation groups; none per token (one
    scale a token has nothing to snap)."""
    return scale_levels if act_group_size else 0


def activation_w4a4(x: Tensor, act_group_size: int, had_block: int, scale_levels: int = 0) -> Tensor:
    """Q_ag(H(x)) in x.dtype: what linear_w4a4 multiplies the INT4 weight with."""
    return activation.fake_quantize_int4(rotate(x, had_block), act_group_size,
                                         activation_levels(act_group_size, scale_levels))


# The reference bodies (after the argument checks), public so that device kernels can fall back to
# exactly these numbers for the shapes and dtypes they do not cover.

def reference_w4a16(x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor], had_block: int) -> Tensor:
    w = dequantized(packed, scales, x.dtype, int4.dequantize)
    return F.linear(rotate(x, had_block), w, bias)


def w4a4_weight(packed: Tensor, scales: Tensor, dtype: torch.dtype, scale_levels: int) -> Tensor:
    """The dequantized weight of linear_w4a4 in ``dtype`` (cached, see dequant_cache)."""
    if scale_levels == 0:
        return dequantized(packed, scales, dtype, int4.dequantize)
    # (the scale checks read values back to the host: not on CUDA, where that would break a graph capture)
    return cached(packed, scales, ("dequantized_snapped", dtype, scale_levels),
                  lambda: int4.dequantize(packed, int4.snapped_scales(scales, scale_levels, check=not scales.is_cuda),
                                          dtype))


def reference_w4a4(x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor],
                   act_group_size: int, had_block: int, scale_levels: int = 0) -> Tensor:
    w = w4a4_weight(packed, scales, x.dtype, scale_levels)
    return F.linear(activation_w4a4(x, act_group_size, had_block, scale_levels), w, bias)


@torch.library.custom_op("specq::linear_w4a16", mutates_args=())
def linear_w4a16_op(x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor],
                    group_size: int, had_block: int) -> Tensor:
    check_int4_args("specq.linear_w4a16", x, packed, scales, bias, group_size, had_block)
    return reference_w4a16(x, packed, scales, bias, had_block)


@linear_w4a16_op.register_fake
def _(x, packed, scales, bias, group_size, had_block):
    n, _ = check_int4_args("specq.linear_w4a16", x, packed, scales, bias, group_size, had_block)
    return _empty_out(x, n)


@torch.library.custom_op("specq::linear_w4a4", mutates_args=())
def linear_w4a4_op(x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor],
                   group_size: int, act_group_size: int, had_block: int, scale_levels: int = 0) -> Tensor:
    check_int4_args("specq.linear_w4a4", x, packed, scales, bias, group_size, had_block, act_group_size,
                    scale_levels)
    return reference_w4a4(x, packed, scales, bias, act_group_size, had_block, scale_levels)


@linear_w4a4_op.register_fake
def _(x, packed, scales, bias, group_size, act_group_size, had_block, scale_levels=0):
    n, _ = check_int4_args("specq.linear_w4a4", x, packed, scales, bias, group_size, had_block, act_group_size,
                           scale_levels)
    return _empty_out(x, n)


@torch.library.custom_op("specq::linear_dense", mutates_args=())
def linear_dense_op(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear(x, weight, bias)``; on CUDA a weight-streaming GEMV where it is faster at a few rows
    of x (specq.kernels.triton_dense_gemv). The compiled CUDA steps route small-M dense linears here
    (specq.passes.dense_gemv): an opaque op keeps inductor from replacing it with its own matmul."""
    return F.linear(x, weight, bias)


@linear_dense_op.register_fake
def _(x, weight, bias):
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"specq.linear_dense: x.shape[-1] ({x.shape[-1]}) must equal the weight's K "
                         f"({weight.shape[-1]})")
    return _empty_out(x, weight.shape[0])


# --------------------------------------------------------------------------- autograd
# Gradients flow to x only (the packed weights are not trainable). For w4a4 the activation
# quantizer is treated as identity (straight-through), which is the usual choice and keeps the
# draft usable inside code that runs with grad enabled.

def _setup(had_block_index: Optional[int], scale_levels_index: Optional[int] = None):
    def setup_context(ctx, inputs, output):
        # the scales are snapped (what the forward multiplied by) in backward: here, under dynamo, the snap's
        # data checks would break the graph, and a forward that never runs backward would pay for it
        ctx.scale_levels = inputs[scale_levels_index] if scale_levels_index is not None and len(inputs) > scale_levels_index else 0
        ctx.save_for_backward(inputs[1], inputs[2])  # packed, scales
        ctx.x_dtype = inputs[0].dtype
        ctx.had_block = 0 if had_block_index is None else inputs[had_block_index]
    return setup_context


def _grad_bias(grad, bias_needs_grad):
    return grad.reshape(-1, grad.shape[-1]).sum(0) if bias_needs_grad else None


def _backward_mxfp4(ctx, grad):
    packed, scales = ctx.saved_tensors
    w = mxfp4.dequantize(packed, scales, ctx.x_dtype)
    gx = grad @ w if ctx.needs_input_grad[0] else None
    return gx, None, None, _grad_bias(grad, ctx.needs_input_grad[3])


def _backward_int4(ctx, grad):
    packed, scales = ctx.saved_tensors
    if ctx.scale_levels:
        scales = int4.snapped_scales(scales, ctx.scale_levels, check=False)
    w = int4.dequantize(packed, scales, ctx.x_dtype)
    gx = None
    if ctx.needs_input_grad[0]:
        gx = grad @ w
        if ctx.had_block > 0:  # y = (x H) W^T  =>  dL/dx = (dL/dy W) H^T
            gx = hadamard.hadamard_transform(gx, ctx.had_block, inverse=True)
    return gx, None, None, _grad_bias(grad, ctx.needs_input_grad[3])


linear_mxfp4_op.register_autograd(_backward_mxfp4, setup_context=_setup(None))
linear_w4a16_op.register_autograd(lambda ctx, g: (*_backward_int4(ctx, g), None, None),  # + group_size, had_block
                                  setup_context=_setup(5))
linear_w4a4_op.register_autograd(lambda ctx, g: (*_backward_int4(ctx, g), None, None, None, None),  # + 4 ints
                                 setup_context=_setup(6, 7))


# --------------------------------------------------------------------------- Python wrappers

def linear_mxfp4(x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W.T + bias`` with W the MXFP4 weight ``(packed uint8 [N, K/2], scales uint8 [N, K/32])``."""
    return torch.ops.specq.linear_mxfp4(x, packed, scales, bias)


def _default_group_size(packed: Tensor, scales: Tensor) -> int:
    if packed.dim() != 2 or scales.dim() != 2 or scales.shape[1] == 0:
        raise ValueError(f"group_size not given and cannot be inferred from packed {tuple(packed.shape)} "
                         f"and scales {tuple(scales.shape)} (both must be 2-D)")
    return (int4.PACK * packed.shape[1]) // scales.shape[1]


def linear_w4a16(x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor] = None,
                 group_size: Optional[int] = None, had_block: int = 0) -> Tensor:
    """``H(x) @ W.T + bias`` with W the INT4 weight (packed int32 [N, K/8], scales [N, K/group_size]).

    ``group_size`` defaults to K / scales.shape[1]; ``had_block`` 0 means no rotation."""
    g = _default_group_size(packed, scales) if group_size is None else group_size
    return torch.ops.specq.linear_w4a16(x, packed, scales, bias, g, had_block)


def linear_w4a4(x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor] = None,
                group_size: Optional[int] = None, act_group_size: int = 0, had_block: int = 0,
                scale_levels: int = 0) -> Tensor:
    """Like linear_w4a16, with the rotated activation fake-quantized to INT4 (per token when
    ``act_group_size`` is 0, else per group of that many elements along K) and, where
    ``scale_levels`` > 0, the group scales snapped to that many integer multiples of a per-row unit."""
    g = _default_group_size(packed, scales) if group_size is None else group_size
    return torch.ops.specq.linear_w4a4(x, packed, scales, bias, g, act_group_size, had_block, scale_levels)


# --------------------------------------------------------------------------- device kernels
# The CPU INT4 kernel (aten's int4pack matmul) registers itself on linear_w4a16 / linear_w4a4 for
# bfloat16/float16 x; float32 and every shape it does not cover keep the reference above.
import specq.kernels.attention_op  # noqa: E402,F401  (torch.ops.specq.decode_attention)
import specq.kernels.cpu_int4  # noqa: E402,F401

# CUDA kernels live in specq/kernels/triton_*.py and register themselves on the ops above.
if torch.cuda.is_available():
    try:
        import specq.kernels.triton_backend  # noqa: F401
    except ImportError as e:  # no triton (or no kernels yet): the reference implementation serves CUDA
        log.info("specq: Triton kernels not loaded (%s); using the reference ops on CUDA", e)
