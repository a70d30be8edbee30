"""Dynamic symmetric INT4 activation quantization (the A4 of W4A4), per token or per group.

Scales are computed at run time from the activation itself: ``scale = amax / 7`` over the last dim
(``group_size=0``, one scale per token) or over each group of ``group_size`` consecutive elements of
the last dim; ``q = clamp(round_half_even(x / scale), -8, 7)``. No clipping happens (|x| <= 7 *
scale), so every element is within scale / 2 of its reconstruction. All arithmetic is float32 (or
float64 for float64 input) so bf16 activations do not lose bits in the division.

There is no data-dependent control flow (no checks on values), so these functions trace cleanly.
Special values: a NaN or inf in a token (group) makes its scale NaN or inf, and the whole token
(group) reconstructs as NaN, so the problem shows up instead of hiding as a wrong finite number.
A token (group) of zeros has scale 0 and reconstructs exactly; one whose amax / 7 underflows float32
(amax below ~5e-45) also gets scale 0 and reconstructs as zeros.
"""

from __future__ import annotations

import torch

QMIN, QMAX = -8, 7


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


def _quantize(x: torch.Tensor, group_size: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xg = _grouped(x, group_size, where).to(work)
    # amax / 7 via float64: some backends (CUDA) divide by a Python scalar as a multiplication by
    # its rounded reciprocal, which is off by an ulp now and then; in float64 the result rounds to
    # the correctly rounded float32 quotient on every device (the table is [tokens, groups], tiny).
    scale = (xg.abs().amax(-1, keepdim=True).to(torch.float64) / QMAX).to(work)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xg / safe).clamp(QMIN, QMAX)
    return q, scale


def quantize_int4(x: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q int8 [..., K] in [-8, 7], scales float32 [..., K/group_size] or [..., 1]).

    For finite input, ``q * scales`` (scales repeated over each group) reconstructs x within
    scale / 2 per element. NaN/inf inputs give NaN/inf scales (q is then meaningless there).
    """
    q, scale = _quantize(x, group_size, "activation.quantize_int4")
    q = torch.nan_to_num(q, nan=0.0).to(torch.int8).reshape(x.shape)
    return q, scale.squeeze(-1).to(torch.float32)


def fake_quantize_int4(x: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """dequantize(quantize_int4(x)) in x.dtype (NaN and inf propagate as NaN to their token/group)."""
    q, scale = _quantize(x, group_size, "activation.fake_quantize_int4")
    return (q * scale).reshape(x.shape).to(x.dtype)
