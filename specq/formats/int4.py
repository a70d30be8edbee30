"""Group-wise symmetric INT4 weights in the compressed-tensors ``pack-quantized`` layout.

- ``packed``: int32 [N, K/8]. Word ``j`` of a row holds elements ``8j .. 8j+7``; element ``8j+i`` is
  stored as ``q + 8`` (0..15) in bits ``4i .. 4i+3`` (LSB first). On a little-endian machine this is
  the same nibble order as MXFP4: byte ``b`` of the row holds element ``2b`` low, ``2b+1`` high.
- ``scales``: [N, K/group_size] in the weight's dtype; ``w ≈ q * scale`` with q in [-8, 7].

Quantization (default, plain): ``scale = amax(|group|) / 7`` (rounded to the scales' dtype),
``q = clamp(round_half_even(w / scale), -8, 7)``. Every element is then within scale/2 of its
reconstruction (no clipping), so the error bound is ``amax / 14`` per group, plus the rounding of the
scale itself. ``clip_ratio`` (a float in (0, 1], or ``"search"``) shrinks the scale to trade a few
clipped outliers for finer steps; ``"search"`` picks, per group, the best of a small grid of
ratios by squared error (the default stays plain; docs/formats.md gives the measured effect).

Scales are stored in the weight's dtype, as the layout prescribes: a group whose amax / 7 underflows
that dtype gets scale 0 and dequantizes to zeros, and float16 scales below its normal range (groups
with amax under ~4e-4) carry fewer bits. Non-finite weights raise ValueError: integers have no NaN or inf, and a silent wrong weight is worse
than an error.
"""

from __future__ import annotations

import sys

import torch

from specq.formats._nibbles import decode_bytes

QMIN, QMAX = -8, 7
PACK = 8  # int4 values per int32
CLIP_SEARCH_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
CHUNK_ELEMENTS = 1 << 22  # rows are quantized in chunks of about this many elements (bounds temporaries)


