"""Weight-streaming GEMV on Triton for 4-bit weights: ``y = x @ dequant(W).T (+ bias)`` for M <= 4.

Decoding (M = 1) and short verifies read every weight once and do a few FMAs per weight. An H100
streams ~22 4-bit weights per clock per SM at its copy bandwidth, against ~90 instructions per clock
per SM that a real kernel issues, so the budget is about four instructions per weight, loads,
address arithmetic and dequantization included. Everything here serves that budget:

- Layout. A program owns BN weight rows (BN = 1, 2, 4). Each thread loads 4 consecutive int32 words
  (16 bytes, 32 weights) of each row per chunk, and the 32 matching x values as four 16-byte loads:
  the words and their x values are in the same thread, so nothing moves between threads inside the
  K loop, and each x value is converted once per thread for all BN rows. The 32 weights of a thread
  share one scale group (groups are multiples of 32), so the scale costs one load and one FMA per
  32 weights. The single cross-thread reduction runs once, after the loop.
- Loads of chunk c + 1 are issued before chunk c's math (register double buffering: Triton does not
  software-pipeline loads that do not feed a tl.dot).
- 16-byte loads, checked in the sm_90 SASS (benchmarks/sass_report.py, tests/test_sass_budget.py).
  The prefetch's mask decides the weight loads' width: ``w_idx < K // 8`` is provably constant over
  2 words only and cut every load in two; when K is a multiple of the chunk the mask is one scalar
  (the chunk is all in or all past the end). bf16 x is read as int32 words of two values (``XW``):
  a bf16 is the top half of its fp32, so the two values cost a shift and an AND, where
  ``.to(float32)`` spent a PRMT and a shift on every high half. Together (2026-12-07, after the
  H100 runs below, SASS only, not yet timed): one row 3.73 -> 3.54 (INT4) and 4.88 -> 4.68 (MXFP4)
  instructions per weight; four rows 8.66 -> 8.12 and 9.58 -> 9.06.
- INT4 dequantization, 2.25 instructions per weight (shift amortized, one LOP3, one FMA):
  ``W << 7`` places nibbles 0..3 at bits 7, 11, 15, 19 and ``W >> 9`` nibbles 4..7; OR-ed into the
  mantissa of 1.0 (one LOP3 with the mask as immediate and 1.0 in a register) a nibble u at bit b is
  the fp32 ``1 + u 2^(b-23)``; multiplied by ``x 2^(23-b)`` (x scaled once per thread) and summed
  by an FMA chain it gives ``sum x 2^(23-b) + sum u x``; the first sum and ``8 sum x`` depend on x
  alone, so ``sum q x`` (q = u - 8) costs one subtraction per 32 weights.
- INT4 with several rows of x (``kernel_format``): the scaled-x trick costs ~3 instructions per x
  value per row, so there each nibble becomes the exact float q instead: OR-ed into the mantissa of
  ``2^(23-b)`` it is ``2^(23-b) + u``, and one FADD leaves ``u - 8``. ptxas computes the q once for all
  rows; SASS at 4 rows 10.15 -> 8.66 instructions per weight; H100 at M = 4 on the 8B shapes 9-16%
  faster, at M = 2 5-7% (benchmarks/results/gemv_lab_h100.md).
- MXFP4: nibbles i and i + 4 of a word (16 bits apart) become the two halves of one int32 holding two
  fp16 ``e2m1 * 2^-14`` (magnitude at fp16 bits 9..11, sign at 15; code 1 is an fp16 subnormal), two
  shifts and two LOP3 per two weights; one inline-asm block converts both halves to fp32 in place
  (``cvt.f32.f16`` of ``mov.b32 {lo, hi}``: two HADD2.F32). Written with int16 casts, Triton packed
  the 16-bit tiles two to a register and ptxas spent 0.7 PRMT per weight regrouping them: 5.38 ->
  4.88 instructions per weight, and on the H100 gate/up [28672, 4096] at one token 30.4 -> 27.8 us
  (the down projection unchanged). The partial sum is multiplied by 2^14 and the E8M0 scale
  2^(e - 127), both exact, per 32 weights.

Rows of x (M <= 4) share the words: one accumulator per row of x.

Where the time goes (H100, 2026-12-07, benchmarks/results/gemv_lab_h100.md): a Triton kernel that only
reads the same bytes once takes 11.5 us for 4096 x 14336 (88% of the 1 GiB copy bandwidth; 62% for the
8 MiB of 4096 x 4096); this GEMV reaches 71-83% of that read floor at one token (INT4), 70-78% (MXFP4).
Under ncu the MXFP4 GEMV issues an instruction in 76% of the scheduler cycles with eligible warps
waiting ("not selected" is the largest stall): it is bound by the instruction count, so the fp16-pair
decode (~2 instructions per weight) plus conversion and FMA is what is left to cut.

Tried and dropped:
- (2026-11-23, H100, lab A/B, autotuned both ways) MXFP4 on HFMA2.BF16 pairs (nibbles i and i + 4
  decoded straight into bf16x2, x packed as bf16x2 pairs scaled by 2^64, four HFMA2 per word, then
  fp32): fewer PTX instructions and gate/up at one token 31.3 -> 27.5 us, but the down projection
  16.3 -> 20.0 us and every M = 4 shape 30-40% slower; the 8B-shape MXFP4 step 3.132 -> 3.140 ms, with
  twice the rounding error. The limit is not only the instruction count.
- (2026-12-07, H100, gemv_lab) a persistent grid (4-16 programs per SM, each walking its row blocks
  and their K chunks as one flat loop, so the prefetch crosses block boundaries): slower than one
  program per block on every 8B shape at one token (3-8%; e.g. 4096 x 28672 MXFP4 27.8 -> 29.9 us),
  with lower achieved occupancy under ncu (35% -> 30%). Cold first loads were not the limit.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from specq.kernels.triton_common import INTERPRET, Config, ConfigCache

_INTERPRET = tl.constexpr(INTERPRET)  # a constexpr global, readable inside kernels

FORMAT_MXFP4 = 0
FORMAT_INT4 = 1
# kernel-internal: INT4 decoded to exact q floats, shared by the rows of x (kernel_format)
_FORMAT_INT4_EXACT = 2
MAX_ROWS = 4


@triton.jit
def _split4(v):
    """[JT, 4] (4 consecutive elements per thread) -> four [JT] tiles (element 4t + s for s = 0..3)."""
    a, b = tl.split(tl.reshape(v, (v.shape[0], 2, 2)))   # b = odd s: [JT, 2] over s // 2
    v0, v2 = tl.split(a)
    v1, v3 = tl.split(b)
    return v0, v1, v2, v3


@triton.jit
def _split8(v):
    """[JT, 8] -> eight [JT] tiles (element 8t + i for i = 0..7)."""
    a, b = tl.split(tl.reshape(v, (v.shape[0], 2, 2, 2)))  # i = 4p + 2q + r; split r
    a0, a1 = tl.split(a)                                    # q
    b0, b1 = tl.split(b)
    x0, x4 = tl.split(a0)
    x2, x6 = tl.split(a1)
    x1, x5 = tl.split(b0)
    x3, x7 = tl.split(b1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _win(t, b: tl.constexpr, ONE):
    """The nibble at bits b..b+3 of t in the mantissa of 1.0: the fp32 ``1 + u 2^(b-23)`` (one LOP3)."""
    return ((t & (0xF << b)) | ONE).to(tl.float32, bitcast=True)


@triton.jit
def _q_win(t, b: tl.constexpr, ONE):
    """The nibble u at bits b..b+3 of t as the exact fp32 q = u - 8: OR-ed into the mantissa of
    2^(23-b) (exponent bits from ONE) it is the float 2^(23-b) + u; one LOP3 and one FADD."""
    magic = ONE + ((23 - b) << 23)
    return ((t & (0xF << b)) | magic).to(tl.float32, bitcast=True) - (2.0 ** (23 - b) + 8.0)


@triton.jit
def _nibble(t, b: tl.constexpr, ONE, EXACT: tl.constexpr):
    if EXACT:
        return _q_win(t, b, ONE)
    else:
        return _win(t, b, ONE)


@triton.jit
def _int4_word(w, y0, y1, y2, y3, y4, y5, y6, y7, ONE, p, EXACT: tl.constexpr):
    """One word's 8 weights against their x values, added to p. Scaled x (EXACT False):
    p + sum_i (1 + u_i 2^-c_i) y_i with y_i = x_i 2^c_i (c = 16, 12, 8, 4, 16, 12, 8, 4). Exact q (EXACT
    True): p + sum_i q_i x_i with unscaled x; the q_i do not depend on x, so with several rows of x
    ptxas decodes each weight once for all rows (2.25 instructions per weight, then one FFMA per row),
    where the scaled-x form pays ~3 instructions per x value per row."""
    lo = w << 7
    hi = w >> 9  # arithmetic: the sign-filled top bits are never read
    p = tl.fma(_nibble(lo, 7, ONE, EXACT), y0, p)
    p = tl.fma(_nibble(lo, 11, ONE, EXACT), y1, p)
    p = tl.fma(_nibble(lo, 15, ONE, EXACT), y2, p)
    p = tl.fma(_nibble(lo, 19, ONE, EXACT), y3, p)
    p = tl.fma(_nibble(hi, 7, ONE, EXACT), y4, p)
    p = tl.fma(_nibble(hi, 11, ONE, EXACT), y5, p)
    p = tl.fma(_nibble(hi, 15, ONE, EXACT), y6, p)
    return tl.fma(_nibble(hi, 19, ONE, EXACT), y7, p)


@triton.jit
def _e2m1_pair(w, i: tl.constexpr):
    """Nibbles i and i + 4 of w (16 bits apart) as the two fp16 halves of one int32: magnitude bits
    at fp16 bits 9..11 and the sign at bit 15 are exactly e2m1 * 2^-14 (code 1 is an fp16 subnormal).
    Two shifts and two LOP3s build two weights."""
    if i < 3:
        mag = (w << (9 - 4 * i)) & 0x0E000E00
    else:
        mag = (w >> 3) & 0x0E000E00
    return mag | ((w << (12 - 4 * i)) & -2147450880)  # 0x80008000


@triton.jit
def _halves(v):
    """int32 holding two fp16 -> (low, high) as fp32. On the GPU one inline-asm block converts the
    two halves of the register in place (two HADD2.F32 reading .H0/.H1); written with int16 casts,
    Triton packs the 16-bit tiles two to a register and ptxas spends ~0.7 PRMT per weight moving
    halves around first (SASS of the sm_90 build, benchmarks/sass_report.py)."""
    if _INTERPRET:
        lo = v.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo, hi
    else:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }",
            "=r,=r,r", [v], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        return lo.to(tl.float32, bitcast=True), hi.to(tl.float32, bitcast=True)


@triton.jit
def _mxfp4_word(w, x0, x1, x2, x3, x4, x5, x6, x7, p):
    """p + sum_i e2m1_i 2^-14 x_i for one word (nibble i: magnitude at 4i..4i+2, sign at 4i+3)."""
    v0, v4 = _halves(_e2m1_pair(w, 0))
    v1, v5 = _halves(_e2m1_pair(w, 1))
    v2, v6 = _halves(_e2m1_pair(w, 2))
    v3, v7 = _halves(_e2m1_pair(w, 3))
    p = tl.fma(v0, x0, p)
    p = tl.fma(v1, x1, p)
    p = tl.fma(v2, x2, p)
    p = tl.fma(v3, x3, p)
    p = tl.fma(v4, x4, p)
    p = tl.fma(v5, x5, p)
    p = tl.fma(v6, x6, p)
    return tl.fma(v7, x7, p)


@triton.jit
def _x_sub(x_ptr, off, mask, MASKED: tl.constexpr):
    """x values 8j + 0..7 of one word position per thread, as eight fp32 [JT] tiles."""
    if MASKED:
        v = tl.load(x_ptr + off, mask=mask, other=0.0)
    else:
        v = tl.load(x_ptr + off)
    return _split8(v.to(tl.float32))


@triton.jit
def _x_sub_words(w_ptr, off, mask, MASKED: tl.constexpr):
    """bf16 x read as int32 words (two values each; off [JT, 4] word offsets): values 8j + 0..7 as
    eight fp32 [JT] tiles. A bf16 is the top half of its fp32, so the low value is one shift and the
    high one an AND, where ``.to(float32)`` spends a PRMT and a shift on each high value."""
    if MASKED:
        v = tl.load(w_ptr + off, mask=mask, other=0)
    else:
        v = tl.load(w_ptr + off)
    w0, w1, w2, w3 = _split4(v)
    return ((w0 << 16).to(tl.float32, bitcast=True), (w0 & -65536).to(tl.float32, bitcast=True),
            (w1 << 16).to(tl.float32, bitcast=True), (w1 & -65536).to(tl.float32, bitcast=True),
            (w2 << 16).to(tl.float32, bitcast=True), (w2 & -65536).to(tl.float32, bitcast=True),
            (w3 << 16).to(tl.float32, bitcast=True), (w3 & -65536).to(tl.float32, bitcast=True))


@triton.jit
def _row_partial(w0, w1, w2, w3, X, ONE, FORMAT: tl.constexpr):
    """One weight row's [JT] partial sum over its 32 weights per thread, before the group scale."""
    (a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7,
     c0, c1, c2, c3, c4, c5, c6, c7, e0, e1, e2, e3, e4, e5, e6, e7, d) = X
    p = tl.zeros(w0.shape, dtype=tl.float32)
    if FORMAT != 0:  # INT4; d = 0 for the exact form (FORMAT 2), whose x is unscaled
        p = _int4_word(w0, a0, a1, a2, a3, a4, a5, a6, a7, ONE, p, FORMAT == 2)
        p = _int4_word(w1, b0, b1, b2, b3, b4, b5, b6, b7, ONE, p, FORMAT == 2)
        p = _int4_word(w2, c0, c1, c2, c3, c4, c5, c6, c7, ONE, p, FORMAT == 2)
        p = _int4_word(w3, e0, e1, e2, e3, e4, e5, e6, e7, ONE, p, FORMAT == 2)
        return p - d
    else:
        p = _mxfp4_word(w0, a0, a1, a2, a3, a4, a5, a6, a7, p)
        p = _mxfp4_word(w1, b0, b1, b2, b3, b4, b5, b6, b7, p)
        p = _mxfp4_word(w2, c0, c1, c2, c3, c4, c5, c6, c7, p)
        p = _mxfp4_word(w3, e0, e1, e2, e3, e4, e5, e6, e7, p)
        return p * 16384.0  # * 2^14, exact


