"""Activation pre-kernel on Triton: block-diagonal Hadamard rotation of x, optionally fused with
dynamic symmetric INT4 quantization (the A4 of W4A4).

``rotate`` (W4A16's rotation) runs one program per BLOCK_M rows times one K-chunk of CH columns (CH a
multiple of the Hadamard block and of the activation group). The rotation is one tensor-core dot with the block-diagonal
matrix of *unnormalized* +-1 Hadamard blocks (exact in bf16/fp16), then a multiply by
1/sqrt(had_block) in fp32; non-power-of-two orders (12 * 2^a, 20 * 2^a) are zero-padded to a power
of two. Like the reference (``hadamard.hadamard_transform`` returns x.dtype), the rotated value is
rounded to x.dtype before it is quantized.

Quantization matches ``specq.formats.activation.quantize_int4``: ``scale = amax / 7`` in fp32,
``q = clamp(round_half_even(x * r), -8, 7)`` with ``r = 1 / scale`` correctly rounded once per token (group)
and a scale below 2^-120 treated as 1 (``_reciprocal``); ``x * r`` is one IEEE multiply, never contracted into
an FMA (``_times``), rounded by rint, and clamped only where scale levels let the clamp bind (``_code``). The
whole-row kernel runs 13.6 SASS instructions per element where the per-element ``div_rn`` (MUFU.RCP, four FFMA,
FCHK and a slow-path branch), the add-based rounding and the clamp made 30.1 (groups of 32 with scale levels:
24.8, the token's amax taken from its group amaxes).

Quantization (``quantize``: codes for the W4A4 GEMM, in its K order; ``fake_quantize``: codes times scales
in x's dtype, for the weight-only kernels at decode sizes) runs one of four launch plans, all giving the
same bits (``_default_plan`` picks the fastest measured one per shape):

- "rows": the whole-row kernel, R rows per program, each cut into its chunks, the [R * chunks, chunk] tile
  rotated by one dot and the per-token or per-group amax reduced in registers; one launch that reads x
  once. For rows of at most 64 chunks (K <= 8192 at chunks of 128).
- a ``LoopPlan``: the looped kernel, R rows per program walking their row in segments of SEG chunks with
  pipelined loads; per token it walks twice (amax, then quantize; the second walk reads x from L1/L2), one
  launch for any K. One row per program in one segment is the fast form for few rows (the whole-row
  kernel took 5.2-12.2 us at M = 1..16, K = 4096, where it took 4.3).
- "chunks": one program per [BLOCK_M, chunk]; per group one launch; per token two launches of the same
  kernel (pass 1 writes each chunk's amax, pass 2 reduces it and quantizes). Its grid is the widest, which
  wins for few long rows.
- a ``PersistentPlan``: the whole-row kernel on a grid of a few programs per SM, each loading the rotation
  tile once and walking blocks of R rows with pipelined loads (the whole-row kernel loads the 32 KB tile for
  every 16 KB of x at K = 4096). Same row limit as "rows"; it takes such rows from 256 rows on.

On an H100 (2026-12-07, ``benchmarks/results/act_lab_h100.md``, ``act_persist_h100.md``; x in L2 as a layer's
input is, per-token codes, still with the division): K = 4096: 4.3 us at M = 1..16 (one row per program),
4.8 / 9.8 us at M = 256 / 1024 (persistent whole rows); K = 14336: 6.3-7.8 us at M <= 16 (chunks), 17.4 us at
M = 256 (chunks), 40.3 us at M = 1024 (four rows per program in segments of 16 chunks). Those kernels were
latency-bound (18-44% of copy bandwidth; Nsight Compute: 3.5-3.7 active warps per scheduler, ~0.5 eligible).
With the reciprocal (``act_recip_h100.md``, same-H100 A/B, before rint and the clamp's removal): K = 4096
3.86 / 7.62 us at M = 256 / 1024, K = 14336 7.17 / 23.95 us (one whole row per block; 27-61% of copy bandwidth).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from triton.language.extra import libdevice
from triton.language.extra.cuda import gdc_launch_dependents

from specq.formats import activation, hadamard
from specq.kernels.triton_common import INTERPRET, PDL_ENABLED, dot_flags, next_pow2
from specq.kernels.triton_wq import _dot

MODE_ROTATE, MODE_QUANT_GROUP, MODE_AMAX, MODE_QUANT_TOKEN = 0, 1, 2, 3
MAX_CHUNK = 256  # the [CHP, CHP] rotation tile must stay small enough for registers / L1


_ON_GPU = tl.constexpr(not INTERPRET)
MIN_SCALE = tl.constexpr(activation.MIN_SCALE)  # smaller scales count as 1 (activation._reciprocal)


@triton.jit
def _round_half_even(v):
    """round half to even of fp32 v (|v| << 2^22): one FRND (libdevice rint) on the GPU; in the interpreter
    1.5 * 2^23 added and taken away (the same value)."""
    return libdevice.rint(v) if _ON_GPU else (v + 12582912.0) - 12582912.0


@triton.jit
def _reciprocal(scale):
    """1 / scale correctly rounded, a scale below MIN_SCALE (zero, tiny) or NaN taken as 1: as
    ``activation._reciprocal``, so the codes of such a token (group) round to 0."""
    return tl.math.div_rn(1.0, tl.where(scale >= MIN_SCALE, scale, 1.0))


@triton.jit
def _times(a, b):
    """a * b rounded to nearest and never contracted into an FMA with an add that follows (mul.rn on the
    GPU); the interpreter rounds each numpy op alone."""
    return libdevice.mul_rn(a, b) if _ON_GPU else a * b


@triton.jit
def _code(v, CLAMP: tl.constexpr):
    """clamp(round_half_even(v), -8, 7) as fp32 (converted to int8 once, after any multiply by a level).
    Without scale levels the clamp never binds (|x| <= amax and r = fl(1 / fl(amax / 7)) give |fl(x r)| <=
    7 (1 + 3 ulp) < 7.5), so only snapped group scales (CLAMP), which may round below a group's amax / 7,
    pay its two instructions per element."""
    v = _round_half_even(v)
    return tl.minimum(tl.maximum(v, -8.0), 7.0) if CLAMP else v


@triton.jit
def _word_order(qv, BLOCK_M: tl.constexpr, CHP: tl.constexpr, ORDER: tl.constexpr = 8):
    """[BLOCK_M, CHP] codes -> the W4A4 GEMM's K order: ORDER 8, triton_w4a4.to_word_order (even elements of
    each block of 8, then the odd ones); ORDER 128, triton_w4a4.to_wgmma_order (the Gluon kernel's). Chunks
    start at multiples of ORDER, so blocks never straddle two programs."""
    if ORDER == 8:
        return tl.reshape(tl.permute(tl.reshape(qv, (BLOCK_M, CHP // 8, 4, 2)), (0, 1, 3, 2)), (BLOCK_M, CHP))
    x = tl.reshape(qv, (BLOCK_M * (CHP // 128), 4, 4, 4, 2))  # (row and block, t, s, b, h)
    return tl.reshape(tl.permute(x, (0, 2, 4, 1, 3)), (BLOCK_M, CHP))


@triton.jit
def _act_prep_kernel(
    x_ptr, h_ptr, y_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_ym, stride_qm, stride_sm, inv_norm,
    amax_ptr, stride_am, n_chunks,
    CH: tl.constexpr, CHP: tl.constexpr, NCP: tl.constexpr, AG: tl.constexpr,
    ROTATE: tl.constexpr, MODE: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    FAKE: tl.constexpr = False,  # quantize modes: write q * scale in x's dtype to y instead of q, s
    ORDER: tl.constexpr = 8,  # the codes' K order (_word_order)
    LV: tl.constexpr = 0,  # MODE 3 with groups of AG and scale levels (_quantize_store); 0: per token
):
    pid_m = tl.program_id(0)
    c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, CHP)
    offs_k = c * CH + offs_c
    m_mask = offs_m < M
    k_mask = (offs_c < CH) & (offs_k < K)
    mk_mask = m_mask[:, None] & k_mask[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mk_mask, other=0.0)
    x_dtype = x_ptr.dtype.element_ty
    if ROTATE:
        h = tl.load(h_ptr + offs_c[:, None] * CHP + offs_c[None, :])
        r = (_dot(x, h, DOT_FP32, IEEE) * inv_norm).to(x_dtype)
    else:
        r = x
    if MODE == 0:
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_k[None, :], r, mask=mk_mask)
    else:
        r = r.to(tl.float32)
        if MODE == 2:
            tl.store(amax_ptr + offs_m * stride_am + c, tl.max(tl.abs(r), axis=1), mask=m_mask)
        else:  # quantize this chunk as the one chunk of each of BLOCK_M rows
            r3 = tl.reshape(r, (BLOCK_M, 1, CHP))
            if MODE == 1:
                _quantize_store(r3, 0.0, offs_m, offs_k[None, :], c, mk_mask[:, None, :], y_ptr, q_ptr, s_ptr, M,
                                K, stride_ym, stride_qm, stride_sm, x_dtype, BLOCK_M, 1, CH, CHP, AG, FAKE, ORDER)
            else:
                offs_a = tl.arange(0, NCP)
                am = tl.load(amax_ptr + offs_m[:, None] * stride_am + offs_a[None, :],
                             mask=m_mask[:, None] & (offs_a < n_chunks)[None, :], other=0.0)
                scale = tl.math.div_rn(tl.max(am, axis=1), 7.0)  # [BLOCK_M]
                _quantize_store(r3, scale, offs_m, offs_k[None, :], c, mk_mask[:, None, :], y_ptr, q_ptr, s_ptr, M,
                                K, stride_ym, stride_qm, stride_sm, x_dtype, BLOCK_M, 1, CH, CHP,
                                AG if LV > 0 else 0, FAKE, ORDER, LV)
                if not FAKE:
                    tl.store(s_ptr + offs_m * stride_sm, _token_scale(scale, LV), mask=m_mask & (c == 0))


@triton.jit
def _rotate_rows(x, h, inv_norm, R: tl.constexpr, NP: tl.constexpr, CHP: tl.constexpr, ROTATE: tl.constexpr,
                 DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """[R, NP, CHP] chunks of x -> rotated, rounded to x's dtype like the reference, as fp32: one dot."""
    if ROTATE:
        r = (_dot(tl.reshape(x, (R * NP, CHP)), h, DOT_FP32, IEEE) * inv_norm).to(x.dtype)
        return tl.reshape(r, (R, NP, CHP)).to(tl.float32)
    return x.to(tl.float32)


@triton.jit
def _quantize_store(r, scale, rows, offs_k, chunk0, mask, y_ptr, q_ptr, s_ptr, M, K, stride_ym, stride_qm,
                    stride_sm, x_dtype, R: tl.constexpr, NP: tl.constexpr, CH: tl.constexpr, CHP: tl.constexpr,
                    AG: tl.constexpr, FAKE: tl.constexpr, ORDER: tl.constexpr, LV: tl.constexpr = 0):
    """Quantizes rotated chunks r [R, NP, CHP] (chunk indices chunk0 + 0..NP-1 of rows ``rows``; offs_k their
    columns) and stores the codes in the GEMM's K order with their group scales, or (FAKE) codes * scales in
    x's dtype. AG == 0: per token, by ``scale`` [R] (the caller stores it); else per group of AG. LV > 0 (with
    AG > 0): scale levels: each group scale snapped to v * t, v in 0..LV, t = scale / LV per token (``scale``:
    the token's amax / 7), and the stored values are the int8 code * v (the caller stores t)."""
    if AG == 0:
        inv = tl.broadcast_to(_reciprocal(scale)[:, None, None], (R, NP, CHP))
        qf = _code(_times(r, inv), False)
        qv = qf.to(tl.int8)
        fq = qf * scale[:, None, None]
    else:
        NG: tl.constexpr = CHP // AG
        r4 = tl.reshape(r, (R, NP, NG, AG))
        gscale = tl.math.div_rn(tl.max(tl.abs(r4), axis=3), 7.0)  # [R, NP, NG]
        if LV > 0:  # as activation._snap_group_scales
            t = _token_scale(scale, LV)[:, None, None]
            ratio = tl.math.div_rn(gscale, tl.where(t > 0, t, 1.0))
            v = tl.minimum(tl.maximum(_round_half_even(ratio), 0.0), LV * 1.0)
            v = tl.where(t > 0, v, 0.0)
            gscale = v * t
        inv = tl.broadcast_to(_reciprocal(gscale)[:, :, :, None], (R, NP, NG, AG))
        qf = _code(_times(r4, inv), LV > 0)
        fq = tl.reshape(qf * gscale[:, :, :, None], (R, NP, CHP))
        if LV > 0:
            qf = qf * v[:, :, :, None]  # code * v: [-128, 112], exact
        qv = tl.reshape(qf.to(tl.int8), (R, NP, CHP))
    if FAKE:
        tl.store(y_ptr + rows[:, None, None] * stride_ym + offs_k[None, :, :], fq.to(x_dtype), mask=mask)
    else:
        qw = tl.reshape(_word_order(tl.reshape(qv, (R * NP, CHP)), R * NP, CHP, ORDER), (R, NP, CHP))
        tl.store(q_ptr + rows[:, None, None] * stride_qm + offs_k[None, :, :], qw, mask=mask)
        if AG > 0 and LV == 0:
            offs_g = tl.arange(0, NG)
            chunk = chunk0 + tl.arange(0, NP)
            g_idx = chunk[:, None] * (CH // AG) + offs_g[None, :]  # [NP, NG]
            g_mask = (offs_g < CH // AG)[None, :] & (chunk[:, None] * CH + offs_g[None, :] * AG < K)
            tl.store(s_ptr + rows[:, None, None] * stride_sm + g_idx[None, :, :], gscale,
                     mask=(rows < M)[:, None, None] & g_mask[None, :, :])


@triton.jit
def _token_scale(scale, LV: tl.constexpr):
    """What a token's scale slot holds: amax / 7 (per token), or with scale levels the unit (amax / 7) / LV."""
    return tl.math.div_rn(scale, LV * 1.0) if LV > 0 else scale


@triton.jit
def _rotation(h_ptr, CHP: tl.constexpr, ROTATE: tl.constexpr):
    """The [CHP, CHP] rotation tile (h_ptr itself, unused, when there is no rotation). One return of a
    constexpr-selected value: Triton rejects a function whose returns differ in type."""
    offs_c = tl.arange(0, CHP)
    return tl.load(h_ptr + offs_c[:, None] * CHP + offs_c[None, :]) if ROTATE else h_ptr


@triton.jit
def _load_whole_rows(x_ptr, rows, M, K, stride_xm, CH: tl.constexpr, CHP: tl.constexpr, NP: tl.constexpr):
    """The R rows ``rows`` of x, each cut into its NP (padded) chunks of CH columns: (x [R, NP, CHP], their
    columns [NP, CHP], the mask of what is in x)."""
    offs_c = tl.arange(0, CHP)
    offs_k = tl.arange(0, NP)[:, None] * CH + offs_c[None, :]  # [NP, CHP]
    mask = (rows < M)[:, None, None] & ((offs_c < CH)[None, :] & (offs_k < K))[None, :, :]
    x = tl.load(x_ptr + rows[:, None, None] * stride_xm + offs_k[None, :, :], mask=mask, other=0.0)
    return x, offs_k, mask


@triton.jit
def _quantize_whole_rows(
    x, h, offs_k, mask, rows, y_ptr, q_ptr, s_ptr, M, K, stride_ym, stride_qm, stride_sm, inv_norm,
    CH: tl.constexpr, CHP: tl.constexpr, NP: tl.constexpr, R: tl.constexpr, AG: tl.constexpr,
    ROTATE: tl.constexpr, FAKE: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr, ORDER: tl.constexpr,
    LV: tl.constexpr = 0,
):
    """Rotation + INT4 quantization of whole rows (``_load_whole_rows``): the [R * NP, CHP] tile is rotated
    by one dot with h, so a per-token amax needs no second pass over x. AG: activation group (0 = per token);
    LV: scale levels of the groups (``_quantize_store``)."""
    r = _rotate_rows(x, h, inv_norm, R, NP, CHP, ROTATE, DOT_FP32, IEEE)
    if AG > 0:  # the token's amax as the max of its groups' (the same value): _quantize_store's group amaxes
        amax = tl.max(tl.max(tl.max(tl.abs(tl.reshape(r, (R, NP, CHP // AG, AG))), axis=3), axis=2), axis=1)
    else:
        amax = tl.max(tl.max(tl.abs(r), axis=2), axis=1)
    scale = tl.math.div_rn(amax, 7.0)  # [R], per token or for the levels
    _quantize_store(r, scale, rows, offs_k, 0, mask, y_ptr, q_ptr, s_ptr, M, K, stride_ym, stride_qm, stride_sm,
                    x.dtype, R, NP, CH, CHP, AG, FAKE, ORDER, LV)
    if (AG == 0 or LV > 0) and not FAKE:
        tl.store(s_ptr + rows * stride_sm, _token_scale(scale, LV), mask=rows < M)


@triton.jit
def _let_the_gemm_launch(PDL: tl.constexpr):
    """Programmatic dependent launch (PDL, Hopper): the W4A4 GEMM that reads these codes is launched with it
    and may start its prologue now, on SMs this grid leaves free; it waits for this grid's completion (and
    its memory) before it reads a code (``gluon_w4a4``). A hint only: without PDL it does nothing."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def _act_rows_kernel(
    x_ptr, h_ptr, y_ptr, q_ptr, s_ptr,
    M, K, stride_xm, stride_ym, stride_qm, stride_sm, inv_norm,
    CH: tl.constexpr, CHP: tl.constexpr, NP: tl.constexpr, R: tl.constexpr, AG: tl.constexpr,
    ROTATE: tl.constexpr, FAKE: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    ORDER: tl.constexpr = 8, LV: tl.constexpr = 0, PDL: tl.constexpr = False,
):
    """R whole rows per program, in one launch. x is loaded before the rotation tile, as in the kernel timed
    on the H100 (the other order compiles to different SASS)."""
    _let_the_gemm_launch(PDL)
    rows = tl.program_id(0) * R + tl.arange(0, R)
    x, offs_k, mask = _load_whole_rows(x_ptr, rows, M, K, stride_xm, CH, CHP, NP)
    _quantize_whole_rows(x, _rotation(h_ptr, CHP, ROTATE), offs_k, mask, rows, y_ptr, q_ptr, s_ptr, M, K,
                         stride_ym, stride_qm, stride_sm, inv_norm, CH, CHP, NP, R, AG, ROTATE, FAKE, DOT_FP32,
                         IEEE, ORDER, LV)


@triton.jit
def _act_persistent_kernel(
    x_ptr, h_ptr, y_ptr, q_ptr, s_ptr,
    M, K, stride_xm, stride_ym, stride_qm, stride_sm, inv_norm,
    CH: tl.constexpr, CHP: tl.constexpr, NP: tl.constexpr, R: tl.constexpr, AG: tl.constexpr,
    ROTATE: tl.constexpr, FAKE: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    ORDER: tl.constexpr, STAGES: tl.constexpr, LV: tl.constexpr = 0, PDL: tl.constexpr = False,
):
    """The whole-row kernel on a fixed grid: each program loads the rotation tile once (not once per block of
    R rows) and walks the blocks pid, pid + grid, ..., the next block's loads pipelined STAGES deep."""
    _let_the_gemm_launch(PDL)
    h = _rotation(h_ptr, CHP, ROTATE)
    for block in tl.range(tl.program_id(0), tl.cdiv(M, R), tl.num_programs(0), num_stages=STAGES):
        rows = block * R + tl.arange(0, R)
        x, offs_k, mask = _load_whole_rows(x_ptr, rows, M, K, stride_xm, CH, CHP, NP)
        _quantize_whole_rows(x, h, offs_k, mask, rows, y_ptr, q_ptr, s_ptr, M, K, stride_ym, stride_qm, stride_sm,
                             inv_norm, CH, CHP, NP, R, AG, ROTATE, FAKE, DOT_FP32, IEEE, ORDER, LV)


@triton.jit
def _act_loop_kernel(
    x_ptr, h_ptr, y_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_ym, stride_qm, stride_sm, inv_norm, n_seg,
    CH: tl.constexpr, CHP: tl.constexpr, SEG: tl.constexpr, R: tl.constexpr, AG: tl.constexpr,
    ROTATE: tl.constexpr, FAKE: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    ORDER: tl.constexpr, STAGES: tl.constexpr, LV: tl.constexpr = 0, PDL: tl.constexpr = False,
):
    """The same for rows of any length, in one launch: R rows per program walk their row in segments of
    SEG chunks (a [R * SEG, CHP] dot each), loads pipelined STAGES deep. Per token (and per group with scale
    levels, whose unit is the token's), a first walk finds the row's amax and a second (its x mostly still in
    L1/L2) quantizes; per group, one walk does both."""
    _let_the_gemm_launch(PDL)
    rows = tl.program_id(0) * R + tl.arange(0, R)
    offs_c = tl.arange(0, CHP)
    seg_k = tl.arange(0, SEG)[:, None] * CH + offs_c[None, :]  # [SEG, CHP]
    c_mask = (rows < M)[:, None, None] & (offs_c < CH)[None, None, :]
    x_rows = x_ptr + rows[:, None, None] * stride_xm
    h = _rotation(h_ptr, CHP, ROTATE)
    scale = tl.zeros((R,), dtype=tl.float32)
    if AG == 0 or LV > 0:
        amax = tl.zeros((R,), dtype=tl.float32)
        for i in tl.range(0, n_seg, num_stages=STAGES):
            offs_k = i * SEG * CH + seg_k
            mask = c_mask & (offs_k < K)[None, :, :]
            x = tl.load(x_rows + offs_k[None, :, :], mask=mask, other=0.0)
            r = _rotate_rows(x, h, inv_norm, R, SEG, CHP, ROTATE, DOT_FP32, IEEE)
            amax = tl.maximum(amax, tl.max(tl.max(tl.abs(r), axis=2), axis=1))
        scale = tl.math.div_rn(amax, 7.0)
        if not FAKE:
            tl.store(s_ptr + rows * stride_sm, _token_scale(scale, LV), mask=rows < M)
    for i in tl.range(0, n_seg, num_stages=STAGES):
        offs_k = i * SEG * CH + seg_k
        mask = c_mask & (offs_k < K)[None, :, :]
        x = tl.load(x_rows + offs_k[None, :, :], mask=mask, other=0.0)
        r = _rotate_rows(x, h, inv_norm, R, SEG, CHP, ROTATE, DOT_FP32, IEEE)
        _quantize_store(r, scale, rows, offs_k, i * SEG, mask, y_ptr, q_ptr, s_ptr, M, K, stride_ym, stride_qm,
                        stride_sm, x_ptr.dtype.element_ty, R, SEG, CH, CHP, AG, FAKE, ORDER, LV)


ROWS_MAX_TILE = 32768  # elements of one program's [R * NP, CHP] tile
ROWS_MAX_CHUNKS = 128  # chunks per row in one tile (K <= 16384 at chunks of 128)
ROWS_DEFAULT_MAX_CHUNKS = 64  # the default plans' whole rows (K <= 8192): longer rows were faster in two passes


_H_CACHE: dict = {}


def _rotation_tile(had_block: int, ch: int, chp: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[chp, chp] block-diagonal matrix of ch/had_block unnormalized (+-1) Hadamard blocks, zero-padded."""
    key = (had_block, ch, chp, dtype, device)
    t = _H_CACHE.get(key)
    if t is None:
        h = hadamard.hadamard_matrix(had_block) * math.sqrt(had_block)
        hr = h.round()
        if not torch.equal(hr.abs(), torch.ones_like(hr)) or (h - hr).abs().max() > 1e-9:
            raise AssertionError(f"Hadamard matrix of order {had_block} is not +-1 / sqrt(n)")
        full = torch.zeros(chp, chp, dtype=torch.float64)
        full[:ch, :ch] = torch.block_diag(*([hr] * (ch // had_block)))
        t = full.to(dtype=dtype, device=device).contiguous()
        _H_CACHE[key] = t
    return t


def _chunk(k: int, had_block: int, act_group: int) -> Optional[int]:
    """Columns per program: a multiple of the Hadamard block and of the activation group, grown by
    doubling towards 128 (fewer, fuller programs). None when no chunk fits in MAX_CHUNK."""
    base = 1
    if had_block > 0:
        base = had_block
    if act_group > 0:
        base = base * act_group // math.gcd(base, act_group)
    if act_group > 0 and next_pow2(base) % act_group != 0:
        return None  # per-group reshape needs groups to tile the padded chunk
    ch = base
    while ch * 2 <= 128 and ch * 2 <= max(k, base):
        ch *= 2
    return ch if next_pow2(ch) <= MAX_CHUNK else None


def supported(k: int, had_block: int, act_group: int, codes: bool = False, order: int = 8) -> bool:
    """Whether the pre-kernel handles this K, rotation and grouping; ``codes``: as INT4 codes for the W4A4
    GEMM (``quantize``), whose K order (blocks of ``order``: 8 or 128) needs chunks of whole blocks."""
    ch = _chunk(k, had_block, act_group)
    whole_blocks = k % order == 0 and ch is not None and ch % order == 0 and (order == 8 or next_pow2(ch) == ch)
    return ch is not None and (not codes or whole_blocks)


def _common_args(x2, had_block, act_group, y, q, s) -> tuple[int, int, tuple]:
    """(chunk, padded chunk, the arguments every pre-kernel takes first: x, its rotation tile, the outputs y,
    q, s (x stands in for those not written), M, K, the row strides and the rotation's 1/sqrt(block))."""
    M, K = x2.shape
    ch = _chunk(K, had_block, act_group)
    chp = next_pow2(ch)
    h = _rotation_tile(had_block, ch, chp, x2.dtype, x2.device) if had_block > 0 else x2
    outs = (y, q, s)
    args = (x2, h, *(t if t is not None else x2 for t in outs), M, K, x2.stride(0),
            *(t.stride(0) if t is not None else 0 for t in outs), 1.0 / math.sqrt(had_block) if had_block > 0 else 1.0)
    return ch, chp, args


def _launch(x2, mode, had_block, act_group, y=None, q=None, s=None, amax=None, n_chunks=1, fake=False, order=8,
            levels=0):
    M, K = x2.shape
    ch, chp, args = _common_args(x2, had_block, act_group, y, q, s)
    block_m = 16 if M <= 16 else (32 if chp > 128 else 64)
    grid = (triton.cdiv(M, block_m), triton.cdiv(K, ch))
    _act_prep_kernel[grid](
        *args, amax if amax is not None else x2, amax.stride(0) if amax is not None else 0, n_chunks,
        CH=ch, CHP=chp, NCP=next_pow2(n_chunks), AG=max(act_group, 1), ROTATE=had_block > 0, MODE=mode,
        BLOCK_M=block_m, FAKE=fake, ORDER=order, LV=levels, num_warps=8 if chp > 128 else 4, num_stages=1,
        **dot_flags(x2.dtype))
    return ch


def _rows_layout(K: int, had_block: int, act_group: int,
                 rows: Optional[int] = None) -> Optional[tuple[int, int, int]]:
    """(chunk, padded chunks per row, rows per program) for the whole-row kernels, or None where ``rows`` rows
    do not fit one program's tile or make fewer than the 16 tile rows tl.dot needs. Default rows: about 64
    tile rows per program (two rows at K = 4096 and chunks of 128), so a few hundred tokens already fill the
    GPU."""
    ch = _chunk(K, had_block, act_group)
    if ch is None:
        return None
    npad = next_pow2(triton.cdiv(K, ch))
    rows = rows or max(1, 64 // npad)
    fits = 16 <= rows * npad and rows * npad * next_pow2(ch) <= ROWS_MAX_TILE and npad <= ROWS_MAX_CHUNKS
    return (ch, npad, rows) if fits else None


def _launch_rows(x2, layout, had_block, act_group, y=None, q=None, s=None, fake=False, order=8, levels=0):
    ch, npad, rows = layout
    _, chp, args = _common_args(x2, had_block, act_group, y, q, s)
    _act_rows_kernel[(triton.cdiv(x2.shape[0], rows),)](
        *args, CH=ch, CHP=chp, NP=npad, R=rows, AG=act_group, ROTATE=had_block > 0, FAKE=fake, ORDER=order,
        LV=levels, num_warps=4 if rows * npad * chp <= 8192 else 8, num_stages=1, PDL=_feeds_pdl_gemm(x2, order, fake),
        **dot_flags(x2.dtype))


def _launch_loop(x2, plan, had_block, act_group, y=None, q=None, s=None, fake=False, order=8, levels=0):
    """The looped kernel at plan = LoopPlan(rows, seg, warps, stages)."""
    M, K = x2.shape
    ch, chp, args = _common_args(x2, had_block, act_group, y, q, s)
    _act_loop_kernel[(triton.cdiv(M, plan.rows),)](
        *args, triton.cdiv(triton.cdiv(K, ch), plan.seg),
        CH=ch, CHP=chp, SEG=plan.seg, R=plan.rows, AG=act_group, ROTATE=had_block > 0, FAKE=fake, ORDER=order,
        STAGES=plan.stages, LV=levels, num_warps=plan.warps, num_stages=1, PDL=_feeds_pdl_gemm(x2, order, fake),
        **dot_flags(x2.dtype))


def _feeds_pdl_gemm(x2: torch.Tensor, order: int, fake: bool) -> bool:
    """Whether the codes go to the Gluon GEMM (K order 128) launched with PDL: then this grid lets it launch
    early (Hopper only: the instruction needs sm_90)."""
    return (PDL_ENABLED and order == 128 and not fake and x2.device.type == "cuda"
            and torch.cuda.get_device_capability(x2.device)[0] >= 9)


def _processors(device: torch.device) -> int:
    """The GPU's SM count; one on the CPU (the interpreter), so that a few programs walk several row blocks."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _launch_persistent(x2, layout, plan, had_block, act_group, y=None, q=None, s=None, fake=False, order=8,
                       levels=0):
    """The persistent whole-row kernel at plan = PersistentPlan(...) and layout = _rows_layout(..., plan.rows)."""
    ch, npad, rows = layout
    _, chp, args = _common_args(x2, had_block, act_group, y, q, s)
    programs = min(triton.cdiv(x2.shape[0], rows), plan.programs_per_sm * _processors(x2.device))
    _act_persistent_kernel[(programs,)](
        *args, CH=ch, CHP=chp, NP=npad, R=rows, AG=act_group, ROTATE=had_block > 0, FAKE=fake, ORDER=order,
        STAGES=plan.stages, LV=levels, num_warps=plan.warps, num_stages=1, PDL=_feeds_pdl_gemm(x2, order, fake),
        **dot_flags(x2.dtype))


def rotate(x2: torch.Tensor, had_block: int) -> torch.Tensor:
    """x2 [M, K] -> x2 @ H_blockdiag(had_block), in x2.dtype (one launch)."""
    y = torch.empty_like(x2)
    if x2.shape[0] > 0:
        _launch(x2, MODE_ROTATE, had_block, 0, y=y)
    return y


class LoopPlan(NamedTuple):
    """A launch of the looped kernel: rows per program, chunks per segment, warps, pipeline stages."""
    rows: int
    seg: int
    warps: int = 4
    stages: int = 2


class PersistentPlan(NamedTuple):
    """A launch of the persistent whole-row kernel: rows per block, warps, pipeline stages, programs per SM
    (the grid: at most programs_per_sm times the SM count, each program walking several blocks of rows)."""
    rows: int
    warps: int
    stages: int
    programs_per_sm: int


# Measured on the H100 (2026-12-07, benchmarks/results/act_lab_h100.md, per-token codes, chunks of 128):
# K = 4096 (32 chunks): one row per program in one segment took 4.3 us at M = 1..16 where the whole-row
# kernel took 5.2-12.2 (its two-row tile wastes half at M = 1) and tied it at M = 256 (5.9 / 5.8 us); at
# M = 1024 the whole-row kernel won (9.6 us against 16.3). K = 14336 (112 chunks, no whole-row tile): the
# per-chunk kernel's 16 x 112-program grid won at M <= 16 (6.3-7.8 us against >= 12.8), four rows per
# program in segments of 16 chunks at M = 1024 (40.3 us against 51.2); at M = 256 the plans were within 6%.
# The persistent whole-row kernel (benchmarks/results/act_persist_h100.md, 2026-12-07 19:38), two rows per
# block, 8 warps, two programs per SM: 4.83 us at K = 4096, M = 256 (whole-row kernel 5.79, one-row loop
# 5.88) and 9.76 at M = 1024 (whole-row 9.77), so it takes whole rows from 256 rows on.
# With the reciprocal multiply (benchmarks/results/act_recip_h100.md, 2026-12-07 23:31, same H100 A/B against
# the division): K = 4096 3.86 / 7.62 us at M = 256 / 1024 (were 4.89 / 9.95); K = 14336 per token, one whole
# row ([128, 128] tile, 112 chunks padded) per block, 8 warps, 3 stages, two programs per SM: 7.17 / 23.95 us
# (chunks 14.04, loop 32.01; with the division the best were 16.09 / 40.39).
LOOP_MAX_M = 256  # below this many rows, rows that fit one segment take LoopPlan(1, whole row)
CHUNKS_MAX_M = 512  # long rows: the per-chunk kernel below this, the looped kernel from it
LONG_ROWS_PLAN = LoopPlan(rows=4, seg=16, warps=8, stages=2)
WHOLE_ROWS_PLAN = PersistentPlan(rows=2, warps=8, stages=2, programs_per_sm=2)
LONG_WHOLE_ROWS_PLAN = PersistentPlan(rows=1, warps=8, stages=3, programs_per_sm=2)  # per token, >= 256 rows
# groups, 256..511 rows of 65..128 chunks (K = 14336, groups of 32 with levels 16, M = 256: 13.19 us where the
# per-chunk kernel took 17.50; at M = 1024 the looped kernel stays faster, 44.0 against 53.7-56.5;
# act_recip_h100.md, H100 2026-12-07, reciprocal codes)
LONG_GROUPED_ROWS_PLAN = PersistentPlan(rows=1, warps=16, stages=2, programs_per_sm=1)


def _default_plan(M: int, K: int, had_block: int, act_group: int):
    """The fastest measured plan for M rows of K: "rows" (whole rows in one tile), "chunks" (one program per
    chunk; per token two passes over x), a LoopPlan or the persistent whole-row kernel (where its two-row
    blocks fit a tile; rows of 65..128 chunks take it one row per block from 256 rows on, per token, and
    below 512 rows with activation groups)."""
    n_chunks = triton.cdiv(K, _chunk(K, had_block, act_group))
    if next_pow2(n_chunks) <= ROWS_DEFAULT_MAX_CHUNKS and _rows_layout(K, had_block, act_group) is not None:
        if M < LOOP_MAX_M and 16 <= next_pow2(n_chunks):
            return LoopPlan(rows=1, seg=next_pow2(n_chunks), warps=4, stages=2)
        if _rows_layout(K, had_block, act_group, WHOLE_ROWS_PLAN.rows) is not None:
            return WHOLE_ROWS_PLAN
        return "rows"
    if M >= LOOP_MAX_M and _rows_layout(K, had_block, act_group, 1) is not None:
        if act_group == 0:
            return LONG_WHOLE_ROWS_PLAN
        if M < CHUNKS_MAX_M:
            return LONG_GROUPED_ROWS_PLAN
    return "chunks" if M < CHUNKS_MAX_M else LONG_ROWS_PLAN


def _run(x2, act_group, had_block, plan, y=None, q=None, s=None, fake=False, order=8, levels=0):
    """Runs the pre-kernel(s) of ``plan`` ("rows", "chunks", a LoopPlan or a PersistentPlan) into y (fake) or
    q, s; ``levels``: scale levels of the activation groups (act_group > 0)."""
    M, K = x2.shape
    plan = plan or _default_plan(M, K, had_block, act_group)
    kw = dict(y=y, q=q, s=s, fake=fake, order=order, levels=levels)
    if isinstance(plan, LoopPlan):
        if plan.rows * plan.seg < 16:
            raise ValueError(f"{plan}: rows * seg must be >= 16 (the rotation's dot needs 16 tile rows)")
        _launch_loop(x2, plan, had_block, act_group, **kw)
    elif isinstance(plan, PersistentPlan):
        layout = _rows_layout(K, had_block, act_group, plan.rows)
        if layout is None:
            raise ValueError(f"{plan}: {plan.rows} rows of K = {K} do not fit one program's tile (at most "
                             f"{ROWS_MAX_CHUNKS} chunks a row and {ROWS_MAX_TILE} elements) or make fewer than the "
                             f"16 tile rows the rotation's dot needs")
        _launch_persistent(x2, layout, plan, had_block, act_group, **kw)
    elif plan == "rows":
        layout = _rows_layout(K, had_block, act_group)
        if layout is None:
            raise ValueError(f"rows of K = {K} do not fit one program's tile; use the 'chunks' or a loop plan")
        _launch_rows(x2, layout, had_block, act_group, **kw)
    elif act_group > 0 and not levels:
        _launch(x2, MODE_QUANT_GROUP, had_block, act_group, **kw)
    else:  # per token, or groups with levels (their unit is the token's): amax per chunk, then quantize
        n_chunks = triton.cdiv(K, _chunk(K, had_block, act_group))
        amax = torch.empty((M, n_chunks), device=x2.device, dtype=torch.float32)
        _launch(x2, MODE_AMAX, had_block, act_group, amax=amax, n_chunks=n_chunks)
        _launch(x2, MODE_QUANT_TOKEN, had_block, act_group, amax=amax, n_chunks=n_chunks, **kw)


def _check_levels(act_group: int, levels: int) -> None:
    if levels and not act_group:
        raise ValueError("scale levels apply to activation groups; per-token scales (act_group 0) take none")
    if not 0 <= levels <= 16:
        raise ValueError(f"levels must be 0..16, got {levels}")


def quantize(x2: torch.Tensor, act_group: int, had_block: int, order: int = 8,
             plan=None, levels: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [M, K] -> (q int8 [M, K], scales float32 [M, K/act_group] or [M, 1]) of the rotated x2, q in the
    W4A4 GEMM's K order (``triton_w4a4.to_k_order(codes, order)``: 8 for the Triton GEMM, 128 for the Gluon
    one; the scales keep K's order). ``plan``: which kernel (``_run``; default ``_default_plan``). With
    ``levels`` (act_group > 0): ``activation.quantize_int4_levels``, q the int8 code * v and one unit per
    token [M, 1], which the per-token GEMMs take as they are."""
    M, K = x2.shape
    _check_levels(act_group, levels)
    if not supported(K, had_block, act_group, codes=True, order=order):
        raise ValueError(f"W4A4 activation codes come in blocks of {order} along K: K = {K} with Hadamard block "
                         f"{had_block} and activation group {act_group} does not tile them; use the reference op")
    q = torch.empty((M, K), device=x2.device, dtype=torch.int8)
    s = torch.empty((M, K // act_group if act_group > 0 and not levels else 1), device=x2.device, dtype=torch.float32)
    if M > 0:
        _run(x2, act_group, had_block, plan, q=q, s=s, order=order, levels=levels)
    return q, s


def fake_quantize(x2: torch.Tensor, act_group: int, had_block: int, plan=None, levels: int = 0) -> torch.Tensor:
    """x2 [M, K] -> dequantize(quantize_int4(rotate(x2))) in x2.dtype, like
    ``activation.fake_quantize_int4(hadamard_transform(x2), act_group, levels)`` (the W4A4 reference's
    activation). Used where the matmul after it is a weight-only kernel (W4A4 at decode sizes)."""
    _check_levels(act_group, levels)
    y = torch.empty_like(x2)
    if x2.shape[0] > 0:
        _run(x2, act_group, had_block, plan, y=y, fake=True, levels=levels)
    return y
