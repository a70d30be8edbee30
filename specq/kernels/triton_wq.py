"""Weight-only 4-bit matmul on Triton: ``y = x @ dequant(W).T (+ bias)`` for MXFP4 and INT4 (W4A16).

One kernel serves every M. Decode and verify shapes (M <= 64) are weight streaming: the tile is
BLOCK_M = 16..64 rows (tl.dot needs >= 16; the padding is free on the tensor cores) times a narrow
BLOCK_N, so that N / BLOCK_N programs keep every SM busy and each streams its rows of packed weights
once, dequantizing in registers. Large M uses wide tiles with a grouped program order (L2 reuse).

Dequantization is chosen to cost few integer ops per weight, since at 4 bits per weight a GEMV is
close to instruction-bound as well as memory-bound:

- INT4 (bf16/fp16 activations): nibble ``u = q + 8`` OR-ed into the mantissa of a magic number is the
  float ``MAGIC + u`` (bf16 0x4300 = 128, fp16 0x6400 = 1024) with no int->float conversion. The dot
  then gives ``sum x (MAGIC + 8 + q)``; subtracting ``(MAGIC + 8) * sum(x)`` per K-chunk leaves
  ``sum x q``, which is scaled by the group scale after the dot (SUB_K divides the group size), so
  the scale costs one multiply per output, not per weight. float32 activations take the exact path
  (``(u - 8)`` as float, IEEE fp32 dot).
- MXFP4: the E2M1 code ``c`` placed at bit 9 of an fp16 (sign at bit 15) is ``e2m1(c) * 2^-14``
  exactly (code 1, the only subnormal, included); it is multiplied by ``2^(e - 127 + 14)`` built
  directly from the E8M0 byte, so the weight is exact in bf16/fp16 before the dot.

All products accumulate in fp32; the output is cast to x's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from specq.kernels.triton_common import Config, ConfigCache, dot_flags, m_bucket, next_pow2

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
def _wq_matmul_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_ym,
    FORMAT: tl.constexpr,   # 0 MXFP4 (uint8 [N, K/2], E8M0 [N, K/32]); 1 INT4 (int32 [N, K/8], scales [N, K/GROUP])
    GROUP: tl.constexpr,    # K elements per weight scale (32 for MXFP4)
    MAGIC: tl.constexpr,    # INT4: 0x4300 (bf16), 0x6400 (fp16), 0 (exact float path)
    OFFSET: tl.constexpr,   # INT4: value of MAGIC as a float plus 8
    SUB_K: tl.constexpr,    # K per dot; INT4: divides GROUP; MXFP4: multiple of 32
    N_SUB: tl.constexpr,    # dots per loop iteration (more bytes in flight per iteration)
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    KSTEP: tl.constexpr = SUB_K * N_SUB
    for k0 in range(0, K, KSTEP):
        for j in tl.static_range(N_SUB):
            kk = k0 + j * SUB_K
            offs_k = kk + tl.arange(0, SUB_K)
            k_mask = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if FORMAT == 1:
                offs_w = kk // 8 + tl.arange(0, SUB_K // 8)
                pw = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_w[None, :],
                             mask=n_mask[:, None] & (offs_w < K // 8)[None, :], other=0)
                nib = (pw[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF
                nib = tl.reshape(nib, (BLOCK_N, SUB_K))
                if MAGIC == 0:
                    d = _dot(x, tl.trans((nib - 8).to(tl.float32)), DOT_FP32, IEEE)
                else:
                    wv = (nib | MAGIC).to(tl.int16).to(x_dtype, bitcast=True)
                    d = _dot(x, tl.trans(wv), DOT_FP32, IEEE)
                    d -= OFFSET * tl.sum(x.to(tl.float32), axis=1)[:, None]
                sc = tl.load(s_ptr + offs_n * stride_sn + kk // GROUP, mask=n_mask & (kk < K), other=0.0)
                acc += d * sc.to(tl.float32)[None, :]
            else:
                offs_w = kk // 2 + tl.arange(0, SUB_K // 2)
                pw = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_w[None, :],
                             mask=n_mask[:, None] & (offs_w < K // 2)[None, :], other=0).to(tl.int32)
                c = tl.interleave(pw & 0xF, pw >> 4)  # element 2i = low nibble
                bits = ((c & 7) << 9) | ((c & 8) << 12)
                v = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)  # e2m1 * 2^-14
                offs_s = kk // 32 + tl.arange(0, SUB_K // 32)
                se = tl.load(s_ptr + offs_n[:, None] * stride_sn + offs_s[None, :],
                             mask=n_mask[:, None] & (offs_s < K // 32)[None, :], other=0).to(tl.int32)
                sf = ((se + 14) << 23).to(tl.float32, bitcast=True)  # 2^(e - 127) * 2^14
                w = tl.reshape(tl.reshape(v, (BLOCK_N, SUB_K // 32, 32)) * sf[:, :, None], (BLOCK_N, SUB_K))
                acc += _dot(x, tl.trans(w.to(x_dtype)), DOT_FP32, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


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


def _candidates(m: int, fmt: int, group: int) -> list[Config]:
    """A small, bounded set per regime; the first entry is the default when nothing is timed."""
    if m <= 64:
        bm = max(16, next_pow2(m))
        # (BLOCK_N, SUB_K wanted, K per iteration, warps, stages): narrow N tiles so N/BLOCK_N programs
        # fill the 132 SMs; 256..512 K per iteration so each program keeps KBs of weights in flight.
        raw = [(32, 128, 256, 4, 4), (16, 128, 512, 4, 3), (64, 128, 256, 4, 3), (32, 256, 512, 4, 3),
               (16, 256, 512, 4, 4), (64, 64, 256, 4, 3)]
        gm = 1
    else:
        bm = 64 if m <= 128 else 128
        raw = [(128, 64, 64, 8, 3), (64, 128, 128, 4, 4), (128, 128, 128, 8, 3), (256, 64, 64, 8, 3)]
        gm = 8
    out, seen = [], set()
    for bn, sk, kstep, nw, st in raw:
        sub = _sub_k_for(fmt, group, sk)
        if sub is None:
            continue
        cfg = Config.make(num_warps=nw, num_stages=st, BLOCK_M=bm, BLOCK_N=bn, SUB_K=sub,
                          N_SUB=max(1, kstep // sub), GROUP_M=gm)
        if cfg not in seen:
            seen.add(cfg)
            out.append(cfg)
    return out


def supported_int4_group(group: int) -> bool:
    return _sub_k_for(FORMAT_INT4, group, 128) is not None


def wq_matmul(x2: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
              fmt: int, group: int) -> torch.Tensor:
    """x2 [M, K] (unit stride along K) -> [M, N] in x2.dtype. Arguments are assumed validated."""
    M, K = x2.shape
    N = packed.shape[0]
    y = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    if M == 0:
        return y
    packed = packed.contiguous()
    scales = scales.contiguous()
    if fmt == FORMAT_INT4 and x2.dtype in (torch.bfloat16, torch.float16):
        magic, offset = (0x4300, 136.0) if x2.dtype == torch.bfloat16 else (0x6400, 1032.0)
    else:
        magic, offset = 0, 0.0
    fixed = dict(FORMAT=fmt, GROUP=group if fmt == FORMAT_INT4 else 32, MAGIC=magic, OFFSET=offset,
                 HAS_BIAS=bias is not None, **dot_flags(x2.dtype))

    def launch(cfg: Config, out=y):
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _wq_matmul_kernel[grid](x2, packed, scales, bias if bias is not None else x2, out, M, N, K,
                                x2.stride(0), packed.stride(0), scales.stride(0), out.stride(0),
                                **fixed, **cfg.kwargs())

    key = (fmt, group, m_bucket(M), N, K, x2.dtype, bias is not None, x2.device.index)
    cfg = _CACHE.pick(key, _candidates(M, fmt, group), launch)
    launch(cfg)
    return y