@triton.jit
def _scaled4(x0, x1, x2, x3, x4, x5, x6, x7):
    """INT4: y_i = x_i 2^c_i and sum_i y_i + 8 x_i (the x-only part of the FMA chain)."""
    y0 = x0 * 65536.0
    y1 = x1 * 4096.0
    y2 = x2 * 256.0
    y3 = x3 * 16.0
    y4 = x4 * 65536.0
    y5 = x5 * 4096.0
    y6 = x6 * 256.0
    y7 = x7 * 16.0
    d = ((x0 + x4) * 65544.0 + (x1 + x5) * 4104.0) + ((x2 + x6) * 264.0 + (x3 + x7) * 24.0)
    return y0, y1, y2, y3, y4, y5, y6, y7, d


@triton.jit
def _load_x(x_ptr, row, stride_xm, k0, K, t, FORMAT: tl.constexpr, MASKED: tl.constexpr, XW: tl.constexpr):
    """The 32 x values of each thread (words 4t .. 4t + 3 of the chunk), ready for the FMA chains,
    plus (INT4) the x-only correction d per thread. XW: bf16 x with an even row stride, read as int32
    words of two values (K is a multiple of 8, so a word never straddles the end)."""
    if XW:
        base = x_ptr.to(tl.pointer_type(tl.int32)) + (row * stride_xm + k0) // 2
        o = 16 * t[:, None] + tl.arange(0, 4)[None, :]
        m = (k0 + 2 * o) < K
        a0, a1, a2, a3, a4, a5, a6, a7 = _x_sub_words(base, o, m, MASKED)
        b0, b1, b2, b3, b4, b5, b6, b7 = _x_sub_words(base, o + 4, m, MASKED)
        c0, c1, c2, c3, c4, c5, c6, c7 = _x_sub_words(base, o + 8, m, MASKED)
        e0, e1, e2, e3, e4, e5, e6, e7 = _x_sub_words(base, o + 12, m, MASKED)
    else:
        base = x_ptr + row * stride_xm + k0
        o = 32 * t[:, None] + tl.arange(0, 8)[None, :]
        m = (k0 + o) < K
        a0, a1, a2, a3, a4, a5, a6, a7 = _x_sub(base, o, m, MASKED)
        b0, b1, b2, b3, b4, b5, b6, b7 = _x_sub(base, o + 8, m, MASKED)
        c0, c1, c2, c3, c4, c5, c6, c7 = _x_sub(base, o + 16, m, MASKED)
        e0, e1, e2, e3, e4, e5, e6, e7 = _x_sub(base, o + 24, m, MASKED)
    if FORMAT == 1:
        a0, a1, a2, a3, a4, a5, a6, a7, da = _scaled4(a0, a1, a2, a3, a4, a5, a6, a7)
        b0, b1, b2, b3, b4, b5, b6, b7, db = _scaled4(b0, b1, b2, b3, b4, b5, b6, b7)
        c0, c1, c2, c3, c4, c5, c6, c7, dc = _scaled4(c0, c1, c2, c3, c4, c5, c6, c7)
        e0, e1, e2, e3, e4, e5, e6, e7, de = _scaled4(e0, e1, e2, e3, e4, e5, e6, e7)
        d = (da + db) + (dc + de)
    else:
        d = tl.zeros(a0.shape, dtype=tl.float32)
    return (a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7,
            c0, c1, c2, c3, c4, c5, c6, c7, e0, e1, e2, e3, e4, e5, e6, e7, d)


