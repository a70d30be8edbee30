"""MXFP4 (OCP Microscaling Formats v1.0): E2M1 elements, one E8M0 scale per 32 elements along K.

Layout (the gpt-oss / compressed-tensors ``mxfp4-pack-quantized`` layout, so export is a rename):

- ``packed``: uint8 [N, K/2]. Byte ``j`` of a row holds element ``2j`` in its low nibble and element
  ``2j+1`` in its high nibble. A nibble is an E2M1 code: bit 3 sign, bits 2-1 exponent (bias 1),
  bit 0 mantissa. The 16 codes decode to ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}.
- ``scales``: uint8 [N, K/32], E8M0: the block's scale is ``2 ** (byte - 127)``; byte 0xFF is NaN.

Quantization (``scale_rule="floor"``, the spec's rule): per block, ``e = floor(log2(amax)) - 2``
(2 = emax of E2M1), clamped to the E8M0 range [-127, 127]; each element ``v / 2**e`` is rounded to
the nearest E2M1 value, ties to even mantissa, and saturated at ±6. All of that is exact power-of-two
arithmetic, so the result does not depend on the input dtype beyond the input's own values.

``scale_rule="mse"`` keeps the format but picks, per block, the exponent among {e-1, e, e+1} (within
the E8M0 range) that minimises the block's squared reconstruction error; ties keep ``e``. The floor
rule maps amax into [4, 8) and so clips everything above 6; a larger exponent sometimes wins.

Special values (documented behaviour, tested): a block that contains NaN or ±inf is encoded with the
E8M0 NaN scale 0xFF (as the spec says, a NaN scale makes every element of its block NaN; E2M1 has no
inf or NaN codes, so an infinite input cannot be represented and becomes NaN rather than a silently
wrong finite number). Its element nibbles are 0. An all-zero block gets scale byte 0 (2**-127) and
zero codes. Blocks whose amax is below 2**-125 use the smallest scale 2**-127 and round their
elements with it (mostly to zero). A negative input that rounds to zero keeps its sign (code 8, -0).
"""

from __future__ import annotations

import torch

from specq.formats._nibbles import cacheable, gather_pairs

BLOCK_SIZE = 32
SCALE_BIAS = 127
SCALE_NAN = 0xFF
E2M1_EMAX = 2  # largest E2M1 exponent: 6 = 1.5 * 2**2
E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127
SCALE_RULES = ("floor", "mse")

# E2M1 code -> value, codes 0..15 (bit 3 = sign).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Rounding |v| to an E2M1 magnitude code (0..7) with round-to-nearest-even: the code is the number
# of midpoints that |v| passes. At a midpoint the tie goes to the even mantissa: down at 0.25, 1.25,
# 2.5, 5 (to 0, 1, 2, 4) and up at 0.75, 1.75, 3.5 (to 1, 2, 4). Values above 6 saturate at code 7.
_TIES_DOWN = (0.25, 1.25, 2.5, 5.0)
_TIES_UP = (0.75, 1.75, 3.5)


def _check_weight(w: torch.Tensor, name: str = "w") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"mxfp4.quantize: {name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"mxfp4.quantize: {name} must be 2-D [N, K], got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"mxfp4.quantize: {name} is empty (shape {tuple(w.shape)}); nothing to quantize")
    if not w.is_floating_point():
        raise TypeError(f"mxfp4.quantize: {name} must be a floating-point tensor, got {w.dtype}")
    if w.shape[1] % BLOCK_SIZE != 0:
        raise ValueError(
            f"mxfp4.quantize: {name}.shape[1] (K={w.shape[1]}) must be a multiple of the MXFP4 block "
            f"size {BLOCK_SIZE}; pad K or keep this matmul unquantized")


def _round_e2m1_magnitude(a: torch.Tensor) -> torch.Tensor:
    """|v| (>= 0, finite) -> E2M1 magnitude code 0..7 (uint8), round-to-nearest-even, saturating."""
    down = torch.tensor(_TIES_DOWN, dtype=a.dtype, device=a.device)
    up = torch.tensor(_TIES_UP, dtype=a.dtype, device=a.device)
    # bucketize(right=False) counts boundaries strictly below a; right=True counts those <= a.
    code = torch.bucketize(a, down, right=False) + torch.bucketize(a, up, right=True)
    return code.to(torch.uint8)


