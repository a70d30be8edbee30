"""How inductor compiles the specq ops on the CPU: traceable decompositions, folded under freezing.

Why: the ops are opaque custom ops, so compiled code calls them back through Python — ~40 us per
call for the dispatch, argument checks, the Hadamard transform and the weight-cache lookup, which at
one token is several times the INT4 matmul itself (benchmarks/ops_cpu.py). A decoder step of the
default model makes 210 of them: ~9 ms of overhead on a ~20 ms step, enough to make a 4-bit draft
as slow as its bf16 target. With these decompositions registered, inductor traces each call into
plain aten ops instead:

- INT4 ops the CPU kernel covers (cpu_int4.usable): rotate (and, for w4a4, fake-quantize) x with the
  reference's own code, repack the weight (cpu_int4.repack), ``aten._weight_int4pack_mm_for_cpu``;
- MXFP4: `mxfp4_weight` (the reference's values, computed from the packed bytes alone so that
  freezing folds it; see there) + ``F.linear``;
- every other INT4 call (float32, shapes the kernel lacks): dequantize + ``F.linear``, the
  reference's own math.

The weight preparation (repacking, dequantizing) depends only on the packed buffers, so inductor's
freezing (``torch._inductor.config.freezing``: parameters and buffers become constants) evaluates
it once at compile time; what runs per step is the rotation and one matmul. Without freezing the
preparation would run on every call, so the decompositions apply only while freezing is on (they
return NotImplemented otherwise and the op stays an opaque call). They leave dynamo graphs, export
and other backends alone: only inductor's own decomposition table holds them. The numbers are those
of the eager CPU path (same rotation, same kernel; dequantize + linear is the reference).

``register()`` is idempotent; the runtime calls it before compiling CPU steps.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from specq.formats import activation, hadamard, int4, mxfp4
from specq.kernels import cpu_int4
from specq.kernels import ops as _ops

_REGISTERED = False


def _freezing() -> bool:
    import torch._inductor.config as inductor_config

    return bool(inductor_config.freezing)


def _on_cpu(x: torch.Tensor) -> bool:
    return _freezing() and x.device.type == "cpu"


@functools.lru_cache(maxsize=None)
def _hadamard_rows(n: int) -> tuple:
    """hadamard_matrix(n) as Python floats, computed outside the trace (no fake tensors involved)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return tuple(map(tuple, hadamard.hadamard_matrix(n, dtype=torch.float32).tolist()))


def _rotate(x: torch.Tensor, had_block: int) -> torch.Tensor:
    """H(x) as one multiply-and-sum that inductor fuses into a single loop. The reference's
    hadamard_transform is a [rows, 64] @ [64, 64] matmul, which compiled code would hand to oneDNN:
    ~20 us per call at one token, six times per layer. Same numbers: the products x * (+-1/sqrt(b))
    are exact in float32 for power-of-4 blocks, the sum is accumulated in float32 and rounded once to
    x.dtype, as the matmul does (other blocks: the reference also computes in float32)."""
    if had_block == 0:
        return x
    h = torch.tensor(_hadamard_rows(had_block), dtype=torch.float32, device=x.device)  # a graph constant
    xb = x.float().reshape(-1, had_block, 1)
    return (xb * h).sum(dim=-2).to(x.dtype).reshape(x.shape)


def mxfp4_weight(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """mxfp4.dequantize's exact values, computed from the packed bytes alone.

    Why not mxfp4.dequantize: its lookup table is built from `arange` and friends, tensors with no
    tensor inputs, which inductor's constant folding leaves unfolded ("constructors"); everything
    downstream of the table then stays in the graph, and inductor fused the dequantization into the
    one-token matmul, re-run on every step (an MXFP4 step of the default model took ~85 ms instead of
    ~14). Here every op reads `packed` or `scales`, so freezing folds the whole weight into one
    prepacked constant. Same numbers: an E2M1 value times a power of two is exact in float32, rounded
    once to `dtype` (scale byte 0xFF: NaN, as the format says)."""
    n, half_k = packed.shape
    p = packed.to(torch.int32)
    codes = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(n, 2 * half_k)   # element 2i: low nibble
    e = ((codes >> 1) & 3).float()
    m = (codes & 1).float()
    magnitude = torch.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * torch.exp2(e - 1.0))
    value = torch.where((codes & 8) != 0, -magnitude, magnitude)
    s = scales.to(torch.int32)
    scale = torch.exp2((s - mxfp4.SCALE_BIAS).float())  # byte 0xFF: 2**128 = inf in float32
    # NaN as inf - inf: a scalar NaN (or full_like) would be a "constructor", which folding skips
    scale = torch.where(s == mxfp4.SCALE_NAN, scale - scale, scale)
    w = value.reshape(n, scales.shape[1], -1) * scale.unsqueeze(-1)
    return w.reshape(n, 2 * half_k).to(dtype)


def _linear_mxfp4(x, packed, scales, bias):
    if not _on_cpu(x):
        return NotImplemented
    return F.linear(x, mxfp4_weight(packed, scales, x.dtype), bias)


def _int4(x_in, x, packed, scales, bias, group_size):
    """x_in: the op's x (decides the path); x: what multiplies the weight (rotated, quantized)."""
    if cpu_int4.usable(x_in, packed, scales, group_size):
        weight, scale_and_zero = cpu_int4.repack(packed, scales, x.dtype)
        return cpu_int4.int4pack_mm(x, weight, scale_and_zero, bias, group_size)
    return F.linear(x, int4.dequantize(packed, scales, x.dtype), bias)


def _linear_w4a16(x, packed, scales, bias, group_size, had_block):
    if not _on_cpu(x):
        return NotImplemented
    return _int4(x, _rotate(x, had_block), packed, scales, bias, group_size)


def _linear_w4a4(x, packed, scales, bias, group_size, act_group_size, had_block, scale_levels=0):
    if not _on_cpu(x):
        return NotImplemented
    xq = activation.fake_quantize_int4(_rotate(x, had_block), act_group_size,
                                       _ops.activation_levels(act_group_size, scale_levels))
    if scale_levels:  # computed from the scales input: freezing folds it with the weight
        scales = int4.snapped_scales(scales, scale_levels, check=False)
    return _int4(x, xq, packed, scales, bias, group_size)


def register() -> None:
    """Add the decompositions to inductor's table (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from torch._inductor import decomposition as inductor_decomp
    from torch._inductor import lowering as inductor_lowering
    from torch._inductor.graph import get_layout_constraint_tag, tag_to_layout_constraint

    decomps = {torch.ops.specq.linear_mxfp4.default: _linear_mxfp4,
               torch.ops.specq.linear_w4a16.default: _linear_w4a16,
               torch.ops.specq.linear_w4a4.default: _linear_w4a4}
    for op in decomps:
        # Where a decomposition declines (no freezing, not CPU) the op reaches lowering, which makes its
        # fallback lazily and asserts that no decomposition exists for it: made after register(), every
        # later inductor compile of the op without freezing failed. Make the fallback first, with the
        # layout constraint inductor itself would choose.
        if op not in inductor_lowering.lowerings:
            constraint = tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
            inductor_lowering.make_fallback(op, layout_constraint=constraint)
    inductor_decomp.decompositions.update(decomps)
    cached = getattr(inductor_decomp, "fast_random_decomps", None)
    if cached is not None and hasattr(cached, "cache_clear"):  # a memoised copy of the table
        cached.cache_clear()
    _REGISTERED = True