@triton.jit
def _load_row(w_ptr, s_ptr, n, k0, K, stride_wn, stride_sn, wo, t,
              FORMAT: tl.constexpr, GS: tl.constexpr, MASKED: tl.constexpr):
    """Row n, K-chunk k0: words [JT, 4] (4 consecutive per thread) and the fp32 group scale [JT].
    MASKED: 0 none, 1 per element (ragged K), 2 the whole chunk or nothing (K a multiple of the chunk:
    a scalar mask keeps the 16-byte loads, where ``w_idx < K // 8`` is provably constant over only
    2 words and cut each into two 8-byte loads)."""
    w_idx = k0 // 8 + wo
    s_idx = (k0 + 32 * t) // GS
    if MASKED == 2:
        W = tl.load(w_ptr + n * stride_wn + w_idx, mask=k0 < K, other=0)
        s = tl.load(s_ptr + n * stride_sn + s_idx, mask=k0 < K, other=0)
    elif MASKED == 1:
        W = tl.load(w_ptr + n * stride_wn + w_idx, mask=w_idx < K // 8, other=0)
        s = tl.load(s_ptr + n * stride_sn + s_idx, mask=(k0 + 32 * t) < K, other=0)
    else:
        W = tl.load(w_ptr + n * stride_wn + w_idx)
        s = tl.load(s_ptr + n * stride_sn + s_idx)
    if FORMAT != 0:
        S = s.to(tl.float32)
    else:
        S = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # 2^(e - 127), exact (e = 0: subnormal)
    return tl.reshape(W, (t.shape[0], 4)), S


@triton.jit
def _stack(a0, a1, a2, a3, BN: tl.constexpr):
    """BN (1, 2, 4) per-row [JT] tiles -> [JT], [JT, 2] or [JT, 2, 2] with [t, x, y] = row 2x + y;
    tl.join keeps them in the thread."""
    if BN == 1:
        return a0
    elif BN == 2:
        return tl.join(a0, a1)
    else:
        return tl.join(tl.join(a0, a2), tl.join(a1, a3))


@triton.jit
def _term(Wa, Wb, Wc, Wd, X, ONE, FORMAT: tl.constexpr, BN: tl.constexpr):
    """The BN rows' partial sums against one row of x, stacked like _stack."""
    a0, a1, a2, a3 = _split4(Wa)
    pa = _row_partial(a0, a1, a2, a3, X, ONE, FORMAT)
    if BN == 1:
        return pa
    elif BN == 2:
        b0, b1, b2, b3 = _split4(Wb)
        return tl.join(pa, _row_partial(b0, b1, b2, b3, X, ONE, FORMAT))
    else:
        b0, b1, b2, b3 = _split4(Wb)
        pb = _row_partial(b0, b1, b2, b3, X, ONE, FORMAT)
        c0, c1, c2, c3 = _split4(Wc)
        pc = _row_partial(c0, c1, c2, c3, X, ONE, FORMAT)
        d0, d1, d2, d3 = _split4(Wd)
        pd = _row_partial(d0, d1, d2, d3, X, ONE, FORMAT)
        return tl.join(tl.join(pa, pc), tl.join(pb, pd))


@triton.jit
def _store_rows(y_ptr, acc, bias_ptr, n0, N, HAS_BIAS: tl.constexpr, BN: tl.constexpr):
    """Reduce acc [JT, (2, 2)] over K and store rows n0 .. n0 + BN - 1 of one output row."""
    out = tl.sum(acc, axis=0)
    if BN == 1:
        if HAS_BIAS:
            out += tl.load(bias_ptr + n0).to(tl.float32)
        tl.store(y_ptr + n0, out.to(y_ptr.dtype.element_ty))
    else:
        if BN == 2:
            offs = n0 + tl.arange(0, 2)
        else:
            offs = n0 + 2 * tl.arange(0, 2)[:, None] + tl.arange(0, 2)[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs, mask=offs < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=offs < N)


@triton.jit
def _load_block(w_ptr, s_ptr, n0, k0, K, N, stride_wn, stride_sn, wo, t,
                FORMAT: tl.constexpr, GS: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr):
    """Chunk k0 of weight rows n0 .. n0 + BN - 1: four word tiles (rows beyond BN repeat row n0 and
    are dead code) and the stacked scales. Rows past N re-read a valid row; they are never stored."""
    Wa, Sa = _load_row(w_ptr, s_ptr, n0, k0, K, stride_wn, stride_sn, wo, t, FORMAT, GS, MASKED)
    Wb, Sb = Wa, Sa
    Wc, Sc = Wa, Sa
    Wd, Sd = Wa, Sa
    if BN > 1:
        Wb, Sb = _load_row(w_ptr, s_ptr, (n0 + 1) % N, k0, K, stride_wn, stride_sn, wo, t, FORMAT, GS, MASKED)
    if BN > 2:
        Wc, Sc = _load_row(w_ptr, s_ptr, (n0 + 2) % N, k0, K, stride_wn, stride_sn, wo, t, FORMAT, GS, MASKED)
        Wd, Sd = _load_row(w_ptr, s_ptr, (n0 + 3) % N, k0, K, stride_wn, stride_sn, wo, t, FORMAT, GS, MASKED)
    return Wa, Wb, Wc, Wd, _stack(Sa, Sb, Sc, Sd, BN)


@triton.jit
def _accumulate(x_ptr, stride_xm, k0, K, t, Wa, Wb, Wc, Wd, S, acc0, acc1, acc2, acc3, ONE,
                FORMAT: tl.constexpr, BN: tl.constexpr, ROWS: tl.constexpr, MASKED: tl.constexpr,
                XW: tl.constexpr):
    """acc_r += (BN rows' partial sums against row r of x over chunk k0) * scale, for r < ROWS."""
    X = _load_x(x_ptr, 0, stride_xm, k0, K, t, FORMAT, MASKED, XW)
    acc0 = tl.fma(_term(Wa, Wb, Wc, Wd, X, ONE, FORMAT, BN), S, acc0)
    if ROWS > 1:
        X = _load_x(x_ptr, 1, stride_xm, k0, K, t, FORMAT, MASKED, XW)
        acc1 = tl.fma(_term(Wa, Wb, Wc, Wd, X, ONE, FORMAT, BN), S, acc1)
    if ROWS > 2:
        X = _load_x(x_ptr, 2, stride_xm, k0, K, t, FORMAT, MASKED, XW)
        acc2 = tl.fma(_term(Wa, Wb, Wc, Wd, X, ONE, FORMAT, BN), S, acc2)
    if ROWS > 3:
        X = _load_x(x_ptr, 3, stride_xm, k0, K, t, FORMAT, MASKED, XW)
        acc3 = tl.fma(_term(Wa, Wb, Wc, Wd, X, ONE, FORMAT, BN), S, acc3)
    return acc0, acc1, acc2, acc3


@triton.jit
def _store_all(y_ptr, stride_ym, acc0, acc1, acc2, acc3, b_ptr, n0, N,
               HAS_BIAS: tl.constexpr, BN: tl.constexpr, ROWS: tl.constexpr):
    _store_rows(y_ptr, acc0, b_ptr, n0, N, HAS_BIAS, BN)
    if ROWS > 1:
        _store_rows(y_ptr + stride_ym, acc1, b_ptr, n0, N, HAS_BIAS, BN)
    if ROWS > 2:
        _store_rows(y_ptr + 2 * stride_ym, acc2, b_ptr, n0, N, HAS_BIAS, BN)
    if ROWS > 3:
        _store_rows(y_ptr + 3 * stride_ym, acc3, b_ptr, n0, N, HAS_BIAS, BN)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_wn, stride_sn, stride_ym, ONE,
    FORMAT: tl.constexpr,   # 0 MXFP4, 1 INT4 (scaled x), 2 INT4 (exact q); all read as int32 words [N, K/8]
    GS: tl.constexpr,       # K elements per weight scale (32 for MXFP4; a multiple of 32)
    ROWS: tl.constexpr,     # rows of x (1..4), all handled by every program
    JT: tl.constexpr,       # thread slots per chunk: a chunk is 32 * JT elements of K
    BN: tl.constexpr,       # weight rows per program: 1, 2 or 4
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,   # K % (32 * JT) == 0: no masks along K
    XW: tl.constexpr,       # bf16 x with an even row stride, read as int32 words (_load_x)
):
    """One program per block of BN weight rows, walking K."""
    KSTEP: tl.constexpr = 32 * JT
    n0 = tl.program_id(0) * BN
    t = tl.arange(0, JT)
    wo = tl.arange(0, 4 * JT)
    Wa, Wb, Wc, Wd, S = _load_block(w_ptr, s_ptr, n0, 0, K, N, stride_wn, stride_sn, wo, t, FORMAT, GS, BN,
                                    0 if EVEN_K else 1)
    acc0 = tl.zeros(S.shape, dtype=tl.float32)
    acc1 = tl.zeros(S.shape, dtype=tl.float32)
    acc2 = tl.zeros(S.shape, dtype=tl.float32)
    acc3 = tl.zeros(S.shape, dtype=tl.float32)
    for k0 in range(0, K, KSTEP):
        # prefetch the next chunk (masked: past the end it reads nothing)
        Wa_n, Wb_n, Wc_n, Wd_n, S_n = _load_block(w_ptr, s_ptr, n0, k0 + KSTEP, K, N, stride_wn, stride_sn,
                                                  wo, t, FORMAT, GS, BN, 2 if EVEN_K else 1)
        acc0, acc1, acc2, acc3 = _accumulate(x_ptr, stride_xm, k0, K, t, Wa, Wb, Wc, Wd, S,
                                             acc0, acc1, acc2, acc3, ONE, FORMAT, BN, ROWS, not EVEN_K, XW)
        Wa, Wb, Wc, Wd, S = Wa_n, Wb_n, Wc_n, Wd_n, S_n
    _store_all(y_ptr, stride_ym, acc0, acc1, acc2, acc3, b_ptr, n0, N, HAS_BIAS, BN, ROWS)


