"""W4A4 matmul on Triton: INT4 activations times INT4 weights on Hopper's FP8 (default) or INT8 tensor cores.

Hopper has no INT4 tensor cores, so both operands are held as 8-bit numbers, exactly:

- activations come quantized from the pre-kernel (``triton_act.quantize_fp8`` / ``quantize``: rotation +
  dynamic per-token or per-group INT4, [M, K] codes plus fp32 scales), with K in *word order*;
- weights are the packed INT4 copy shared with W4A16 (int32 [N, K/8], codes ``c = q + 8`` LSB-first). Each
  word's even nibbles are one mask away from four bytes, its odd ones a shift and a mask: three instructions
  per eight weights. The bytes come out as (k0, k2, k4, k6) and (k1, k3, k5, k7), so the activation codes come
  in that order (``to_word_order``, written so by the pre-kernel): the dot sums over K, and any order both
  operands share gives the same result.

FP8 (``SPECQ_W4A4_TENSOR_CORES=fp8``, the default): a byte ``0000cccc`` *is* the e4m3 number ``c * 2^-9``
(codes 0..7 are e4m3's subnormals, 8..15 its first binade), and the activation codes -8..7 are e4m3 integers,
so each 128-deep chunk's dot is exact in the fp32 accumulator (|sum| <= 128 * 15 * 8 < 2^14, integer-valued
after the 2^9, which the test at the code extremes checks on the GPU). The dot's fp32 result is scaled
into the running sum by one FFMA per output. The offset ``c = q + 8`` is taken back once at the end:
``- 8 * sum_j t[m, j] s_w[n, j]`` over K blocks j, t the activation codes' sums per block (written by the
pre-kernel; times s_x for per-group activations), as one small 3xTF32 dot per 32 blocks.

INT8 (``SPECQ_W4A4_TENSOR_CORES=int8``): a code in the high half of a byte with its top bit flipped is the
int8 ``16 q`` (one LOP3 per half-word), so no offset; but the int32 dot result needs an int -> float
conversion before the scale: a magic-number add (folded into the MMA's initial value), a float subtract and
the FFMA, three instructions per output per chunk.

The K loop runs in chunks of SUB_K (<= 128) that lie inside one weight group and one activation group.

Where the time goes at large M (sm_90 SASS of the K loop, ``python benchmarks/sass_report.py --w4a4
[--fp8]``), per thread and 128-deep chunk, 128 x 128 SWAP tile, 8 warps: INT8 303 instructions (of them
192 for the rescale and ~24 for the decode; 446 before the word-order decode), FP8 175 (64 FFMA). The
decoded weight tile goes through shared memory (STS + LDSM) to reach the wgmma's register operand layout,
and each chunk's wgmma is waited for before its rescale, so within one program the tensor cores and the
CUDA cores take turns: tiles small enough for two programs per SM (128 x 64 at <= 128 registers, or 4
warps) let one program's rescale run under the other's MMA. The autotuner picks among both kinds.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from specq.kernels.triton_common import INTERPRET, Config, ConfigCache, m_bucket, next_pow2
from specq.kernels.triton_wq import _interleave8, _tile_ids

_INTERPRET = tl.constexpr(INTERPRET)


@triton.jit
def _bytes4(v):
    return v.to(tl.int8), (v >> 8).to(tl.int8), (v >> 16).to(tl.int8), (v >> 24).to(tl.int8)


@triton.jit
def _decode_words(pw):
    """int32 words [R, J] of eight INT4 codes (q + 8) -> int8 [R, J, 2, 2, 2] holding 16 * q, in word order
    (see ``to_word_order``). A code in the high half of a byte, its top bit flipped, is the int8 16 * q, so the
    odd nibbles take one LOP3 ((w & 0xF0F0F0F0) ^ 0x80808080) and the even ones a shift more: three
    instructions per eight weights. Byte i of a decoded word is element i of its group of four, so LLVM packs
    the operand registers from the words as they are (no PRMT). The kernel divides its result by 16 at the end."""
    if _INTERPRET:
        lo = ((pw << 4) & -252645136) ^ -2139062144  # & 0xF0F0F0F0, ^ 0x80808080
        hi = (pw & -252645136) ^ -2139062144
    else:  # one LOP3 each: written as separate AND and XOR, they stay two instructions in the SASS
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; shl.b32 t, $2, 4; lop3.b32 $0, t, 0xF0F0F0F0, 0x80808080, 0x6A; "
            "lop3.b32 $1, $2, 0xF0F0F0F0, 0x80808080, 0x6A; }",  # 0x6A: (a & b) ^ c
            "=r,=r,r", [pw], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    l0, l1, l2, l3 = _bytes4(lo)
    h0, h1, h2, h3 = _bytes4(hi)
    return _interleave8(l0, l1, l2, l3, h0, h1, h2, h3)


@triton.jit
def _decode_words_fp8(pw):
    """int32 words [R, J] of eight INT4 codes c = q + 8 -> float8 e4m3 [R, J, 2, 2, 2] holding c * 2^-9, in word
    order. A byte 0000cccc is that e4m3 number exactly: codes 0..7 are its subnormals m * 2^-9 and codes 8..15
    its first binade (8 + m) * 2^-9, so decoding is masking, three instructions per eight weights. The kernel
    adds the offset back (-8 * the activation codes' sums) and the 2^9 at the end."""
    if _INTERPRET:
        lo = pw & 0x0F0F0F0F
        hi = (pw >> 4) & 0x0F0F0F0F
    else:  # opaque to LLVM, which otherwise splits the high nibbles' top byte off and repacks it (PRMT)
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; and.b32 $0, $2, 0x0F0F0F0F; shr.u32 t, $2, 4; and.b32 $1, t, 0x0F0F0F0F; }",
            "=r,=r,r", [pw], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    l0, l1, l2, l3 = _bytes4(lo)
    h0, h1, h2, h3 = _bytes4(hi)
    return _interleave8(l0, l1, l2, l3, h0, h1, h2, h3).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _small_i32_to_f32(d):
    """int32 |d| < 2^22 -> fp32, exactly, with an integer add and a float subtract: the int32 + fp32
    magic constant 1.5 * 2^23 puts d in the mantissa. (A plain conversion is an I2F instruction per
    element, a slow pipe on Hopper; every K chunk converts a whole [BLOCK_M, BLOCK_N] tile.)"""
    return (d + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _offset_correction(acc, cs_ptr, sx_ptr, sw_ptr, rm, rn, K, stride_csm, stride_sxm, stride_swn,
                       WG: tl.constexpr, AG: tl.constexpr, SG: tl.constexpr, SWAP: tl.constexpr):
    """acc - 8 * sum_j t[m, j] s_w[n, j]: the offset of the FP8 path's weight codes, over the K blocks j of SG
    columns, t = the activation codes' sum over block j (times s_x[m, j] for per-group activations). One
    small dot per 32 blocks, in 3xTF32 (fp32-accurate; exact for per-token scales, whose t are integers)."""
    JB: tl.constexpr = 32
    NJ = tl.cdiv(K, SG)
    for j0 in range(0, NJ, JB):
        offs_j = j0 + tl.arange(0, JB)
        jm = offs_j < NJ
        t = tl.load(cs_ptr + rm[:, None] * stride_csm + offs_j[None, :], mask=jm[None, :], other=0.0)
        if AG > 0:
            t *= tl.load(sx_ptr + rm[:, None] * stride_sxm + (offs_j * SG // AG)[None, :], mask=jm[None, :],
                         other=0.0)
        sw = tl.load(sw_ptr + rn[:, None] * stride_swn + (offs_j * SG // WG)[None, :], mask=jm[None, :],
                     other=0.0).to(tl.float32)
        if SWAP:
            acc = tl.dot(sw, tl.trans(t * -8.0), acc, input_precision="tf32x3")
        else:
            acc = tl.dot(t * -8.0, tl.trans(sw), acc, input_precision="tf32x3")
    return acc


@triton.jit
def _w4a4_matmul_kernel(
    q_ptr, sx_ptr, w_ptr, sw_ptr, b_ptr, y_ptr, cs_ptr,
    M, N, K,
    stride_qm, stride_sxm, stride_wn, stride_swn, stride_ym, stride_csm,
    WG: tl.constexpr,      # weight group size along K
    AG: tl.constexpr,      # activation group size along K; 0 = one scale per token
    SUB_K: tl.constexpr,   # K per int32 dot: divides WG and AG
    N_SUB: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % (SUB_K * N_SUB) == 0: no masks along K
    SWAP: tl.constexpr,    # compute y.T tiles: the decoded weights are the dot's A operand (see below)
    FP8: tl.constexpr = False,  # e4m3 codes on the FP8 tensor cores (else int8 on the INT8 ones)
    SG: tl.constexpr = 128,     # FP8: K per activation code sum in cs_ptr (divides SUB_K)
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rm = offs_m % M  # out-of-range rows/columns load valid data that is never stored: no predicates
    rn = offs_n % N
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    KSTEP: tl.constexpr = SUB_K * N_SUB
    for k0 in range(0, K, KSTEP):
        for j in tl.static_range(N_SUB):
            kk = k0 + j * SUB_K
            offs_k = kk + tl.arange(0, SUB_K)
            offs_w = kk // 8 + tl.arange(0, SUB_K // 8)
            if EVEN_K:
                a = tl.load(q_ptr + rm[:, None] * stride_qm + offs_k[None, :])
                pw = tl.load(w_ptr + rn[:, None] * stride_wn + offs_w[None, :])
            else:
                a = tl.load(q_ptr + rm[:, None] * stride_qm + offs_k[None, :], mask=(offs_k < K)[None, :],
                            other=0.0 if FP8 else 0)
                pw = tl.load(w_ptr + rn[:, None] * stride_wn + offs_w[None, :],
                             mask=(offs_w < K // 8)[None, :], other=0)
            if FP8:
                wv = tl.reshape(_decode_words_fp8(pw), (BLOCK_N, SUB_K))  # e4m3 c * 2^-9, word order
            else:
                wv = tl.reshape(_decode_words(pw), (BLOCK_N, SUB_K))  # int8 16 q, word order
            sw = tl.load(sw_ptr + rn * stride_swn + kk // WG, mask=(kk < K) & (rn >= 0), other=0.0).to(tl.float32)
            if SWAP:
                if FP8:
                    d = tl.dot(wv, tl.trans(a))  # fp32 [BLOCK_N, BLOCK_M]
                else:
                    d = _small_i32_to_f32(tl.dot(wv, tl.trans(a), out_dtype=tl.int32))
                if AG > 0:
                    sx = tl.load(sx_ptr + rm * stride_sxm + kk // AG, mask=(kk < K) & (rm >= 0), other=0.0)
                    acc += d * (sw[:, None] * sx[None, :])
                else:
                    acc += d * sw[:, None]
            else:
                if FP8:
                    d = tl.dot(a, tl.trans(wv))
                else:
                    d = _small_i32_to_f32(tl.dot(a, tl.trans(wv), out_dtype=tl.int32))
                if AG > 0:
                    sx = tl.load(sx_ptr + rm * stride_sxm + kk // AG, mask=(kk < K) & (rm >= 0), other=0.0)
                    acc += d * (sx[:, None] * sw[None, :])
                else:
                    acc += d * sw[None, :]
    # the decoded weights were 16 q (int8) or c 2^-9 (FP8): back to units of q, exactly
    acc *= 512.0 if FP8 else 0.0625
    if FP8:  # the codes were c = q + 8: take 8 * sum(a) * s_w (* s_x) back off
        acc = _offset_correction(acc, cs_ptr, sx_ptr, sw_ptr, rm, rn, K, stride_csm, stride_sxm, stride_swn,
                                 WG, AG, SG, SWAP)
    if SWAP:
        if AG == 0:
            acc *= tl.load(sx_ptr + offs_m * stride_sxm, mask=m_mask, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=m_mask[None, :] & n_mask[:, None])
    else:
        if AG == 0:
            acc *= tl.load(sx_ptr + offs_m * stride_sxm, mask=m_mask, other=0.0)[:, None]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


_CACHE = ConfigCache("w4a4_matmul")


def to_word_order(q: torch.Tensor) -> torch.Tensor:
    """Activation codes [..., K] (K % 8 == 0) in the packed weights' decode order: in each block of 8,
    the even elements, then the odd ones (k0 k2 k4 k6 k1 k3 k5 k7)."""
    return q.reshape(*q.shape[:-1], -1, 4, 2).transpose(-1, -2).reshape(q.shape)


def from_word_order(q: torch.Tensor) -> torch.Tensor:
    """The inverse of ``to_word_order``."""
    return q.reshape(*q.shape[:-1], -1, 2, 4).transpose(-1, -2).reshape(q.shape)


def use_fp8() -> bool:
    """Which tensor cores the W4A4 GEMM runs on: FP8 (default; one FFMA per output and K chunk) or INT8
    (``SPECQ_W4A4_TENSOR_CORES=int8``: the int32 sums cost three instructions per output and chunk)."""
    v = os.environ.get("SPECQ_W4A4_TENSOR_CORES", "fp8")
    if v not in ("fp8", "int8"):
        raise ValueError(f"SPECQ_W4A4_TENSOR_CORES must be 'fp8' or 'int8', got {v!r}")
    return v == "fp8"


def kernel_codes(q: torch.Tensor, group: int, act_group: int, fp8: bool):
    """Reference INT4 codes q (int8 [M, K], K's order) -> (codes, sums, sum_group) as ``w4a4_matmul`` takes
    them: word order, and for FP8 e4m3 with their sums over blocks of ``dot_k`` columns (sums None, 0 else)."""
    qw = to_word_order(q).contiguous()
    if not fp8:
        return qw, None, 0
    sg = dot_k(group, act_group)
    pad = (-q.shape[1]) % sg
    sums = F.pad(q.float(), (0, pad)).reshape(q.shape[0], -1, sg).sum(-1).contiguous()
    return qw.float().to(torch.float8_e4m3fn), sums, sg


def _sub_k(wg: int, ag: int, want: int) -> Optional[int]:
    g = wg if ag == 0 else math.gcd(wg, ag)
    s = want
    while s >= 32:  # the int8 MMA takes K in steps of 32
        if g % s == 0:
            return s
        s //= 2
    return None


def supported(wg: int, ag: int) -> bool:
    return _sub_k(wg, ag, 128) is not None


def dot_k(wg: int, ag: int) -> int:
    """K per int32/fp32 dot (every config uses the same): the FP8 path's code sums must tile it."""
    return _sub_k(wg, ag, 128)


def _candidates(m: int, wg: int, ag: int) -> list[Config]:
    if m <= 64:
        bm = max(16, next_pow2(m))
        # (BLOCK_N, SUB_K wanted, K per iteration, warps, stages, SWAP, BLOCK_M or None for bm)
        raw = [(32, 128, 256, 4, 4, 0, None), (16, 128, 512, 4, 3, 0, None), (64, 128, 256, 4, 3, 0, None),
               (64, 128, 128, 4, 4, 0, None)]
        gm = 1
    else:
        bm = 64 if m <= 128 else 128
        # SWAP: the decoded weight tile is the dot's first operand, which Hopper's wgmma may take from
        # registers (its second operand must come from shared memory), so the weight tile is
        # decoded in registers and the activation tile is the pipelined shared-memory operand
        raw = [(128, 128, 128, 8, 4, 0, None), (256, 128, 128, 8, 3, 0, None), (128, 128, 128, 4, 4, 0, None),
               (64, 128, 128, 4, 4, 0, None), (128, 128, 128, 4, 4, 1, 128), (128, 128, 128, 8, 3, 1, 256),
               (256, 128, 128, 8, 3, 1, 128), (64, 128, 128, 4, 4, 1, 128), (128, 128, 128, 8, 3, 1, 128),
               # two programs per SM, so that one's rescale overlaps the other's MMA (the 128 x 128 tile
               # takes 200-222 registers: one program of 8 warps per SM): 128 x 64 with 8 warps at <= 128
               # registers (INT8 116, FP8 132 unless capped), or with 4 warps (FP8 254)
               (128, 128, 128, 8, 3, 1, 64), (128, 128, 128, 8, 4, 1, 64), (128, 128, 128, 8, 3, 1, 64, 128),
               (128, 128, 128, 4, 3, 1, 64), (64, 128, 128, 4, 3, 1, 128)]
        gm = 8
    out, seen = [], set()
    for bn, sk, kstep, nw, st, swap, bm_cfg, *maxnreg in raw:
        sub = _sub_k(wg, ag, sk)
        extra = {"maxnreg": maxnreg[0]} if maxnreg else {}
        cfg = Config.make(num_warps=nw, num_stages=st, BLOCK_M=bm_cfg or bm, BLOCK_N=bn, SUB_K=sub,
                          N_SUB=max(1, kstep // sub), GROUP_M=gm, SWAP=swap, **extra)
        if cfg not in seen:
            seen.add(cfg)
            out.append(cfg)
    return out


def w4a4_matmul(q: torch.Tensor, sx: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                bias: Optional[torch.Tensor], group: int, act_group: int, out_dtype: torch.dtype,
                sums: Optional[torch.Tensor] = None, sum_group: int = 0) -> torch.Tensor:
    """q [M, K] activation codes in word order (``to_word_order``), sx fp32 [M, K/act_group or 1] -> [M, N]
    in out_dtype. q int8 runs on the INT8 tensor cores; q float8_e4m3fn on the FP8 ones, which also takes
    ``sums`` fp32 [M, cdiv(K, sum_group)], the codes' sums over blocks of ``sum_group`` columns (dividing
    ``dot_k``), as ``triton_act.quantize(..., fp8_sum_group=...)`` writes them."""
    M, K = q.shape
    N = packed.shape[0]
    fp8 = q.dtype == torch.float8_e4m3fn
    if fp8:
        if sums is None or sum_group <= 0 or dot_k(group, act_group) % sum_group != 0:
            raise ValueError(f"FP8 W4A4 codes need their sums over blocks of sum_group columns dividing "
                             f"{dot_k(group, act_group)}; got sum_group = {sum_group} (quantize with fp8_sum_group)")
        if sums.shape != (M, triton.cdiv(K, sum_group)):
            raise ValueError(f"code sums have shape {tuple(sums.shape)}, expected {(M, triton.cdiv(K, sum_group))}")
    elif q.dtype != torch.int8:
        raise ValueError(f"W4A4 activation codes must be int8 or float8_e4m3fn, got {q.dtype}")
    y = torch.empty((M, N), device=q.device, dtype=out_dtype)
    if M == 0:
        return y
    packed = packed.contiguous()
    scales = scales.contiguous()
    fixed = dict(WG=group, AG=act_group, HAS_BIAS=bias is not None, FP8=fp8, SG=sum_group if fp8 else 128)
    cs = sums if fp8 else sx

    def launch(cfg: Config, out=y):
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _w4a4_matmul_kernel[grid](q, sx, packed, scales, bias if bias is not None else sx, out, cs, M, N, K,
                                  q.stride(0), sx.stride(0), packed.stride(0), scales.stride(0), out.stride(0),
                                  cs.stride(0), EVEN_K=K % (cfg["SUB_K"] * cfg["N_SUB"]) == 0, **fixed,
                                  **cfg.kwargs())

    key = (group, act_group, m_bucket(M), N, K, out_dtype, bias is not None, fp8, q.device.index)
    cfg = _CACHE.pick(key, _candidates(M, group, act_group), launch)
    launch(cfg)
    return y