def _check_weight(w: torch.Tensor, group_size: int) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"int4.quantize: w must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"int4.quantize: w must be 2-D [N, K], got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"int4.quantize: w is empty (shape {tuple(w.shape)}); nothing to quantize")
    if not w.is_floating_point():
        raise TypeError(f"int4.quantize: w must be a floating-point tensor, got {w.dtype}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"int4.quantize: group_size must be a positive int, got {group_size!r}")
    k = w.shape[1]
    if k % group_size != 0:
        raise ValueError(
            f"int4.quantize: w.shape[1] (K={k}) must be a multiple of group_size={group_size}; "
            f"choose a group size that divides K")
    if k % PACK != 0:
        raise ValueError(f"int4.quantize: w.shape[1] (K={k}) must be a multiple of {PACK} (8 int4 values per int32)")
    if not bool(torch.isfinite(w).all()):
        bad = (~torch.isfinite(w)).nonzero()[0].tolist()
        raise ValueError(f"int4.quantize: w has a non-finite value (first at index {bad}); INT4 cannot represent NaN or inf")


def pack(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], shape [N, K] (K % 8 == 0) -> int32 [N, K/8], (q + 8) LSB-first."""
    n, k = q.shape
    u = (q.to(torch.int64) + 8).reshape(n, k // PACK, PACK)
    shifts = torch.arange(0, 4 * PACK, 4, dtype=torch.int64, device=q.device)
    words = (u << shifts).sum(-1)  # 0 .. 2**32 - 1; wrap to int32 two's complement explicitly
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def _check_packed(packed: torch.Tensor, where: str) -> None:
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"{where}: packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.int32:
        raise TypeError(f"{where}: packed must be int32 (8 int4 values per word), got {packed.dtype}")
    if packed.dim() != 2:
        raise ValueError(f"{where}: packed must be 2-D [N, K/8], got shape {tuple(packed.shape)}")


_LITTLE_ENDIAN = sys.byteorder == "little"
INT4_VALUES = tuple(float(v) for v in range(-8, 8))  # nibble n holds the value n - 8


def unpack_values(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int32 [N, K/8] -> the int4 values [N, K] as ``dtype`` (one vectorised gather per byte)."""
    n, words = packed.shape
    if _LITTLE_ENDIAN:
        b = packed.contiguous().view(torch.uint8)  # [N, 4*words]: byte i = bits 8i..8i+7
        return decode_bytes(b, INT4_VALUES, dtype)
    shifts = torch.arange(0, 4 * PACK, 4, dtype=torch.int32, device=packed.device)
    q = ((packed.unsqueeze(-1) >> shifts) & 0xF) - 8
    return q.reshape(n, words * PACK).to(dtype)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [N, K/8] -> int8 [N, K] in [-8, 7]."""
    _check_packed(packed, "int4.unpack")
    return unpack_values(packed, torch.int8)


def _scales_for(wg: torch.Tensor, ratio: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """Group scales amax * ratio / 7, rounded to the storage dtype (what dequantize will use)."""
    return (wg.abs().amax(-1) * ratio / QMAX).to(dtype)


def _quantize_groups(wg: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    s = scales.to(wg.dtype).unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero group (or underflowed scale) -> q = 0
    q = torch.round(wg / safe).clamp(QMIN, QMAX)
    return torch.where(s > 0, q, torch.zeros_like(q))


def quantize(w: torch.Tensor, group_size: int = 128, clip_ratio: float | str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight [N, K] to INT4: ``(packed int32 [N, K/8], scales [N, K/group_size])``.

    ``clip_ratio``: None (plain, amax / 7), a float in (0, 1] (scale = ratio * amax / 7, values beyond
    the range clip to [-8, 7]), or ``"search"`` (per group, the ratio from ``CLIP_SEARCH_GRID`` with
    the least squared error).
    """
    _check_weight(w, group_size)
    if not (clip_ratio is None or clip_ratio == "search" or (
            isinstance(clip_ratio, (int, float)) and not isinstance(clip_ratio, bool) and 0 < clip_ratio <= 1)):
        raise ValueError(f"int4.quantize: clip_ratio must be None, a float in (0, 1] or 'search', got {clip_ratio!r}")
    n, k = w.shape
    rows = max(1, CHUNK_ELEMENTS // k)
    parts = [_quantize_rows(w[i:i + rows], group_size, clip_ratio) for i in range(0, n, rows)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p for p, _ in parts]), torch.cat([s for _, s in parts])


def _quantize_rows(w: torch.Tensor, group_size: int, clip_ratio) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    g = k // group_size
    # float64: w / scale of two float32 (or narrower) numbers is then decided correctly at .5 ties
    wg = w.detach().to(torch.float64).reshape(n, g, group_size)
    if clip_ratio is None:
        scales = _scales_for(wg, 1.0, w.dtype)
    elif clip_ratio == "search":
        best_s, best_err = None, None
        for r in CLIP_SEARCH_GRID:
            s = _scales_for(wg, r, w.dtype)
            err = (_quantize_groups(wg, s) * s.to(wg.dtype).unsqueeze(-1) - wg).square().sum(-1)
            if best_s is None:
                best_s, best_err = s, err
            else:
                better = err < best_err
                best_s = torch.where(better, s, best_s)
                best_err = torch.where(better, err, best_err)
        scales = best_s
    else:
        scales = _scales_for(wg, float(clip_ratio), w.dtype)
    q = _quantize_groups(wg, scales).reshape(n, k)
    return pack(q), scales.contiguous()


def dequantize(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """INT4 ``(packed [N, K/8], scales [N, G])`` -> weight [N, K] (group size K / G), in ``dtype``
    (default: the scales' dtype). The product q * scale is computed in ``dtype``."""
    _check_packed(packed, "int4.dequantize")
    if not isinstance(scales, torch.Tensor) or not scales.is_floating_point() or scales.dim() != 2:
        raise TypeError("int4.dequantize: scales must be a 2-D floating-point tensor [N, K/group_size], "
                        f"got {getattr(scales, 'dtype', type(scales).__name__)} "
                        f"shape {tuple(getattr(scales, 'shape', ()))}")
    n, words = packed.shape
    k = words * PACK
    if scales.shape[0] != n or scales.shape[1] == 0 or k % scales.shape[1] != 0:
        raise ValueError(
            f"int4.dequantize: scales shape {tuple(scales.shape)} does not fit packed shape "
            f"{tuple(packed.shape)} (K = 8 * {words} = {k}); expected [N, K/group_size] with N = {n}")
    dtype = scales.dtype if dtype is None else dtype
    g = scales.shape[1]
    q = unpack_values(packed, dtype).reshape(n, g, k // g)
    return (q * scales.to(dtype).unsqueeze(-1)).reshape(n, k)


# ----------------------------------------------------------------------------- integer scale levels
# W4A4 on INT8 tensor cores: with float group scales, every 128-deep chunk's int32 dot must be
# converted and scaled into a float accumulator (one conversion and one FMA per output per chunk,
# the bulk of the GEMM's instructions on Hopper). If a row's group scales are integer multiples of one
# per-row unit, s[n, g] = level[n, g] * unit[n] with level <= 16, the product q * level fits int8
# ([-128, 112]), so the kernel can decode q * level as the weight operand and sum over all of K in
# int32, scaling once at the end (the scheme of QServe's progressive group quantization). Snapping is
# the draft's business: the stored scales (and W4A16, the verifier) are untouched.

MAX_SCALE_LEVELS = 16  # q * level must fit int8: -8 * 16 = -128
UNIT_BITS = 19  # units carry at most 19 significant bits, so level * unit (level <= 16) is exact in fp32


def _check_levels(levels: int, where: str) -> None:
    if not isinstance(levels, int) or isinstance(levels, bool) or not 1 <= levels <= MAX_SCALE_LEVELS:
        raise ValueError(f"{where}: levels must be an int in 1..{MAX_SCALE_LEVELS} (q * level must fit int8), "
                         f"got {levels!r}")


def snap_scales(scales: torch.Tensor, levels: int = MAX_SCALE_LEVELS, check: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scales [N, G] -> ``(level uint8 [N, G] in 0..levels, unit fp32 [N])`` with
    ``level * unit`` the nearest multiple of the row's unit to each scale; the unit is the row's
    largest scale / levels (rounded to ``UNIT_BITS`` significant bits), so that group gets ``levels``
    and none more. A row of zero scales gets unit 0 and levels 0. ``check=False`` skips the data checks
    (they read values back to the host: no sync in a CUDA graph capture)."""
    if check:
        _check_snap_args(scales, levels, "int4.snap_scales")
    level, unit = _snap(scales, levels)
    return level.to(torch.uint8), unit


def snapped_scales(scales: torch.Tensor, levels: int = MAX_SCALE_LEVELS, check: bool = True) -> torch.Tensor:
    """``level * unit`` of ``snap_scales`` as fp32 [N, G] (exact): the group scales W4A4 uses.
    ``check=False`` skips the data checks (for traced code, where they cannot run)."""
    if check:
        _check_snap_args(scales, levels, "int4.snapped_scales")
    level, unit = _snap(scales, levels)
    return (level * unit.to(torch.float64)[:, None]).to(torch.float32)


def _check_snap_args(scales: torch.Tensor, levels: int, where: str) -> None:
    _check_levels(levels, where)
    if not isinstance(scales, torch.Tensor) or not scales.is_floating_point() or scales.dim() != 2:
        raise TypeError(f"{where}: scales must be a 2-D floating-point tensor [N, G], got "
                        f"{getattr(scales, 'dtype', type(scales).__name__)} shape {tuple(getattr(scales, 'shape', ()))}")
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise ValueError(f"{where}: scales must be finite and >= 0 (amax / 7 per group)")


def _snap(scales: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(level as float64 [N, G], unit fp32 [N]): the math of snap_scales, no checks, traceable."""
    s = scales.detach().to(torch.float64)
    mant, exp = torch.frexp(s.amax(1) / levels)
    unit = torch.ldexp(torch.round(mant * 2.0 ** UNIT_BITS) / 2.0 ** UNIT_BITS, exp).to(torch.float32)
    u = unit.to(torch.float64)[:, None]
    level = torch.where(u > 0, torch.round(s / torch.where(u > 0, u, 1.0)), 0.0).clamp(0, levels)
    return level, unit