_CACHE = ConfigCache("gemv")

# (BN weight rows per program, JT thread slots per chunk, warps); JT >= 32 * warps so that each
# thread has >= 32 weights per row per chunk. The first entry is the default when nothing is timed.
_RAW = [(4, 64, 2), (4, 128, 4), (2, 128, 4), (4, 128, 2), (2, 64, 2), (4, 256, 4), (1, 128, 4),
        (4, 32, 1), (2, 256, 8)]


def candidates(k: int) -> list[Config]:
    """The configs worth timing for reduction length k (no chunk much longer than k)."""
    out = [Config.make(num_warps=nw, num_stages=1, BN=bn, JT=jt) for bn, jt, nw in _RAW
           if 32 * jt <= max(1024, 2 * k)]
    return out or [Config.make(num_warps=1, num_stages=1, BN=4, JT=32)]


def kernel_format(fmt: int, rows: int) -> int:
    """The kernel's FORMAT for a launch: INT4 with several rows of x decodes exact q floats shared by
    the rows (measured on the H100 at 2 and 4 rows: 5-16% faster than scaled x on every 8B shape,
    benchmarks/results/gemv_lab_h100.md); one row keeps the scaled-x windows (3.73 against 4.14
    instructions per weight in the sm_90 SASS)."""
    return _FORMAT_INT4_EXACT if fmt == FORMAT_INT4 and rows >= 2 else fmt


