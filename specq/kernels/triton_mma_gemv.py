"""Tensor-core GEMV on Triton for 4-bit weights and 1..16 rows of bf16 x: ``y = x @ dequant(W).T (+ bias)``.

The CUDA-core GEMV (``triton_gemv``) pays about one FMA per weight per row of x, so at 2..4 rows it is
bound by its instruction count, and the tiled ``tl.dot`` kernel (``triton_wq``) sends each decoded tile
through shared memory. This kernel decodes the weights in registers straight into the operand
registers of ``mma.sync.m16n8k16`` (inline PTX), so one warp instruction does 2048 multiply-adds and the
cost per weight is the decode alone, for any number of rows of x up to 16.

Why no data has to move between threads: the MMA sums over k, and its fragment layout pairs the
k-slots of A and B in the same thread (lane ``l``, group ``g = l // 4``, ``q = l % 4``: A rows g and
g + 8, B column g, both at k-slots {2q, 2q + 1, 2q + 8, 2q + 9}). Which element of K sits in which
k-slot is free as long as A and B agree, so each thread loads 4 consecutive int32 words (32 weights,
one 16-byte load) of weight rows g and g + 8 and the 32 matching x values of row g of x, and feeds
them to 8 MMAs. The four lanes q = 0..3 of a group cover 128 consecutive K; a warp owns 16 weight rows
(32 with TILES = 2) and walks K in steps of 128 * KW, its warps interleaved along K; the warps' partial
sums are added once at the end.

- Each word's nibbles i and i + 4 are 16 bits apart, so one shift and one LOP3 put both into the
  halves of one register. INT4: OR-ed into bf16 128.0 (0x4300) the halves are 128 + u, and one
  ``fma.rn.bf16x2`` leaves q = u - 8 exactly. The group scale (groups of 128 * n along K, one per warp
  step) multiplies the fp32 MMA result.
- MXFP4: the E2M1 magnitude at bf16 bits 6..8 and the sign at bit 15 is e2m1 * 2^-126 (code 1 a bf16
  subnormal); one ``mul.rn.bf16x2`` by 2^(e - 33) (E8M0 byte e) gives the dequantized weight times
  2^-32 exactly, and the sums are multiplied by 2^32 at the end (the bias keeps the bf16 scale finite
  for every realistic scale: e <= 160).
  The 4 lanes of a group hold 4 different 32-element scale groups, so the scale goes on before the MMA.
- x pairs: the MMA wants x[k] and x[k + 4] in one register (the weights' pairing); two PRMTs per
  4 values, shared by all weight rows of the thread.

- INT4 offset codes (``OFFSET``, autotuned): the codes 128 + u go to the MMA unchanged and 8 more MMAs
  with A = 136 everywhere subtract ``136 sum x`` per step (2.09 against 2.41 instructions per weight);
  it never won on the H100, exact q did.

Measured (H100, 2026-12-07, benchmarks/results/kernels_mma_h100.md): the time barely grows with M
(4096 x 14336 W4A16 14.6 / 14.9 / 15.9 / 20.6 us at 1 / 4 / 8 / 16 rows), 1.1-2.9x faster than the
kernels it replaced at 4..16 rows and faster than tinygemm there on every 8B shape; 63-82% of a
read-only kernel's time at one row, where more warps along K helped the small-N shapes most. At one
row the CUDA-core GEMV stays faster on 4096 x 4096 and 14336 x 4096, so ``triton_wq`` routes 2..16 rows
here.

The kernel relies on Triton giving element t of a [32 * num_warps] tile to lane t % 32 of warp t // 32
(a blocked layout, one element per thread); the GPU tests compare it with the reference op. Under
``TRITON_INTERPRET=1`` the PTX blocks are replaced by Triton ops that compute the same values, the MMA
by an explicit sum over the lanes of each warp, so CPU CI checks the data layout and decode.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from specq.kernels.triton_common import INTERPRET, Config, ConfigCache
from specq.kernels.triton_gemv import _split4

_INTERPRET = tl.constexpr(INTERPRET)

FORMAT_MXFP4 = 0
FORMAT_INT4 = 1
MAX_ROWS = 16


def _int4_ptx(exact: bool) -> str:
    """PTX: word $4 -> 4 bf16 pairs $0..$3. Nibbles i and i + 4 (16 bits apart) go into the mantissas of
    bf16 128.0 (lop3 0xEA: (a & b) | c), giving 128 + u; ``exact`` then subtracts 136 with one
    fma.rn.bf16x2 (by 1.0, exact: 128 + u - 136 = q)."""
    body = [".reg .b32 t, one, off;", "mov.b32 one, 0x3F803F80;", "mov.b32 off, 0xC308C308;"] if exact else [
        ".reg .b32 t;"]
    for i in range(4):
        src = "$4" if i == 0 else "t"
        if i:
            body.append(f"shr.u32 t, $4, {4 * i};")
        body.append(f"lop3.b32 ${i}, {src}, 0x000F000F, 0x43004300, 0xEA;")
        if exact:
            body.append(f"fma.rn.bf16x2 ${i}, ${i}, one, off;")
    return "{ " + " ".join(body) + " }"


def _mxfp4_ptx() -> str:
    """PTX: word $4 and E8M0 byte $5 -> 4 bf16 pairs $0..$3 of dequantized weights times 2^-32. The
    magnitude of nibble i goes to bf16 bits 6..8 (22..24 for nibble i + 4) and its sign to bit 15 (31):
    e2m1 * 2^-126 exactly (lop3 0xF8: a | (b & c)); one mul.rn.bf16x2 by 2^(e - 33) (exponent field
    e + 94 in both halves) scales it."""
    body = [".reg .b32 m, sg, sc;", "add.u32 sc, $5, 94;", "shl.b32 sc, sc, 7;", "prmt.b32 sc, sc, sc, 0x1010;"]
    for i in range(4):
        body.append(f"shl.b32 m, $4, {6 - 4 * i};" if i < 2 else f"shr.u32 m, $4, {4 * i - 6};")
        body.append("and.b32 m, m, 0x01C001C0;")
        sign = "$4" if i == 3 else "sg"
        if i < 3:
            body.append(f"shl.b32 sg, $4, {12 - 4 * i};")
        body += [f"lop3.b32 ${i}, m, {sign}, 0x80008000, 0xF8;", f"mul.rn.bf16x2 ${i}, ${i}, sc;"]
    return "{ " + " ".join(body) + " }"


_INT4_PTX = tl.constexpr(_int4_ptx(exact=True))
_INT4_OFFSET_PTX = tl.constexpr(_int4_ptx(exact=False))
_MXFP4_PTX = tl.constexpr(_mxfp4_ptx())


@triton.jit
def _bf16_lo(v):
    return (v << 16).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_hi(v):
    return (v & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_pair(lo, hi):
    """Two fp32 values that are exact in bf16 -> one int32 holding them as bf16 (lo in the low half)."""
    return ((lo.to(tl.int32, bitcast=True) >> 16) & 0xFFFF) | (hi.to(tl.int32, bitcast=True) & -65536)


@triton.jit
def _int4_pairs(w, OFFSET: tl.constexpr):
    """int32 word of 8 INT4 codes (u = q + 8, nibble i = element i) -> 4 registers of bf16 pairs
    (v_i, v_{i+4}) for i = 0..3: v = q, or with OFFSET v = 128 + u (the caller subtracts 136 sum x)."""
    if _INTERPRET:
        d = 128.0 if OFFSET else -8.0
        v0 = ((w >> 0) & 0xF).to(tl.float32) + d
        v1 = ((w >> 4) & 0xF).to(tl.float32) + d
        v2 = ((w >> 8) & 0xF).to(tl.float32) + d
        v3 = ((w >> 12) & 0xF).to(tl.float32) + d
        v4 = ((w >> 16) & 0xF).to(tl.float32) + d
        v5 = ((w >> 20) & 0xF).to(tl.float32) + d
        v6 = ((w >> 24) & 0xF).to(tl.float32) + d
        v7 = ((w >> 28) & 0xF).to(tl.float32) + d
        return _bf16_pair(v0, v4), _bf16_pair(v1, v5), _bf16_pair(v2, v6), _bf16_pair(v3, v7)
    else:
        return tl.inline_asm_elementwise(_INT4_OFFSET_PTX if OFFSET else _INT4_PTX, "=r,=r,=r,=r,r", [w],
                                         dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _e2m1_f32(w, i: tl.constexpr):
    """Nibble i of w (E2M1: magnitude bits 0..2, sign bit 3) as its fp32 value."""
    c = (w >> (4 * i)) & 0xF
    mag = c & 7
    e = mag >> 1
    m = (mag & 1).to(tl.float32)
    v = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * tl.exp2((e - 1).to(tl.float32)))
    return tl.where((c & 8) != 0, -v, v)


@triton.jit
def _mxfp4_pairs(w, e):
    """int32 word of 8 E2M1 codes and its E8M0 scale byte e (int32) -> 4 registers of bf16 pairs of
    dequantized weights times 2^-32 (w_i, w_{i+4}) for i = 0..3 (the kernel multiplies its sums by
    2^32). The bias keeps the bf16 scale 2^(e - 33) finite for every e <= 160 (|w| < 2^35), where
    2^(e - 1) would overflow above e = 128; weights under 2^-93 (e < 34) underflow, which changes
    no sum of bf16-sized products."""
    if _INTERPRET:
        s = tl.exp2((e - 159).to(tl.float32))  # 2^(e - 127) * 2^-32, as on the GPU
        return (_bf16_pair(_e2m1_f32(w, 0) * s, _e2m1_f32(w, 4) * s),
                _bf16_pair(_e2m1_f32(w, 1) * s, _e2m1_f32(w, 5) * s),
                _bf16_pair(_e2m1_f32(w, 2) * s, _e2m1_f32(w, 6) * s),
                _bf16_pair(_e2m1_f32(w, 3) * s, _e2m1_f32(w, 7) * s))
    else:
        return tl.inline_asm_elementwise(
            _MXFP4_PTX,
            "=r,=r,=r,=r,r,r", [w, e], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _x_pairs(x0, x1, x2, x3):
    """x as int32 words of bf16 pairs (x0 = (v0, v1), .., x3 = (v6, v7)) -> the weights' pairing:
    (v0, v4), (v1, v5), (v2, v6), (v3, v7)."""
    return ((x0 & 0xFFFF) | (x2 << 16), ((x0 >> 16) & 0xFFFF) | (x2 & -65536),
            (x1 & 0xFFFF) | (x3 << 16), ((x1 >> 16) & 0xFFFF) | (x3 & -65536))


@triton.jit
def _slots(r0, r1):
    """Two bf16-pair registers -> [JT, 4] fp32 (k-slots 0..3 of one thread: lo r0, hi r0, lo r1, hi r1)."""
    return tl.reshape(tl.join(tl.join(_bf16_lo(r0), _bf16_hi(r0)), tl.join(_bf16_lo(r1), _bf16_hi(r1))),
                      (r0.shape[0], 4))


@triton.jit
def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, KW: tl.constexpr):
    """mma.sync.m16n8k16 (bf16 in, fp32 accumulate) on [32 * KW] tiles, one element per thread:
    d = A B + c with A rows g / g + 8 from a0, a2 / a1, a3, B column g from b0, b1, and the thread's
    outputs d0, d1 = D[g, 2q], D[g, 2q + 1], d2, d3 = D[g + 8, 2q], D[g + 8, 2q + 1]."""
    if _INTERPRET:
        A0 = tl.reshape(_slots(a0, a2), (KW, 8, 16))   # [warp, g, 4q + slot]
        A8 = tl.reshape(_slots(a1, a3), (KW, 8, 16))
        B = tl.reshape(_slots(b0, b1), (KW, 8, 16))    # [warp, column, 4q + slot]
        D0 = tl.sum(A0[:, :, None, :] * B[:, None, :, :], axis=3)  # [warp, g, column]
        D8 = tl.sum(A8[:, :, None, :] * B[:, None, :, :], axis=3)
        e0, e1 = tl.split(tl.reshape(D0, (KW, 8, 4, 2)))
        e2, e3 = tl.split(tl.reshape(D8, (KW, 8, 4, 2)))
        n: tl.constexpr = 32 * KW
        return (c0 + tl.reshape(e0, (n,)), c1 + tl.reshape(e1, (n,)),
                c2 + tl.reshape(e2, (n,)), c3 + tl.reshape(e3, (n,)))
    else:
        return tl.inline_asm_elementwise(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, "
            "{$8, $9}, {$10, $11, $12, $13};",
            "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _mma_word(ra, rb, xp, c, KW: tl.constexpr):
    """One word position: rows g (pairs ra) and g + 8 (pairs rb) against x pairs xp, two MMAs."""
    c0, c1, c2, c3 = c
    a0, a1, a2, a3 = ra
    b0, b1, b2, b3 = rb
    x0, x1, x2, x3 = xp
    c0, c1, c2, c3 = _mma(a0, b0, a1, b1, x0, x1, c0, c1, c2, c3, KW)
    return _mma(a2, b2, a3, b3, x2, x3, c0, c1, c2, c3, KW)


@triton.jit
def _decode(w, e, FORMAT: tl.constexpr):
    if FORMAT == 0:
        return _mxfp4_pairs(w, e)
    else:
        return _int4_pairs(w, FORMAT == 2)


@triton.jit
def _offset_sums(X, KW: tl.constexpr):
    """INT4 with offset codes (FORMAT 2): 136 * sum of x over the thread group's K step, per column of
    the x tile, from the same MMAs with A = 136 everywhere (one per weight MMA of a 16-row tile, shared
    by all tiles): outputs (D[., 2q], D[., 2q + 1])."""
    X0, X1, X2, X3 = X
    c136 = tl.full(X0[0].shape, 0x43084308, tl.int32)  # bf16 pair (136, 136)
    z = tl.zeros(X0[0].shape, tl.float32)
    c = (z, z, z, z)
    r = (c136, c136, c136, c136)
    c = _mma_word(r, r, _x_pairs(X0[0], X0[1], X0[2], X0[3]), c, KW)
    c = _mma_word(r, r, _x_pairs(X1[0], X1[1], X1[2], X1[3]), c, KW)
    c = _mma_word(r, r, _x_pairs(X2[0], X2[1], X2[2], X2[3]), c, KW)
    c = _mma_word(r, r, _x_pairs(X3[0], X3[1], X3[2], X3[3]), c, KW)
    return c[0], c[1]


@triton.jit
def _load_words(w_ptr, row, stride_wn, kb, K, q4, MASKED: tl.constexpr):
    """4 consecutive words (32 weights from kb) of one weight row per thread, as four [JT] tiles."""
    offs = row[:, None] * stride_wn + (kb // 8)[:, None] + q4[None, :]
    if MASKED:
        v = tl.load(w_ptr + offs, mask=(kb < K)[:, None], other=0)
    else:
        v = tl.load(w_ptr + offs)
    return _split4(v)


@triton.jit
def _load_scale(s_ptr, row, stride_sn, kb, K, GS: tl.constexpr, FORMAT: tl.constexpr, MASKED: tl.constexpr):
    """The thread's group scale: E8M0 byte as int32 (MXFP4) or fp32 (INT4)."""
    if MASKED:
        s = tl.load(s_ptr + row * stride_sn + kb // GS, mask=kb < K, other=0)
    else:
        s = tl.load(s_ptr + row * stride_sn + kb // GS)
    if FORMAT == 0:
        return s.to(tl.int32)
    else:
        return s.to(tl.float32)


@triton.jit
def _load_x_words(xw_ptr, xrow, stride_xw, kb, ok, q4):
    """32 bf16 x values from kb of x row xrow per thread, as 16 int32 words (four [JT] tiles each)."""
    base = xrow * stride_xw + kb // 2
    o = base[:, None] + q4[None, :]
    m = ok[:, None]
    v0 = _split4(tl.load(xw_ptr + o, mask=m, other=0))
    v1 = _split4(tl.load(xw_ptr + o + 4, mask=m, other=0))
    v2 = _split4(tl.load(xw_ptr + o + 8, mask=m, other=0))
    v3 = _split4(tl.load(xw_ptr + o + 12, mask=m, other=0))
    return v0, v1, v2, v3


@triton.jit
def _tile_step(wa, wb, sa, sb, X, acc, corr, FORMAT: tl.constexpr, KW: tl.constexpr):
    """16 weight rows (g from words wa, g + 8 from wb) x one 8-column x tile over the thread's 32 K:
    8 MMAs; INT4 scales the step's fp32 sum (less the offset sums ``corr`` in FORMAT 2) by the rows'
    group scales, MXFP4 scaled its weights."""
    if FORMAT == 0:
        c = acc
    else:
        z = tl.zeros(sa.shape, tl.float32)
        c = (z, z, z, z)
    wa0, wa1, wa2, wa3 = wa
    wb0, wb1, wb2, wb3 = wb
    X0, X1, X2, X3 = X
    c = _mma_word(_decode(wa0, sa, FORMAT), _decode(wb0, sb, FORMAT), _x_pairs(X0[0], X0[1], X0[2], X0[3]), c, KW)
    c = _mma_word(_decode(wa1, sa, FORMAT), _decode(wb1, sb, FORMAT), _x_pairs(X1[0], X1[1], X1[2], X1[3]), c, KW)
    c = _mma_word(_decode(wa2, sa, FORMAT), _decode(wb2, sb, FORMAT), _x_pairs(X2[0], X2[1], X2[2], X2[3]), c, KW)
    c = _mma_word(_decode(wa3, sa, FORMAT), _decode(wb3, sb, FORMAT), _x_pairs(X3[0], X3[1], X3[2], X3[3]), c, KW)
    if FORMAT == 0:
        return c
    else:
        a0, a1, a2, a3 = acc
        c0, c1, c2, c3 = c
        if FORMAT == 2:
            e0, e1 = corr
            c0 -= e0
            c1 -= e1
            c2 -= e0
            c3 -= e1
        return (tl.fma(c0, sa, a0), tl.fma(c1, sa, a1), tl.fma(c2, sb, a2), tl.fma(c3, sb, a3))


@triton.jit
def _load_step(w_ptr, s_ptr, xw_ptr, r0, r1, r2, r3, xr0, xr1, kb, K, M, stride_wn, stride_sn, stride_xw, q4,
               FORMAT: tl.constexpr, GS: tl.constexpr, TILES: tl.constexpr, NB: tl.constexpr, MASKED: tl.constexpr):
    """Everything one K step reads: the words and scales of the 16 * TILES weight rows and 32 x values
    of each x tile, per thread (unused tiles repeat tile 0 and are dead code)."""
    ok = kb < K
    w0 = _load_words(w_ptr, r0, stride_wn, kb, K, q4, MASKED)
    w1 = _load_words(w_ptr, r1, stride_wn, kb, K, q4, MASKED)
    s0 = _load_scale(s_ptr, r0, stride_sn, kb, K, GS, FORMAT, MASKED)
    s1 = _load_scale(s_ptr, r1, stride_sn, kb, K, GS, FORMAT, MASKED)
    X0 = _load_x_words(xw_ptr, xr0, stride_xw, kb, ok & (xr0 < M), q4)
    w2, w3, s2, s3, X1 = w0, w1, s0, s1, X0
    if TILES > 1:
        w2 = _load_words(w_ptr, r2, stride_wn, kb, K, q4, MASKED)
        w3 = _load_words(w_ptr, r3, stride_wn, kb, K, q4, MASKED)
        s2 = _load_scale(s_ptr, r2, stride_sn, kb, K, GS, FORMAT, MASKED)
        s3 = _load_scale(s_ptr, r3, stride_sn, kb, K, GS, FORMAT, MASKED)
    if NB > 1:
        X1 = _load_x_words(xw_ptr, xr1, stride_xw, kb, ok & (xr1 < M), q4)
    return w0, w1, w2, w3, s0, s1, s2, s3, X0, X1


@triton.jit
def _times(acc, f: tl.constexpr):
    a0, a1, a2, a3 = acc
    return a0 * f, a1 * f, a2 * f, a3 * f


@triton.jit
def _store_tile(y_ptr, b_ptr, acc, n_base, m_base, M, N, stride_ym, HAS_BIAS: tl.constexpr, KW: tl.constexpr):
    """Add the KW warps' partial sums and store D[g, 2q..2q+1] / D[g + 8, ..] of one 16 x 8 tile:
    weight rows n_base + g (+ 8) are y's columns, x rows m_base + 2q (+ 1) are y's rows."""
    a0, a1, a2, a3 = acc
    if KW > 1:
        a0 = tl.sum(tl.reshape(a0, (KW, 32)), axis=0)
        a1 = tl.sum(tl.reshape(a1, (KW, 32)), axis=0)
        a2 = tl.sum(tl.reshape(a2, (KW, 32)), axis=0)
        a3 = tl.sum(tl.reshape(a3, (KW, 32)), axis=0)
    lane = tl.arange(0, 32)
    n = n_base + lane // 4
    m = m_base + 2 * (lane % 4)
    for h in tl.static_range(2):  # weight rows g, g + 8
        nn = n + 8 * h
        lo = a0 if h == 0 else a2
        hi = a1 if h == 0 else a3
        if HAS_BIAS:
            bias = tl.load(b_ptr + nn, mask=nn < N, other=0.0).to(tl.float32)
            lo += bias
            hi += bias
        tl.store(y_ptr + m * stride_ym + nn, lo.to(y_ptr.dtype.element_ty), mask=(m < M) & (nn < N))
        tl.store(y_ptr + (m + 1) * stride_ym + nn, hi.to(y_ptr.dtype.element_ty), mask=(m + 1 < M) & (nn < N))


@triton.jit
def _mma_gemv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
    FORMAT: tl.constexpr,   # 0 MXFP4, 1 INT4 (exact q), 2 INT4 (offset codes 128 + u, see _offset_sums);
                            # all read as int32 words [N, K/8]
    GS: tl.constexpr,       # K per weight scale: 32 (MXFP4), a multiple of 128 (INT4)
    TILES: tl.constexpr,    # 16-row weight tiles per program: 1 or 2
    NB: tl.constexpr,       # 8-row x tiles: 1 (M <= 8) or 2 (M <= 16)
    KW: tl.constexpr,       # warps, interleaved along K (num_warps must equal KW)
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,   # K % (128 * KW) == 0: no masks along K
    PREFETCH: tl.constexpr,  # load step k + 1 before step k's math
):
    """One program per 16 * TILES weight rows, walking K in steps of 128 * KW."""
    JT: tl.constexpr = 32 * KW
    t = tl.arange(0, JT)
    g = (t % 32) // 4
    q = t % 4
    q4 = tl.arange(0, 4)
    n0 = tl.program_id(0) * (16 * TILES)
    kofs = (t // 32) * 128 + q * 32
    xw_ptr = x_ptr.to(tl.pointer_type(tl.int32))
    stride_xw = stride_xm // 2
    # out-of-range weight rows re-read a valid row (never stored); x rows >= M load zeros
    r0 = (n0 + g) % N
    r1 = (n0 + g + 8) % N
    r2 = (n0 + g + 16) % N
    r3 = (n0 + g + 24) % N
    xr0 = g
    xr1 = g + 8
    z = tl.zeros((JT,), tl.float32)
    acc00 = (z, z, z, z)
    acc01 = (z, z, z, z)
    acc10 = (z, z, z, z)
    acc11 = (z, z, z, z)
    MASKED: tl.constexpr = not EVEN_K
    KSTEP: tl.constexpr = 128 * KW
    # register double buffering: step k0 + KSTEP is loaded before step k0's math (Triton does not
    # pipeline loads that feed no tl.dot); past the end the loads are masked off
    if PREFETCH:
        cur = _load_step(w_ptr, s_ptr, xw_ptr, r0, r1, r2, r3, xr0, xr1, kofs, K, M, stride_wn, stride_sn,
                         stride_xw, q4, FORMAT, GS, TILES, NB, MASKED)
    for k0 in range(0, K, KSTEP):
        if PREFETCH:
            nxt = _load_step(w_ptr, s_ptr, xw_ptr, r0, r1, r2, r3, xr0, xr1, k0 + KSTEP + kofs, K, M, stride_wn,
                             stride_sn, stride_xw, q4, FORMAT, GS, TILES, NB, True)
        else:
            cur = _load_step(w_ptr, s_ptr, xw_ptr, r0, r1, r2, r3, xr0, xr1, k0 + kofs, K, M, stride_wn,
                             stride_sn, stride_xw, q4, FORMAT, GS, TILES, NB, MASKED)
        w0, w1, w2, w3, s0, s1, s2, s3, X0, X1 = cur
        e0 = (z, z)
        e1 = (z, z)
        if FORMAT == 2:
            e0 = _offset_sums(X0, KW)
            if NB > 1:
                e1 = _offset_sums(X1, KW)
        acc00 = _tile_step(w0, w1, s0, s1, X0, acc00, e0, FORMAT, KW)
        if NB > 1:
            acc01 = _tile_step(w0, w1, s0, s1, X1, acc01, e1, FORMAT, KW)
        if TILES > 1:
            acc10 = _tile_step(w2, w3, s2, s3, X0, acc10, e0, FORMAT, KW)
            if NB > 1:
                acc11 = _tile_step(w2, w3, s2, s3, X1, acc11, e1, FORMAT, KW)
        if PREFETCH:
            cur = nxt
    if FORMAT == 0:  # undo the 2^-32 of the decoded MXFP4 weights (exact)
        acc00 = _times(acc00, 4294967296.0)
        acc01 = _times(acc01, 4294967296.0)
        acc10 = _times(acc10, 4294967296.0)
        acc11 = _times(acc11, 4294967296.0)
    _store_tile(y_ptr, b_ptr, acc00, n0, 0, M, N, stride_ym, HAS_BIAS, KW)
    if NB > 1:
        _store_tile(y_ptr, b_ptr, acc01, n0, 8, M, N, stride_ym, HAS_BIAS, KW)
    if TILES > 1:
        _store_tile(y_ptr, b_ptr, acc10, n0 + 16, 0, M, N, stride_ym, HAS_BIAS, KW)
        if NB > 1:
            _store_tile(y_ptr, b_ptr, acc11, n0 + 16, 8, M, N, stride_ym, HAS_BIAS, KW)


_CACHE = ConfigCache("mma_gemv")

# (TILES, KW warps, PREFETCH, OFFSET): the first entry is the default when nothing is timed
_RAW = [(1, 8, 1, 0), (2, 4, 1, 0), (1, 4, 1, 0), (1, 2, 1, 0), (2, 4, 0, 0), (1, 16, 1, 0), (2, 8, 1, 0),
        (1, 16, 0, 0), (1, 8, 1, 1)]


def candidates(k: int, fmt: int = FORMAT_INT4) -> list[Config]:
    """Configs whose K step (128 * KW) is no longer than K (OFFSET only for INT4)."""
    out = [Config.make(num_warps=kw, num_stages=1, TILES=tiles, KW=kw, PREFETCH=pf, OFFSET=off)
           for tiles, kw, pf, off in _RAW if 128 * kw <= max(128, k) and (fmt == FORMAT_INT4 or not off)]
    return out or [Config.make(num_warps=1, num_stages=1, TILES=1, KW=1, PREFETCH=1, OFFSET=0)]


def kernel_format(fmt: int, offset: int) -> int:
    """The kernel's FORMAT: INT4 with the OFFSET config decodes offset codes (FORMAT 2)."""
    return 2 if fmt == FORMAT_INT4 and offset else fmt


def supported(fmt: int, group: int, m: int, x: torch.Tensor) -> bool:
    """bf16 x whose rows start on 4-byte boundaries, 1..16 rows; INT4 groups of whole 128-element steps."""
    gs = group if fmt == FORMAT_INT4 else 32
    return (x.dtype == torch.bfloat16 and 1 <= m <= MAX_ROWS and x.shape[1] % 32 == 0
            and (fmt == FORMAT_MXFP4 or gs % 128 == 0)
            and (m == 1 or x.stride(0) % 2 == 0) and x.data_ptr() % 4 == 0)


def gemv(x2: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
         fmt: int, group: int, config: Optional[Config] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x2 [M <= 16, K] bf16 (unit stride along K), words int32 [N, K/8], scales [N, K/group] (bf16/fp16
    for INT4, uint8 E8M0 for MXFP4) -> [M, N] bf16, written to ``out`` if given."""
    M, K = x2.shape
    N = words.shape[0]
    if not supported(fmt, group, M, x2):
        raise ValueError(f"triton_mma_gemv: needs bf16 x with 1..{MAX_ROWS} rows on 4-byte boundaries, K % 32 == 0 "
                         f"and (INT4) a group that is a multiple of 128; got {x2.dtype}, M={M}, K={K}, group {group}")
    gs = group if fmt == FORMAT_INT4 else 32
    y = out if out is not None else torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    b_arg = bias if bias is not None else x2
    stride_xm = x2.stride(0) if M > 1 else 2 * K  # one row: any stride (never read across rows)

    def launch(cfg: Config, out=y):
        meta = cfg.kwargs()
        offset = meta.pop("OFFSET")  # a config choice that selects the kernel's FORMAT 2
        _mma_gemv_kernel[(triton.cdiv(N, 16 * cfg["TILES"]),)](
            x2, words, scales, b_arg, out, M, N, K, stride_xm, words.stride(0), scales.stride(0), out.stride(0),
            FORMAT=kernel_format(fmt, offset), GS=gs, NB=1 if M <= 8 else 2, HAS_BIAS=bias is not None,
            EVEN_K=K % (128 * cfg["KW"]) == 0, **meta)

    if config is None:
        # one tuning per x tile count: the time barely depends on M within a tile (H100 lab: the same
        # configs win at 1 and 4 rows), and a decoder's verifies come in several sizes
        key = (fmt, group, 1 if M <= 8 else 2, N, K, bias is not None, x2.device.index)
        config = _CACHE.pick(key, candidates(K, fmt), launch)
    launch(config)
    return y