def _encode_blocks(wb: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    """Blocks [N, B, 32] (finite) and exponents [N, B] (int) -> E2M1 codes uint8 [N, B, 32]."""
    v = torch.ldexp(wb, (-exp).unsqueeze(-1).to(wb.dtype))
    mag = _round_e2m1_magnitude(v.abs())
    sign = torch.signbit(wb).to(torch.uint8) << 3
    return mag | sign


_LUT_CACHE: dict = {}


def _value_lut(dtype: torch.dtype, device: torch.device, cache: bool) -> torch.Tensor:
    key = (dtype, device)
    lut = _LUT_CACHE.get(key) if cache else None
    if lut is None:
        lut = torch.tensor(E2M1_VALUES, dtype=dtype, device=device)
        if cache:
            _LUT_CACHE[key] = lut
    return lut


def _decode_codes(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return _value_lut(dtype, codes.device, cacheable(codes))[codes.long()]


def _block_sq_error(wb: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    codes = _encode_blocks(wb, exp)
    deq = torch.ldexp(_decode_codes(codes, wb.dtype), exp.unsqueeze(-1).to(wb.dtype))
    return (deq - wb).square().sum(-1)


def floor_exponents(amax: torch.Tensor) -> torch.Tensor:
    """The spec's shared exponent floor(log2(amax)) - 2, clamped to E8M0 (int32; amax=0 -> -127).

    Uses frexp (exact, including subnormal inputs) instead of a floating log2 that can round up
    just below a power of two.
    """
    _, e = torch.frexp(amax)  # amax = m * 2**e, m in [0.5, 1)  =>  floor(log2(amax)) = e - 1
    exp = (e - 1 - E2M1_EMAX).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)
    return torch.where(amax > 0, exp, torch.full_like(exp, E8M0_MIN_EXP))


CHUNK_ELEMENTS = 1 << 22  # rows are quantized in chunks of about this many elements (bounds temporaries)


def quantize(w: torch.Tensor, scale_rule: str = "floor") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight [N, K] to MXFP4: ``(packed uint8 [N, K/2], scales uint8 [N, K/32])``."""
    _check_weight(w)
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"mxfp4.quantize: scale_rule must be one of {SCALE_RULES}, got {scale_rule!r}")
    n, k = w.shape
    rows = max(1, CHUNK_ELEMENTS // k)
    parts = [_quantize_rows(w[i:i + rows], scale_rule) for i in range(0, n, rows)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p for p, _ in parts]), torch.cat([s for _, s in parts])


def _quantize_rows(w: torch.Tensor, scale_rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    # float32 holds bf16/fp16 values exactly; float64 input stays float64 (no double rounding).
    wf = w.detach().to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    wb = wf.reshape(n, k // BLOCK_SIZE, BLOCK_SIZE)

    finite = torch.isfinite(wb).all(-1)  # [N, B]; False where a NaN or inf is in the block
    wb = torch.where(finite.unsqueeze(-1), wb, torch.zeros((), dtype=wb.dtype, device=wb.device))
    amax = wb.abs().amax(-1)
    exp = floor_exponents(amax)

    if scale_rule == "mse":
        candidates = [exp, (exp + 1).clamp(max=E8M0_MAX_EXP), (exp - 1).clamp(min=E8M0_MIN_EXP)]
        errs = torch.stack([_block_sq_error(wb, c) for c in candidates])  # [3, N, B]
        best = errs.argmin(0)  # first minimum: ties keep the spec's exponent
        exp = torch.gather(torch.stack(candidates), 0, best.unsqueeze(0)).squeeze(0)

    codes = _encode_blocks(wb, exp).reshape(n, k)
    codes = torch.where(finite.repeat_interleave(BLOCK_SIZE, dim=1), codes, torch.zeros_like(codes))
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    scales = (exp + SCALE_BIAS).to(torch.uint8)
    scales = torch.where(finite, scales, torch.full_like(scales, SCALE_NAN))
    return packed.contiguous(), scales.contiguous()


def _check_packed(packed: torch.Tensor, scales: torch.Tensor, where: str) -> None:
    for name, t in (("packed", packed), ("scales", scales)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.uint8:
            raise TypeError(f"{where}: {name} must be uint8 (MXFP4 layout), got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{where}: {name} must be 2-D, got shape {tuple(t.shape)}")
    n, half_k = packed.shape
    if scales.shape[0] != n or scales.shape[1] * BLOCK_SIZE != 2 * half_k:
        raise ValueError(
            f"{where}: scales shape {tuple(scales.shape)} does not match packed shape "
            f"{tuple(packed.shape)}; expected [N, K/32] = [{n}, {2 * half_k / BLOCK_SIZE:g}] "
            f"for K = 2 * packed.shape[1] = {2 * half_k}")
    if packed.device != scales.device:
        raise ValueError(f"{where}: packed is on {packed.device} but scales on {scales.device}")


_SCALE_TABLE_CACHE: dict = {}


def scale_values(scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """E8M0 bytes -> 2**(byte - 127) in ``dtype`` (NaN for 0xFF). Exact in float32 and bfloat16."""
    s = torch.ldexp(torch.ones((), dtype=torch.float32, device=scales.device),
                    scales.to(torch.float32) - SCALE_BIAS)
    s = torch.where(scales == SCALE_NAN, torch.full_like(s, float("nan")), s)
    return s.to(dtype)


def _scaled_pair_table(dtype: torch.dtype, device: torch.device, cache: bool) -> torch.Tensor:
    """[65536, 2] table in ``dtype``: index (scale_byte << 8) | byte -> the byte's two elements times
    the block scale, i.e. (E2M1[low] * 2**(s-127), E2M1[high] * 2**(s-127)); NaN for s = 0xFF.
    Each entry is computed exactly in float64 and rounded once to ``dtype`` (exact for float32 and
    bfloat16; float16 overflows to inf and underflows like a cast would)."""
    key = (dtype, device)
    t = _SCALE_TABLE_CACHE.get(key) if cache else None
    if t is None:
        b = torch.arange(256)
        vals = torch.tensor(E2M1_VALUES, dtype=torch.float64)
        pair = torch.stack([vals[b & 0xF], vals[b >> 4]], dim=1)                 # [256 bytes, 2]
        e = torch.arange(256)
        scale = torch.ldexp(torch.ones(256, dtype=torch.float64), e - SCALE_BIAS)
        # no in-place write: the table is also built inside traced code (inductor's decomposition of
        # the MXFP4 op on the CPU), where in-place writes to fresh tensors are not allowed
        scale = torch.where(e == SCALE_NAN, torch.full_like(scale, float("nan")), scale)
        t = (scale[:, None, None] * pair[None]).reshape(256 * 256, 2).to(dtype=dtype, device=device)
        if cache:
            _SCALE_TABLE_CACHE[key] = t
    return t


def dequantize(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """MXFP4 ``(packed [N, K/2], scales [N, K/32])`` -> weight [N, K] in ``dtype``.

    One table lookup per byte: the index is (scale byte << 8) | packed byte, the entry both elements
    already multiplied by the block scale (no separate multiply pass). float32 and bfloat16 results
    are exact; other dtypes get the exact value rounded once, so a zero element in a block whose scale
    overflows the dtype gives 0, not 0 * inf = NaN.
    """
    _check_packed(packed, scales, "mxfp4.dequantize")
    if not dtype.is_floating_point:
        raise TypeError(f"mxfp4.dequantize: dtype must be a floating-point dtype, got {dtype}")
    n, half_k = packed.shape
    nb = scales.shape[1]
    table = _scaled_pair_table(dtype, packed.device, cacheable(packed))
    idx = packed.reshape(n, nb, BLOCK_SIZE // 2).to(torch.int32) | (scales.to(torch.int32) << 8).unsqueeze(-1)
    return gather_pairs(table, idx).reshape(n, 2 * half_k)
