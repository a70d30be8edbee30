"""Dynamic symmetric INT4 activation quantization (the A4 of W4A4), per token or per group.

Scales are computed at run time from the activation itself: ``scale = amax / 7`` over the last dim
(``group_size=0``, one scale per token) or over each group of ``group_size`` consecutive elements of
the last dim; ``q = clamp(round_half_even(x * (1 / scale)), -8, 7)``, the reciprocal correctly rounded
once per token (group) and every element multiplied by it: a kernel then spends one multiply per element
instead of a division (a third of the pre-kernel's instructions on an H100), and torch, numpy and the
kernels round ``x * r`` the same way (one IEEE multiply). No clipping happens (|x| <= 7 * scale), so every
element is within scale / 2 (plus a few ulps of the reciprocal) of its reconstruction. All arithmetic is
float32 (or float64 for float64 input) so bf16 activations do not lose bits.

Scale levels (``levels`` > 0 with ``group_size`` > 0, W4A4's ``scale_levels``): each group's scale is
snapped to an integer multiple ``v`` in 0..levels of one per-token unit ``t = (amax / 7) / levels``
(amax of the whole token; ``v = round_half_even(group scale / t)``, the largest group gets ``levels``),
and the codes are taken against ``v * t`` (clamped to [-8, 7]: a group rounded down may clip). Then
``code * v`` fits int8 ([-128, 112]) and the whole token has one scale ``t``, which is what lets the
INT8 GEMM sum all of K in int32 (see int4.snap_scales for the weights' side). Measured on the default
model: groups of 32 with levels keep most of their agreement over per-token scales (docs/formats.md).

There is no data-dependent control flow (no checks on values), so these functions trace cleanly.
Special values: a NaN or inf in a token (group) makes its scale NaN or inf, and the whole token
(group) reconstructs as NaN, so the problem shows up instead of hiding as a wrong finite number.
A token (group) of zeros has scale 0 and reconstructs exactly; one whose scale is below ``MIN_SCALE``
(2^-120, amax below ~5e-36) reconstructs as zeros: its codes are taken against a scale of 1, so they round
to 0. That keeps the reciprocal finite (<= 2^120) and makes a subnormal element code to 0 whether or not
the multiply flushes it to zero (GPU kernels do).
"""

from __future__ import annotations

import torch

QMIN, QMAX = -8, 7
MIN_SCALE = 2.0 ** -120  # smaller scales count as 1 (module docstring)


def _grouped(x: torch.Tensor, group_size: int, where: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{where}: x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0:
        raise ValueError(f"{where}: x must have at least one dim (the feature dim), got a scalar")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 0:
        raise ValueError(f"{where}: group_size must be an int >= 0 (0 = per token), got {group_size!r}")
    k = x.shape[-1]
    if group_size == 0:
        return x.unsqueeze(-2)  # [..., 1, K]
    if k % group_size != 0:
        raise ValueError(
            f"{where}: x.shape[-1] (K={k}) must be a multiple of group_size={group_size}; "
            f"use group_size=0 (per token) or a divisor of K")
    return x.reshape(*x.shape[:-1], k // group_size, group_size)


def _div(a: torch.Tensor, b) -> torch.Tensor:
    """a / b correctly rounded to a's dtype on every device: via float64 (some backends, CUDA, divide by a
    Python scalar as a multiplication by its rounded reciprocal, off by an ulp now and then; the tables
    divided here are [tokens, groups], tiny)."""
    return (a.to(torch.float64) / b).to(a.dtype)


def _group_scales(x: torch.Tensor, group_size: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as [..., G, group] in the working dtype, its group scales amax / 7 [..., G, 1])."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xg = _grouped(x, group_size, where).to(work)
    return xg, _div(xg.abs().amax(-1, keepdim=True).to(work), QMAX)


def _reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale correctly rounded to scale's dtype; a scale below MIN_SCALE (zero, a tiny group) or NaN
    counts as 1, so the reciprocal stays finite and such a group's codes round to 0."""
    safe = torch.where(scale >= MIN_SCALE, scale, torch.ones_like(scale))
    return _div(torch.ones_like(safe), safe)


def _codes(xg: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """clamp(round_half_even(xg * (1 / scale)), -8, 7) as floats (``_reciprocal``)."""
    return torch.round(xg * _reciprocal(scale)).clamp(QMIN, QMAX)


def _quantize(x: torch.Tensor, group_size: int, where: str, levels: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    xg, scale = _group_scales(x, group_size, where)
    if levels and group_size:
        scale, _, _ = _snap_group_scales(scale, levels)
    return _codes(xg, scale), scale


def _snap_group_scales(scale: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group scales [..., G, 1] -> (v * t [..., G, 1], v [..., G, 1], t [..., 1, 1]) with t = max scale / levels
    per token and v = round_half_even(scale / t) in 0..levels (0 where t is 0). The max of correctly rounded
    amax / 7 is the correctly rounded max amax / 7, so t is (token amax / 7) / levels, as the kernels compute it."""
    t = _div(scale.amax(-2, keepdim=True), levels)
    safe = torch.where(t > 0, t, torch.ones_like(t))
    v = torch.where(t > 0, torch.round(scale / safe), torch.zeros_like(scale)).clamp(0, levels)
    return v * t, v, t


def _check_levels(levels: int, group_size: int, where: str) -> None:
    if not isinstance(levels, int) or isinstance(levels, bool) or not 0 <= levels <= 16:
        raise ValueError(f"{where}: levels must be an int in 0..16 (0 = float group scales), got {levels!r}")
    if levels and not group_size:
        raise ValueError(f"{where}: levels apply to group scales; per-token scales (group_size=0) take none")


def quantize_int4_levels(x: torch.Tensor, group_size: int, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (values int8 [..., K] = code * v in [-128, 112], unit float32 [..., 1]): groups of
    ``group_size`` with scale levels (module docstring); ``values * unit`` is ``fake_quantize_int4(x,
    group_size, levels)`` before rounding to x.dtype."""
    where = "activation.quantize_int4_levels"
    _check_levels(levels, group_size, where)
    if not levels:
        raise ValueError(f"{where}: levels must be 1..16 here (use quantize_int4 for float group scales)")
    xg, scale = _group_scales(x, group_size, where)
    snapped, v, unit = _snap_group_scales(scale, levels)
    q = torch.nan_to_num(_codes(xg, snapped), nan=0.0)
    return (q * torch.nan_to_num(v, nan=0.0)).to(torch.int8).reshape(x.shape), unit.squeeze(-1).to(torch.float32)


def quantize_int4(x: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q int8 [..., K] in [-8, 7], scales float32 [..., K/group_size] or [..., 1]).

    For finite input, ``q * scales`` (scales repeated over each group) reconstructs x within
    scale / 2 per element. NaN/inf inputs give NaN/inf scales (q is then meaningless there).
    """
    q, scale = _quantize(x, group_size, "activation.quantize_int4")
    q = torch.nan_to_num(q, nan=0.0).to(torch.int8).reshape(x.shape)
    return q, scale.squeeze(-1).to(torch.float32)


def fake_quantize_int4(x: torch.Tensor, group_size: int = 0, levels: int = 0) -> torch.Tensor:
    """dequantize(quantize_int4(x)) in x.dtype (NaN and inf propagate as NaN to their token/group); with
    ``levels`` (groups only), the group scales snapped to levels of a per-token unit (module docstring)."""
    _check_levels(levels, group_size, "activation.fake_quantize_int4")
    q, scale = _quantize(x, group_size, "activation.fake_quantize_int4", levels)
    return (q * scale).reshape(x.shape).to(x.dtype)
