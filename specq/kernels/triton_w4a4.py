"""W4A4 matmul on Triton: INT4 activations times INT4 weights on the INT8 tensor cores.

Hopper has no INT4 tensor cores, so both operands are held as int8 values:

- activations come quantized from the pre-kernel (``triton_act.quantize``: rotation + dynamic
  per-token or per-group INT4, int8 [M, K] plus fp32 scales), with K in *word order*;
- weights are the packed INT4 copy shared with W4A16 (int32 [N, K/8], ``q + 8`` LSB-first). A code in
  the high half of a byte with its top bit flipped is the int8 ``16 q``, so a word's odd nibbles are one
  LOP3 away from four such bytes and its even ones a shift and a LOP3: three instructions per eight
  weights (``_decode_words``), and the result is divided by 16 at the end. The decoded bytes come out as
  (k0, k2, k4, k6) and (k1, k3, k5, k7), so the activation codes come in that order (``to_word_order``,
  written so by the pre-kernel): the dot sums over K, and any order both operands share gives the same
  result.

Up to 64 rows the M x N tiles alone are too few to fill the GPU (4096 x 4096 at 32 rows: 64-256
programs), so each small-M tile shape also comes split along K (fp32 partials, then triton_wq's
deterministic reduce, which adds the bias); the autotuner keeps the split only where it times faster
(added 2026-12-07, not yet timed on a GPU: the GEMM alone took 15 us there, bf16 14).

The K loop runs in chunks of SUB_K (<= 128) that lie inside one weight group and one activation
group, so each chunk's dot is exact in int32 (|dot| <= 128 * 16 * 64 < 2^22, which the fast int -> float
conversion below needs); it is then scaled into the fp32 accumulator by
``s_w[n, g]`` (and ``s_x[m, g']`` for per-group activations; per-token scales multiply once at the end).

Where the time goes at large M (sm_90 SASS of the K loop, ``python benchmarks/sass_report.py --w4a4``),
per thread and 128-deep chunk, 128 x 128 SWAP tile, 8 warps (4 IGMMA):

- the weight decode took ~165 instructions (a shift and a sign-extend per weight, PRMT to pack bytes);
  it now takes ~24, and the loop went from 446 to 303 instructions;
- the rescale takes 192: the int32 accumulator's magic initial value (the int -> float trick's add,
  folded into the MMA's init), the float subtract and the FFMA into the fp32 accumulator, per output
  element and weight group. Per-group weight scales keep W4A4 near the INT8 tensor-core rate at best;
- the decoded weight tile goes through shared memory (STS + LDSM, 8 instructions) to reach the
  wgmma's register operand layout.

The 128 x 128 tile takes 202 registers (the int32 and fp32 accumulators), so one program of 8 warps
holds an SM and nothing overlaps its rescale with its MMA (each chunk's wgmma is waited for before the
rescale reads it). The autotuner picked 64 x 128 tiles of 4 warps (204 registers, two programs per SM)
on the H100; tiles with three or four programs per SM are among the candidates since (not yet timed).

With W4A4 scale levels (``LEVELS``, per-token activations or grouped ones snapped to a per-token unit: see
``int4.snap_scales`` and ``activation.quantize_int4_levels``) the weights decode as q * level
(``_decode_words_scaled``) and one int32 dot sums all of K: no rescale, 168 instead of 315 loop instructions
and 134 instead of 205 registers on the 128 x 64 tile (``sass_report.py --w4a4 --levels``). It serves up to
128 rows on Hopper (the Gluon kernel above): on the H100 (2026-12-07, ``benchmarks/results/kernels_levels_m32_64_h100.md``)
groups of 32 with levels ran at 0.75-1.71x bf16 at M = 32 / 64 where their rescaling path ran at 0.39-0.67x.

Measured on the H100 (``benchmarks/results/kernels_w4a4_fp8_vs_int8_h100.md``, 2026-12-07): at M = 1024 the GEMM
alone is 1.01-1.08x bf16 F.linear on the 8B shapes, up from 0.83-0.92x; the loop is not bound by its
instruction count but by each chunk's serial chain (LDS, decode, STS, barrier, LDSM, wgmma, wait,
rescale), of which only other programs on the SM run in parallel. An FP8 variant (c = q + 8 as the e4m3
subnormal c * 2^-9, the offset taken back from the activation codes' sums: 189 instead of 315 loop
instructions, one FFMA per output) was 14-20% *slower* than this INT8 kernel and was not kept (commit
c974fa4 has it).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from specq.kernels.triton_common import INTERPRET, Config, ConfigCache, m_bucket, next_pow2
from specq.kernels.triton_wq import _interleave8, _split_for, _store_tile, _tile_ids, launch_split_k

_INTERPRET = tl.constexpr(INTERPRET)


# one packed word $2 -> $0: its even codes as int8 16 q (a shift and a LOP3), $1: its odd ones (a LOP3);
# 0x6A is the LOP3 table of (a & b) ^ c
DECODE_ASM = tl.constexpr("{ .reg .b32 t; shl.b32 t, $2, 4; lop3.b32 $0, t, 0xF0F0F0F0, 0x80808080, 0x6A; "
                          "lop3.b32 $1, $2, 0xF0F0F0F0, 0x80808080, 0x6A; }")


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
        lo, hi = tl.inline_asm_elementwise(DECODE_ASM, "=r,=r,r", [pw], dtype=(tl.int32, tl.int32), is_pure=True,
                                           pack=1)
    l0, l1, l2, l3 = _bytes4(lo)
    h0, h1, h2, h3 = _bytes4(hi)
    return _interleave8(l0, l1, l2, l3, h0, h1, h2, h3)


@triton.jit
def _decode_words_scaled(pw, lv):
    """int32 words [R, J] of eight codes n = q + 8, int32 scale levels lv [R] (0..16) -> int8 [R, J, 2, 2, 2]
    holding q * lv, in word order (as ``_decode_words``). The codes of a word's even (odd) elements sit in the
    low (high) nibbles of its bytes; masked into bytes, one multiply-add per four makes each byte
    n * lv + 128 - 8 lv = q * lv + 128, which stays in 0..240 (lv <= 16), so no byte carries into the next,
    and flipping each byte's top bit makes it the int8 q * lv. Four instructions per eight weights more
    than ``_decode_words``; in exchange the int32 dot of the whole K needs no rescale."""
    c = ((128 - 8 * lv) * 0x01010101)[:, None]
    lv = lv[:, None]
    lo = ((pw & 0x0F0F0F0F) * lv + c) ^ -2139062144  # ^ 0x80808080
    hi = (((pw >> 4) & 0x0F0F0F0F) * lv + c) ^ -2139062144
    l0, l1, l2, l3 = _bytes4(lo)
    h0, h1, h2, h3 = _bytes4(hi)
    return _interleave8(l0, l1, l2, l3, h0, h1, h2, h3)


@triton.jit
def _small_i32_to_f32(d):
    """int32 |d| < 2^22 -> fp32, exactly, with an integer add and a float subtract: the int32 + fp32
    magic constant 1.5 * 2^23 puts d in the mantissa. (A plain conversion is an I2F instruction per
    element, a slow pipe on Hopper; every K chunk converts a whole [BLOCK_M, BLOCK_N] tile.)"""
    return (d + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _w4a4_matmul_kernel(
    q_ptr, sx_ptr, w_ptr, sw_ptr, b_ptr, y_ptr,
    M, N, K, K_PER,
    stride_qm, stride_sxm, stride_wn, stride_swn, stride_ym,
    LEVELS: tl.constexpr,  # 1: sw_ptr holds uint8 scale levels [N, K/WG] and unit_ptr fp32 units [N]: the dot
    unit_ptr,              # sums all of K in int32 (weights decoded as q * level), scaled once at the end
    WG: tl.constexpr,      # weight group size along K
    AG: tl.constexpr,      # activation group size along K; 0 = one scale per token
    SUB_K: tl.constexpr,   # K per int32 dot: divides WG and AG
    N_SUB: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % (SUB_K * N_SUB) == 0: no masks along K
    SWAP: tl.constexpr,    # compute y.T tiles: the decoded weights are the dot's A operand (see below)
    SPLIT_K: tl.constexpr = 1,  # > 1: program (.., s) sums K-range [s K_PER, (s + 1) K_PER) into fp32 y[s]
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
        acc_i = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    KSTEP: tl.constexpr = SUB_K * N_SUB
    k_lo = 0
    k_hi = K
    if SPLIT_K > 1:
        k_lo = tl.program_id(1) * K_PER
        k_hi = tl.minimum(K, k_lo + K_PER)
    for k0 in range(k_lo, k_hi, KSTEP):
        for j in tl.static_range(N_SUB):
            kk = k0 + j * SUB_K
            offs_k = kk + tl.arange(0, SUB_K)
            offs_w = kk // 8 + tl.arange(0, SUB_K // 8)
            if EVEN_K:
                a = tl.load(q_ptr + rm[:, None] * stride_qm + offs_k[None, :])
                pw = tl.load(w_ptr + rn[:, None] * stride_wn + offs_w[None, :])
            else:
                a = tl.load(q_ptr + rm[:, None] * stride_qm + offs_k[None, :], mask=(offs_k < K)[None, :], other=0)
                pw = tl.load(w_ptr + rn[:, None] * stride_wn + offs_w[None, :],
                             mask=(offs_w < K // 8)[None, :], other=0)
            if LEVELS:
                lv = tl.load(sw_ptr + rn * stride_swn + kk // WG, mask=(kk < K) & (rn >= 0), other=0).to(tl.int32)
                wv = tl.reshape(_decode_words_scaled(pw, lv), (BLOCK_N, SUB_K))  # int8 q * level, word order
                if SWAP:
                    acc_i = tl.dot(wv, tl.trans(a), acc_i, out_dtype=tl.int32)
                else:
                    acc_i = tl.dot(a, tl.trans(wv), acc_i, out_dtype=tl.int32)
            else:
                wv = tl.reshape(_decode_words(pw), (BLOCK_N, SUB_K))  # int8, word order
                sw = tl.load(sw_ptr + rn * stride_swn + kk // WG, mask=(kk < K) & (rn >= 0), other=0.0).to(tl.float32)
                if SWAP:
                    d = _small_i32_to_f32(tl.dot(wv, tl.trans(a), out_dtype=tl.int32))  # [BLOCK_N, BLOCK_M]
                    if AG > 0:
                        sx = tl.load(sx_ptr + rm * stride_sxm + kk // AG, mask=(kk < K) & (rm >= 0), other=0.0)
                        acc += d * (sw[:, None] * sx[None, :])
                    else:
                        acc += d * sw[:, None]
                else:
                    d = _small_i32_to_f32(tl.dot(a, tl.trans(wv), out_dtype=tl.int32))
                    if AG > 0:
                        sx = tl.load(sx_ptr + rm * stride_sxm + kk // AG, mask=(kk < K) & (rm >= 0), other=0.0)
                        acc += d * (sx[:, None] * sw[None, :])
                    else:
                        acc += d * sw[None, :]
    if LEVELS:  # per-token activations only: y = sx[m] * unit[n] * sum over K of codes * q * level
        unit = tl.load(unit_ptr + rn).to(tl.float32)
        sx_tok = tl.load(sx_ptr + offs_m * stride_sxm, mask=m_mask, other=0.0)
        if SWAP:
            acc = acc_i.to(tl.float32) * unit[:, None] * sx_tok[None, :]
        else:
            acc = acc_i.to(tl.float32) * sx_tok[:, None] * unit[None, :]
    # the decoded weights were 16 * q: the 1/16 (exact) joins the per-token scale
    elif AG == 0:
        sx_tok = tl.load(sx_ptr + offs_m * stride_sxm, mask=m_mask, other=0.0) * 0.0625
        acc *= sx_tok[None, :] if SWAP else sx_tok[:, None]
    else:
        acc *= 0.0625
    _store_tile(acc, y_ptr, b_ptr, offs_m, offs_n, m_mask, n_mask, M, N, stride_ym, HAS_BIAS, SPLIT_K, SWAP)


_CACHE = ConfigCache("w4a4_matmul")


def to_word_order(q: torch.Tensor) -> torch.Tensor:
    """Activation codes [..., K] (K % 8 == 0) in the packed weights' decode order: in each block of 8,
    the even elements, then the odd ones (k0 k2 k4 k6 k1 k3 k5 k7)."""
    return q.reshape(*q.shape[:-1], -1, 4, 2).transpose(-1, -2).reshape(q.shape)


def from_word_order(q: torch.Tensor) -> torch.Tensor:
    """The inverse of ``to_word_order``."""
    return q.reshape(*q.shape[:-1], -1, 2, 4).transpose(-1, -2).reshape(q.shape)


# K orders of the activation codes: ``to_word_order`` (blocks of 8, this kernel) and ``to_wgmma_order``
# (blocks of 128, the Gluon kernel's: gluon_w4a4)
ORDER_WORDS, ORDER_WGMMA = 8, 128


def to_wgmma_order(q: torch.Tensor) -> torch.Tensor:
    """Activation codes [..., K] (K % 128 == 0) in the Gluon kernel's K order: in each block of 128 = 16 packed
    words, word 4t + s holds codes 8(4t + s) + 2b + h (b < 4, h: even / odd), and they go to position
    32s + 16h + 4t + b, where the int8 wgmma's A-operand registers of lane t hold them (gluon_w4a4)."""
    n = q.dim() - 1
    t = q.reshape(*q.shape[:-1], -1, 4, 4, 4, 2)  # (block, t, s, b, h)
    return t.permute(*range(n), n, n + 2, n + 4, n + 1, n + 3).reshape(q.shape)