def supported(fmt: int, group: int, m: int) -> bool:
    """M <= MAX_ROWS, and (INT4) groups of whole 32-element thread slots."""
    gs = group if fmt == FORMAT_INT4 else 32
    return 1 <= m <= MAX_ROWS and gs % 32 == 0


def gemv(x2: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
         fmt: int, group: int, config: Optional[Config] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x2 [M <= 4, K] bf16/fp16 (unit stride along K), words int32 [N, K/8], scales [N, K/group]
    (bf16/fp16 for INT4, uint8 E8M0 for MXFP4) -> [M, N] in x2.dtype, written to ``out`` if given
    (rows with unit stride along N)."""
    M, K = x2.shape
    N = words.shape[0]
    if not supported(fmt, group, M):
        raise ValueError(f"triton_gemv: unsupported M={M} (1..{MAX_ROWS}) or group {group} (a multiple of 32)")
    gs = group if fmt == FORMAT_INT4 else 32
    y = out if out is not None else torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    b_arg = bias if bias is not None else x2

    # bf16 x as int32 words needs every row to start on a 4-byte boundary
    xw = x2.dtype == torch.bfloat16 and x2.stride(0) % 2 == 0 and x2.data_ptr() % 4 == 0

    def launch(cfg: Config, out=y):
        _gemv_kernel[(triton.cdiv(N, cfg["BN"]),)](
            x2, words, scales, b_arg, out, M, N, K, x2.stride(0), words.stride(0), scales.stride(0),
            out.stride(0), 0x3F800000, FORMAT=kernel_format(fmt, M), GS=gs, ROWS=M, HAS_BIAS=bias is not None,
            EVEN_K=K % (32 * cfg["JT"]) == 0, XW=xw, **cfg.kwargs())

    if config is None:
        key = (fmt, group, M, N, K, x2.dtype, bias is not None, x2.device.index)
        config = _CACHE.pick(key, candidates(K), launch)
    launch(config)
    return y
