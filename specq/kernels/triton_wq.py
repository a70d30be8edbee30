"""Weight-only 4-bit matmul on Triton: ``y = x @ dequant(W).T (+ bias)`` for MXFP4 and INT4 (W4A16).

One kernel serves every M. Decode and verify shapes (M <= 64) are weight streaming: the tile is
BLOCK_M = 16..64 rows (tl.dot needs >= 16; the padding is free on the tensor cores) times a narrow
BLOCK_N, so that N / BLOCK_N programs keep every SM busy and each streams its rows of packed weights
once, dequantizing in registers. Large M uses wide tiles with a grouped program order (L2 reuse).

Dequantization is chosen to cost few integer ops per weight, since at 4 bits per weight a GEMV is
close to instruction-bound as well as memory-bound:

- INT4 (bf16/fp16 activations): nibble ``u = q + 8`` OR-ed into the mantissa of a magic number is the
  float ``MAGIC + u`` (bf16 0x4300 = 128, fp16 0x6400 = 1024) with no int->float conversion. The dot
  then gives ``sum x (MAGIC + 8 + q)``; subtracting ``(MAGIC + 8) * sum(x)`` per K-chunk (sum(x) from a
  second dot with a ones tile, on tensor cores that are idle at small M) leaves ``sum x q``, which is
  scaled by the group scale after the dot (SUB_K divides the group size), so the scale costs one
  multiply per output, not per weight. Decode and verify sizes take a weight-streaming kernel instead:
  bf16 at 2..16 rows the tensor-core GEMV of ``triton_mma_gemv``, one row (and fp16 up to 4 rows) the
  CUDA-core GEMV of ``triton_gemv`` (``_streaming_path``). float32 activations take the exact path
  (``(u - 8)`` as float, IEEE fp32 dot).
- MXFP4: the E2M1 code ``c`` placed at bit 9 of an fp16 (sign at bit 15) is ``e2m1(c) * 2^-14``
  exactly (code 1, the only subnormal, included); it is multiplied by ``2^(e - 127 + 14)`` built
  directly from the E8M0 byte, so the weight is exact in bf16/fp16 before the dot.

All products accumulate in fp32; the output is cast to x's dtype.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from specq.kernels import triton_gemv, triton_mma_gemv
from specq.kernels.triton_common import INTERPRET, Config, ConfigCache, dot_flags, m_bucket, next_pow2

_INTERPRET = tl.constexpr(INTERPRET)  # a constexpr global, readable inside kernels

FORMAT_MXFP4 = 0
FORMAT_INT4 = 1


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    if DOT_FP32 or IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M row-tiles share each column tile while it sits in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize
    return pid_m, pid_n


@triton.jit
def _nib(pw, i: tl.constexpr):
    """Nibble i (bits 4i..4i+3) of each int32 word: element 8j + i of word j."""
    return (pw >> (4 * i)) & 0xF


@triton.jit
def _interleave8(a0, a1, a2, a3, a4, a5, a6, a7):
    """Eight [..., J] tiles -> [..., J, 2, 2, 2] whose row-major flattening puts a_i[..., j] at 8j + i.

    Built from tl.join only, which stacks values a thread already holds, so no data moves between
    threads (a reshape of a [..., J, 8] broadcast instead goes through shared memory, one 16-bit
    store per element)."""
    q0 = tl.join(tl.join(a0, a4), tl.join(a2, a6))
    q1 = tl.join(tl.join(a1, a5), tl.join(a3, a7))
    return tl.join(q0, q1)


@triton.jit
def _e2m1(pw, i: tl.constexpr):
    """E2M1 code in nibble i as fp32 e2m1 * 2^-14: the code's magnitude bits at fp16 bit 9 and its
    sign at bit 15 make an fp16 whose value is exact, code 1 (0.5, an fp16 subnormal) included."""
    c = _nib(pw, i)
    return (((c & 7) << 9) | ((c & 8) << 12)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _pair16(v, x_dtype: tl.constexpr):
    """int32 -> its two 16-bit halves as floats of x_dtype (a register rename on the GPU)."""
    if _INTERPRET:
        lo = (v & 0xFFFF).to(tl.int16).to(x_dtype, bitcast=True)
        hi = ((v >> 16) & 0xFFFF).to(tl.int16).to(x_dtype, bitcast=True)
        return lo, hi
    else:
        lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [v],
                                           dtype=(tl.int16, tl.int16), is_pure=True, pack=1)
        return lo.to(x_dtype, bitcast=True), hi.to(x_dtype, bitcast=True)


@triton.jit
def _int4_tile(pw, MAGIC: tl.constexpr, x_dtype: tl.constexpr, BLOCK_N: tl.constexpr, SUB_K: tl.constexpr,
               MAGIC2):
    """[BLOCK_N, SUB_K/8] words -> [BLOCK_N, SUB_K] dot operand (MAGIC + u, or q exactly when MAGIC == 0).

    16-bit path: nibbles i and i + 4 of a word are 16 bits apart, so one shift and one LOP3
    (``MAGIC2`` = MAGIC in both halves, a run-time value that ptxas keeps in a register) make both
    16-bit floats ``MAGIC + u`` at once, and tl.join of the two halves is the register itself."""
    if MAGIC == 0:
        t = _interleave8(_nib(pw, 0), _nib(pw, 1), _nib(pw, 2), _nib(pw, 3),
                         _nib(pw, 4), _nib(pw, 5), _nib(pw, 6), _nib(pw, 7))
        return (tl.reshape(t, (BLOCK_N, SUB_K)) - 8).to(tl.float32)
    else:
        a0, a4 = _pair16((pw & 0x000F000F) | MAGIC2, x_dtype)
        a1, a5 = _pair16(((pw >> 4) & 0x000F000F) | MAGIC2, x_dtype)
        a2, a6 = _pair16(((pw >> 8) & 0x000F000F) | MAGIC2, x_dtype)
        a3, a7 = _pair16(((pw >> 12) & 0x000F000F) | MAGIC2, x_dtype)
        return tl.reshape(_interleave8(a0, a1, a2, a3, a4, a5, a6, a7), (BLOCK_N, SUB_K))


@triton.jit
def _mxfp4_tile(pw3, sf, BLOCK_N: tl.constexpr, SUB_K: tl.constexpr):
    """[BLOCK_N, SUB_K/32, 4] words and [BLOCK_N, SUB_K/32] fp32 block scales -> [BLOCK_N, SUB_K] fp32."""
    s3 = sf[:, :, None]
    t = _interleave8(_e2m1(pw3, 0) * s3, _e2m1(pw3, 1) * s3, _e2m1(pw3, 2) * s3, _e2m1(pw3, 3) * s3,
                     _e2m1(pw3, 4) * s3, _e2m1(pw3, 5) * s3, _e2m1(pw3, 6) * s3, _e2m1(pw3, 7) * s3)
    return tl.reshape(t, (BLOCK_N, SUB_K))


@triton.jit
def _e8m0_times_2p14(se):
    """E8M0 byte e -> fp32 2^(e - 127) * 2^14, built as exponent bits (exact, no exp2)."""
    return ((se.to(tl.int32) + 14) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _wq_matmul_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K, K_PER,
    stride_xm, stride_wn, stride_sn, stride_ym, MAGIC2,
    FORMAT: tl.constexpr,   # 0 MXFP4, 1 INT4; both read as int32 words [N, K/8] (nibble i of word j = k 8j+i)
    GROUP: tl.constexpr,    # K elements per weight scale (32 for MXFP4)
    MAGIC: tl.constexpr,    # INT4: 0x4300 (bf16), 0x6400 (fp16), 0 (exact float path)
    OFFSET: tl.constexpr,   # INT4: value of MAGIC as a float plus 8
    SUB_K: tl.constexpr,    # K per dot; INT4: divides GROUP; MXFP4: multiple of 32
    N_SUB: tl.constexpr,    # dots per loop iteration (more bytes in flight per iteration)
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    EVEN_K: tl.constexpr,   # K % (SUB_K * N_SUB) == 0: no masks along K
    SPLIT_K: tl.constexpr,  # > 1: program (.., s) sums K-range [s K_PER, (s + 1) K_PER) into fp32 y[s]
    SWAP: tl.constexpr,     # accumulate y.T tiles: the decoded weight tile is the dot's first operand
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_lo = tl.program_id(1) * K_PER
    k_hi = tl.minimum(K, k_lo + K_PER)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # loads read a valid row for out-of-range rows (their results are never stored), so they need
    # no predicates; only K can be ragged.
    rm = offs_m % M
    rn = offs_n % N
    x_dtype: tl.constexpr = x_ptr.dtype.element_ty
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    KSTEP: tl.constexpr = SUB_K * N_SUB
    G: tl.constexpr = SUB_K // 32
    for k0 in range(k_lo, k_hi, KSTEP):
        for j in tl.static_range(N_SUB):
            kk = k0 + j * SUB_K
            offs_k = kk + tl.arange(0, SUB_K)
            if EVEN_K:
                x = tl.load(x_ptr + rm[:, None] * stride_xm + offs_k[None, :])
            else:
                x = tl.load(x_ptr + rm[:, None] * stride_xm + offs_k[None, :], mask=(offs_k < K)[None, :], other=0.0)
            if FORMAT == 1:
                offs_w = kk // 8 + tl.arange(0, SUB_K // 8)
                if EVEN_K:
                    pw = tl.load(w_ptr + rn[:, None] * stride_wn + offs_w[None, :])
                else:
                    pw = tl.load(w_ptr + rn[:, None] * stride_wn + offs_w[None, :],
                                 mask=(offs_w < K // 8)[None, :], other=0)
                wt = _int4_tile(pw, MAGIC, x_dtype, BLOCK_N, SUB_K, MAGIC2)
                if EVEN_K:
                    sc = tl.load(s_ptr + rn * stride_sn + kk // GROUP)
                else:
                    sc = tl.load(s_ptr + rn * stride_sn + kk // GROUP, mask=(kk < K) & (rn >= 0), other=0.0)
                if SWAP:
                    d = _dot(wt, tl.trans(x), DOT_FP32, IEEE)
                    if MAGIC != 0:  # sum(x) per row of x, on the tensor cores (see below)
                        ones = tl.full((BLOCK_N, SUB_K), 1.0, tl.float32).to(x_dtype)
                        d -= OFFSET * _dot(ones, tl.trans(x), DOT_FP32, IEEE)
                    acc += d * sc.to(tl.float32)[:, None]
                else:
                    d = _dot(x, tl.trans(wt), DOT_FP32, IEEE)
                    if MAGIC != 0:
                        # sum(x) per row via the (otherwise idle) tensor cores: a cross-warp tl.sum
                        # would cost a shared-memory round trip and barriers every chunk.
                        d -= OFFSET * _dot(x, tl.full((SUB_K, BLOCK_N), 1.0, tl.float32).to(x_dtype), DOT_FP32, IEEE)
                    acc += d * sc.to(tl.float32)[None, :]
            else:
                offs_g = kk // 32 + tl.arange(0, G)
                offs_w3 = offs_g[:, None] * 4 + tl.arange(0, 4)[None, :]
                if EVEN_K:
                    pw3 = tl.load(w_ptr + rn[:, None, None] * stride_wn + offs_w3[None, :, :])
                    se = tl.load(s_ptr + rn[:, None] * stride_sn + offs_g[None, :])
                else:
                    g_ok = offs_g < K // 32
                    pw3 = tl.load(w_ptr + rn[:, None, None] * stride_wn + offs_w3[None, :, :],
                                  mask=g_ok[None, :, None], other=0)
                    se = tl.load(s_ptr + rn[:, None] * stride_sn + offs_g[None, :], mask=g_ok[None, :], other=0)
                wt = _mxfp4_tile(pw3, _e8m0_times_2p14(se), BLOCK_N, SUB_K)
                if SWAP:
                    acc += _dot(wt.to(x_dtype), tl.trans(x), DOT_FP32, IEEE)
                else:
                    acc += _dot(x, tl.trans(wt.to(x_dtype)), DOT_FP32, IEEE)
    _store_tile(acc, y_ptr, b_ptr, offs_m, offs_n, m_mask, n_mask, M, N, stride_ym, HAS_BIAS, SPLIT_K, SWAP)


@triton.jit
def _store_tile(acc, y_ptr, b_ptr, offs_m, offs_n, m_mask, n_mask, M, N, stride_ym,
                HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, SWAP: tl.constexpr):
    """A GEMM's fp32 tile (y.T's when SWAP) to y with the bias, or as split-K's fp32 partial sums
    [SPLIT_K, M, N] (_splitk_reduce_kernel adds them and the bias)."""
    if SWAP:  # acc is [BLOCK_N, BLOCK_M]: the same stores with the index roles exchanged
        mn_mask = n_mask[:, None] & m_mask[None, :]
        if SPLIT_K > 1:
            tl.store(y_ptr + tl.program_id(1) * M * N + offs_m[None, :] * N + offs_n[:, None], acc, mask=mn_mask)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
                     mask=mn_mask)
    elif SPLIT_K > 1:
        tl.store(y_ptr + tl.program_id(1) * M * N + offs_m[:, None] * N + offs_n[None, :], acc,
                 mask=m_mask[:, None] & n_mask[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _splitk_reduce_kernel(ws_ptr, b_ptr, y_ptr, M, N, stride_ym,
                          SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y[m, n] = sum_s ws[s, m, n] (+ bias[n]), in a fixed order (deterministic, unlike atomics)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + (offs // N) * stride_ym + n, acc.to(y_ptr.dtype.element_ty), mask=mask)


def launch_split_k(cfg: Config, M: int, N: int, K: int, out: torch.Tensor, b_arg: torch.Tensor, has_bias: bool,
                   run: Callable) -> None:
    """Launch a GEMM kernel with the SPLIT_K protocol of ``_store_tile``: ``run(grid, dst, k_per, even_k)`` starts
    it over (M x N tiles, splits), K_PER = k_per whole K steps per split, into ``out`` or, split, into fp32
    partials that ``_splitk_reduce_kernel`` then sums into ``out`` with the bias (b_arg)."""
    kstep = cfg["SUB_K"] * cfg["N_SUB"]
    split = cfg["SPLIT_K"]
    k_per = triton.cdiv(triton.cdiv(K, split), kstep) * kstep  # whole chunks per split
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split)
    dst = out if split == 1 else torch.empty((split, M, N), device=out.device, dtype=torch.float32)
    run(grid, dst, k_per, K % kstep == 0)
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(M * N, block),)](dst, b_arg, out, M, N, out.stride(0), SPLIT_K=split,
                                                            HAS_BIAS=has_bias, BLOCK=block, num_warps=4)


_CACHE = ConfigCache("wq_matmul")


def _sub_k_for(fmt: int, group: int, want: int) -> Optional[int]:
    """Largest power of two <= want usable as SUB_K: INT4 needs SUB_K | group, MXFP4 SUB_K % 32 == 0."""
    if fmt == FORMAT_MXFP4:
        return max(32, want)
    s = want
    while s >= 16:
        if group % s == 0:
            return s
        s //= 2
    return None


def _split_for(m: int, n: int, k: int, bm: int, bn: int, kstep: int) -> int:
    """Split-K factor that gives ~2 programs per SM (132 SMs) when the M x N tiles alone are too few
    (a decode-shaped verify of a K = 14336 down projection has only N / BLOCK_N of them)."""
    tiles = -(-m // bm) * -(-n // bn)
    split = 1
    while split < 8 and tiles * split < 264 and k // (kstep * split * 2) >= 2:
        split *= 2
    return split


def _candidates(m: int, fmt: int, group: int, n: int = 1 << 30, k: int = 0) -> list[Config]:
    """A small, bounded set per regime; the first entry is the default when nothing is timed."""
    if m <= 64:
        bm = max(16, next_pow2(m))
        # (BLOCK_N, SUB_K wanted, K per iteration, warps, stages): narrow N tiles so N/BLOCK_N programs
        # fill the 132 SMs; 256..512 K per iteration so each program keeps KBs of weights in flight.
        # SWAP (last field): y.T tiles whose first dot operand is the weight tile decoded in registers,
        # which Hopper's wgmma can read from registers (its second operand must be in shared memory)
        raw = [(32, 128, 256, 4, 4, 0), (16, 128, 512, 4, 3, 0), (64, 128, 256, 4, 3, 0), (32, 256, 512, 4, 3, 0),
               (64, 128, 256, 4, 4, 1), (64, 128, 512, 4, 3, 1), (128, 128, 256, 8, 3, 1)]
        gm = 1
    else:
        bm = 64 if m <= 128 else 128
        raw = [(128, 64, 64, 8, 3, 0), (64, 128, 128, 4, 4, 0), (128, 128, 128, 8, 3, 0), (256, 64, 64, 8, 3, 0),
               (128, 64, 64, 8, 3, 1), (128, 128, 128, 8, 3, 1)]
        gm = 8
    out, seen = [], set()
    for bn, sk, kstep, nw, st, swap in raw:
        sub = _sub_k_for(fmt, group, sk)
        if sub is None:  # (Triton 3.6 rejects some SUB_K=32 wide tiles; ConfigCache skips those)
            continue
        n_sub = max(1, kstep // sub)
        split = _split_for(m, n, k, bm, bn, sub * n_sub) if m <= 64 else 1
        for sp in sorted({split, 1}, reverse=True):
            cfg = Config.make(num_warps=nw, num_stages=st, BLOCK_M=bm, BLOCK_N=bn, SUB_K=sub,
                              N_SUB=n_sub, GROUP_M=gm, SPLIT_K=sp, SWAP=swap)
            if cfg not in seen:
                seen.add(cfg)
                out.append(cfg)
    return out


def supported_int4_group(group: int) -> bool:
    return _sub_k_for(FORMAT_INT4, group, 128) is not None


# Up to this many rows, bf16/fp16 activations take the CUDA-core GEMV (in launches of <= 4 rows,
# each streaming the weights once); more rows take the tensor-core kernel. Chosen from
# benchmarks/kernel_paths.py on the H100 (results in benchmarks/results/).
GEMV_MAX_M = 4
# From MMA_MIN_M to MMA_MAX_M rows, bf16 activations take the tensor-core GEMV (triton_mma_gemv) where
# it applies (MXFP4, or INT4 groups of 128 * n). H100, 2026-12-07 (benchmarks/results/kernels_mma_h100.md):
# at 2..16 rows it is 1.1-2.9x faster than the CUDA-core GEMV / tiled kernel and faster than tinygemm
# from M = 4 on every 8B shape; at one row the CUDA-core GEMV is faster on 4096x4096 and 14336x4096.
# SPECQ_MMA_MAX_M overrides the upper end (0 = never; A/B runs).
MMA_MIN_M = 2
MMA_MAX_M = int(os.environ.get("SPECQ_MMA_MAX_M", "16"))


def _streaming_path(x2: torch.Tensor, fmt: int, group: int) -> Optional[str]:
    """The weight-streaming kernel "auto" takes for x2 ("mma" or "gemv"), or None (the tiled kernel)."""
    M = x2.shape[0]
    if MMA_MIN_M <= M <= MMA_MAX_M and triton_mma_gemv.supported(fmt, group, min(M, triton_mma_gemv.MAX_ROWS), x2):
        return "mma"
    if M <= GEMV_MAX_M and x2.dtype in (torch.bfloat16, torch.float16) and triton_gemv.supported(fmt, group, 1):
        return "gemv"
    return None


def streams_weights(x2: torch.Tensor, fmt: int, group: int) -> bool:
    """Whether ``wq_matmul(x2, ..)`` on "auto" runs a weight-streaming kernel (decode and verify sizes)."""
    return _streaming_path(x2, fmt, group) is not None


def wq_matmul(x2: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
              fmt: int, group: int, path: str = "auto") -> torch.Tensor:
    """x2 [M, K] (unit stride along K) -> [M, N] in x2.dtype. Arguments are assumed validated.

    Both formats are read as int32 words [N, K/8] (an MXFP4 uint8 [N, K/2] viewed as int32: byte b
    of word j holds elements 8j + 2b, 8j + 2b + 1 in its low, high nibble, the INT4 order).
    ``path``: "auto", or "gemv" / "mma" / "dot" to force one kernel (benchmarks compare them)."""
    M, K = x2.shape
    N = packed.shape[0]
    y = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    if M == 0:
        return y
    words = packed.contiguous()
    if fmt == FORMAT_MXFP4:
        words = words.view(torch.int32)
    scales = scales.contiguous()
    forced = path != "auto"  # a forced path is checked here; "auto" only picks supported ones
    if not forced:
        path = _streaming_path(x2, fmt, group) or "dot"
    if path in ("mma", "gemv"):
        mod = triton_mma_gemv if path == "mma" else triton_gemv
        if forced and path == "mma" and not triton_mma_gemv.supported(fmt, group, min(M, mod.MAX_ROWS), x2):
            raise ValueError(f"the MMA GEMV path needs bf16 activations (rows on 4-byte boundaries, K % 32 == 0) "
                             f"and MXFP4 or an INT4 group that is a multiple of 128, got {x2.dtype}, group {group}")
        if forced and path == "gemv" and not (x2.dtype in (torch.bfloat16, torch.float16)
                                              and triton_gemv.supported(fmt, group, 1)):
            raise ValueError(f"the GEMV path needs bf16/fp16 activations and a supported group, got {x2.dtype}, {group}")
        for r in range(0, M, mod.MAX_ROWS):  # launches of <= MAX_ROWS rows, each streaming the weights once
            rows = slice(r, min(M, r + mod.MAX_ROWS))
            mod.gemv(x2[rows], words, scales, bias, fmt, group, out=y[rows])
        return y
    _dot_matmul(x2, words, scales, bias, fmt, group, y)
    return y


def _dot_matmul(x2, words, scales, bias, fmt: int, group: int, y: torch.Tensor,
                config: Optional[Config] = None) -> None:
    """The tensor-core kernel (any M), writing y; `config` (one of `_candidates`) skips the choice."""
    M, K = x2.shape
    N = words.shape[0]
    b_arg = bias if bias is not None else x2
    g = group if fmt == FORMAT_INT4 else 32
    if fmt == FORMAT_INT4 and x2.dtype in (torch.bfloat16, torch.float16):
        magic, offset = (0x4300, 136.0) if x2.dtype == torch.bfloat16 else (0x6400, 1032.0)
    else:
        magic, offset = 0, 0.0
    fixed = dict(FORMAT=fmt, GROUP=g, MAGIC=magic, OFFSET=offset, HAS_BIAS=bias is not None,
                 **dot_flags(x2.dtype))

    def launch(cfg: Config, out=y):
        def run(grid, dst, k_per, even_k):
            _wq_matmul_kernel[grid](x2, words, scales, b_arg, dst, M, N, K, k_per,
                                    x2.stride(0), words.stride(0), scales.stride(0), out.stride(0), magic * 0x10001,
                                    EVEN_K=even_k, **fixed, **cfg.kwargs())
        launch_split_k(cfg, M, N, K, out, b_arg, bias is not None, run)

    if config is None:
        key = (fmt, group, m_bucket(M), N, K, x2.dtype, bias is not None, x2.device.index)
        config = _CACHE.pick(key, _candidates(M, fmt, group, N, K), launch)
    launch(config)