def from_wgmma_order(q: torch.Tensor) -> torch.Tensor:
    """The inverse of ``to_wgmma_order``."""
    n = q.dim() - 1
    t = q.reshape(*q.shape[:-1], -1, 4, 2, 4, 4)  # (block, s, h, t, b)
    return t.permute(*range(n), n, n + 3, n + 1, n + 4, n + 2).reshape(q.shape)


def to_k_order(q: torch.Tensor, order: int) -> torch.Tensor:
    return to_word_order(q) if order == ORDER_WORDS else to_wgmma_order(q)


def from_k_order(q: torch.Tensor, order: int) -> torch.Tensor:
    return from_word_order(q) if order == ORDER_WORDS else from_wgmma_order(q)


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


def _candidates(m: int, wg: int, ag: int, n: int = 1 << 30, k: int = 0) -> list[Config]:
    """A small, bounded set per regime; the first entry is the default when nothing is timed. Up to 64 rows
    each tile shape also comes split along K (``triton_wq._split_for``) where its tiles alone are too few
    to fill the GPU."""
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
               # more programs per SM, so more of them hide the serial chain of a chunk (see the docstring):
               # 64 x 128 capped at 168 registers (three per SM, a few spills), 64 x 64 (124 registers, four)
               (64, 128, 128, 4, 3, 1, 128, 168), (64, 128, 128, 4, 3, 1, 64)]
        # the winner at M = 256 and 1024 on the 8B shapes (H100, 2026-12-07): 64 x 128 (BLOCK_N x BLOCK_M),
        # SWAP, 4 warps: 204 registers, two programs per SM. 128 x 64 tiles of 8 warps (two programs per SM
        # too, at 116-128 registers) never won and were dropped.
        gm = 8
    out, seen = [], set()
    for bn, sk, kstep, nw, st, swap, bm_cfg, *maxnreg in raw:
        sub = _sub_k(wg, ag, sk)
        n_sub = max(1, kstep // sub)
        extra = {"maxnreg": maxnreg[0]} if maxnreg else {}  # a launch option, not a kernel argument
        split = _split_for(m, n, k, bm_cfg or bm, bn, sub * n_sub) if m <= 64 else 1
        for sp in sorted({split, 1}, reverse=True):
            cfg = Config.make(num_warps=nw, num_stages=st, BLOCK_M=bm_cfg or bm, BLOCK_N=bn, SUB_K=sub,
                              N_SUB=n_sub, GROUP_M=gm, SWAP=swap, SPLIT_K=sp, **extra)
            if cfg not in seen:
                seen.add(cfg)
                out.append(cfg)
    return out


def w4a4_matmul(q: torch.Tensor, sx: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                bias: Optional[torch.Tensor], group: int, act_group: int, out_dtype: torch.dtype,
                units: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q int8 [M, K] in word order (``to_word_order``), sx fp32 [M, K/act_group or 1] -> [M, N] in out_dtype.
    With ``units`` (fp32 [N]; per-token activations only), ``scales`` are uint8 scale levels [N, K/group]
    (``int4.snap_scales``): the weight is q * level * unit."""
    M, K = q.shape
    N = packed.shape[0]
    y = torch.empty((M, N), device=q.device, dtype=out_dtype)
    if M == 0:
        return y
    packed = packed.contiguous()
    scales = scales.contiguous()
    b_arg = bias if bias is not None else sx

    if units is not None and (act_group != 0 or scales.dtype != torch.uint8):
        raise ValueError("triton_w4a4: scale levels (units given) need per-token activations and uint8 levels")

    def launch(cfg: Config, out=y):
        launch_w4a4(cfg, q, sx, packed, scales, b_arg, out, bias is not None, group, act_group, units)

    key = (group, act_group, m_bucket(M), N, K, out_dtype, bias is not None, units is not None, q.device.index)
    cfg = _CACHE.pick(key, _candidates(M, group, act_group, N, K), launch)
    launch(cfg)
    return y


def launch_w4a4(cfg: Config, q, sx, packed, scales, b_arg, out, has_bias: bool, group: int, act_group: int,
                units: Optional[torch.Tensor] = None) -> None:
    """One run of the kernel at config ``cfg`` into ``out`` [M, N] (b_arg: the bias, or any tensor), with
    split-K's fp32 partials and their reduce where cfg["SPLIT_K"] > 1; ``units``: see w4a4_matmul."""
    M, K = q.shape
    N = packed.shape[0]

    def run(grid, dst, k_per, even_k):
        _w4a4_matmul_kernel[grid](q, sx, packed, scales, b_arg, dst, M, N, K, k_per,
                                  q.stride(0), sx.stride(0), packed.stride(0), scales.stride(0), out.stride(0),
                                  LEVELS=units is not None, unit_ptr=units if units is not None else sx,
                                  EVEN_K=even_k, WG=group, AG=act_group, HAS_BIAS=has_bias, **cfg.kwargs())
    launch_split_k(cfg, M, N, K, out, b_arg, has_bias, run)
