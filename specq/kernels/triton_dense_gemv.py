"""Weight-streaming GEMV on Triton for dense bf16/fp16 weights: ``y = x @ W.T (+ bias)`` for M <= 4.

Why: a decode step of an 8B model in bf16 is ~16 GB of weight reads; at one token cuBLAS picks
GEMV kernels that stream the big matrices well (gate/up at ~2.8 TB/s) but the 4096 x 4096 o_proj at
~2.2 TB/s and the tall ones through split-K plus a separate reduction kernel
(benchmarks/results/profile_step_8b_h100.md). This kernel is the plain streaming design:

- a program owns BN weight rows and walks K in chunks of BK; each thread loads 16 contiguous bytes of
  a row per chunk and keeps an fp32 accumulator tile, so nothing moves between threads inside the
  loop and the one cross-thread reduction runs after it;
- the next chunk's loads are issued before this chunk's math (register double buffering: Triton does
  not software-pipeline loads that do not feed a tl.dot), which keeps ~2 chunks of every program in
  flight;
- rows of x (M <= 4) share each loaded weight: one accumulator per row of x.

Measured on the H100 (lab sweep, weights rotated past L2, one token): gate/up [28672, 4096] 77 us
(3.04 TB/s; cuBLAS 85 us), lm_head [128256, 4096] 331 us (3.17 TB/s; cuBLAS 375 us), o_proj
[4096, 4096] 13.6 us (cuBLAS 16.8 us). At 4 rows cuBLAS is as fast or faster, and the timing keeps it.
Tried and dropped: programmatic dependent launch (weights loaded before `gdc_wait`): the 8B-shape
step got slower (bf16 6.21 -> 6.25 ms, MXFP4 with the 4-bit GEMV 3.48 -> 3.65 ms). Also tried and
dropped: SwiGLU's silu(gate) * up computed in the down projection's x loads (one kernel less per
layer): 8B-shape bf16 step 5.932 -> 5.927 ms, no gain (every program recomputes the activation over
all of K: 1024 programs x 14336 sigmoids against one small kernel).

`gemv` chooses, per shape, between this kernel's configurations and `F.linear` by timing them once
(ConfigCache), so a shape where cuBLAS is faster keeps cuBLAS.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from specq.kernels.triton_common import Config, ConfigCache

MAX_ROWS = 4
DTYPES = (torch.bfloat16, torch.float16)


@triton.jit
def _dense_gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, K, stride_xm, stride_wn, stride_ym,
    ROWS: tl.constexpr,     # rows of x (1..4), all handled by every program
    BN: tl.constexpr,       # weight rows per program
    BK: tl.constexpr,       # K elements per chunk
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,   # K % BK == 0: the first chunk needs no mask
):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rows = tl.minimum(rn, N - 1)  # rows past N re-read the last row; their results are not stored
    rk = tl.arange(0, BK)
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    if EVEN_K:
        w = tl.load(w_ptrs)
    else:
        w = tl.load(w_ptrs, mask=rk[None, :] < K, other=0.0)
    acc0 = tl.zeros((BN, BK), dtype=tl.float32)
    acc1 = tl.zeros((BN, BK), dtype=tl.float32)
    acc2 = tl.zeros((BN, BK), dtype=tl.float32)
    acc3 = tl.zeros((BN, BK), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kn = k0 + BK
        w_next = tl.load(w_ptrs + kn, mask=(kn + rk)[None, :] < K, other=0.0)  # past the end: nothing
        km = (k0 + rk) < K
        wf = w.to(tl.float32)
        acc0 += wf * tl.load(x_ptr + k0 + rk, mask=km, other=0.0).to(tl.float32)[None, :]
        if ROWS > 1:
            acc1 += wf * tl.load(x_ptr + stride_xm + k0 + rk, mask=km, other=0.0).to(tl.float32)[None, :]
        if ROWS > 2:
            acc2 += wf * tl.load(x_ptr + 2 * stride_xm + k0 + rk, mask=km, other=0.0).to(tl.float32)[None, :]
        if ROWS > 3:
            acc3 += wf * tl.load(x_ptr + 3 * stride_xm + k0 + rk, mask=km, other=0.0).to(tl.float32)[None, :]
        w = w_next
    nm = rn < N
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BN,), dtype=tl.float32)
    out_ty = y_ptr.dtype.element_ty
    tl.store(y_ptr + rn, (tl.sum(acc0, axis=1) + bias).to(out_ty), mask=nm)
    if ROWS > 1:
        tl.store(y_ptr + stride_ym + rn, (tl.sum(acc1, axis=1) + bias).to(out_ty), mask=nm)
    if ROWS > 2:
        tl.store(y_ptr + 2 * stride_ym + rn, (tl.sum(acc2, axis=1) + bias).to(out_ty), mask=nm)
    if ROWS > 3:
        tl.store(y_ptr + 3 * stride_ym + rn, (tl.sum(acc3, axis=1) + bias).to(out_ty), mask=nm)


_CACHE = ConfigCache("dense_gemv")

# (BN rows per program, BK chunk, warps). BK >= 8 * 32 * warps: every thread loads >= 16 bytes of a
# row per chunk. The first entry is the default when nothing is timed.
_RAW = [(4, 1024, 4), (2, 1024, 4), (8, 512, 4), (4, 512, 2), (2, 2048, 8), (1, 2048, 8), (8, 1024, 8),
        (4, 2048, 8), (16, 256, 4), (2, 512, 2), (1, 1024, 4)]
CUBLAS = Config.make(num_warps=0, num_stages=0, CUBLAS=1)  # the F.linear candidate


def candidates(k: int, with_cublas: bool = True) -> list[Config]:
    """The kernel configs worth timing for reduction length k (no chunk much longer than k), and
    F.linear."""
    out = [Config.make(num_warps=nw, num_stages=1, BN=bn, BK=bk) for bn, bk, nw in _RAW
           if bk <= max(256, triton.next_power_of_2(k))]
    return out + ([CUBLAS] if with_cublas else [])


def supported(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """Rows of x 1..4, bf16/fp16 x and weight of one dtype, unit stride along K."""
    return (1 <= x2.shape[0] <= MAX_ROWS and x2.dtype in DTYPES and weight.dtype == x2.dtype
            and weight.dim() == 2 and weight.stride(1) == 1 and x2.stride(1) == 1)


def gemv(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
         config: Optional[Config] = None) -> torch.Tensor:
    """x2 [M <= 4, K], weight [N, K] (same dtype, unit stride along K), bias [N] or None -> [M, N].

    Without `config` the fastest of `candidates` for this shape (F.linear included) is used."""
    if not supported(x2, weight):
        raise ValueError(f"dense_gemv: needs 1..{MAX_ROWS} rows of bf16/fp16 x and a weight of the same "
                         f"dtype with unit stride along K; got x {tuple(x2.shape)} {x2.dtype}, weight "
                         f"{tuple(weight.shape)} {weight.dtype} strides {weight.stride()}")
    M, K = x2.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    b_arg = bias if bias is not None else x2

    def launch(cfg: Config):
        if cfg.meta == CUBLAS.meta:
            torch.matmul(x2, weight.t(), out=y)
            if bias is not None:
                y.add_(bias)
            return
        grid = (triton.cdiv(N, cfg["BN"]),)
        _dense_gemv_kernel[grid](x2, weight, b_arg, y, N, K, x2.stride(0), weight.stride(0), y.stride(0),
                                 ROWS=M, HAS_BIAS=bias is not None, EVEN_K=K % cfg["BK"] == 0,
                                 **cfg.kwargs())

    if config is None:
        key = (M, N, K, x2.dtype, bias is not None, weight.stride(0), x2.device.index)
        config = _CACHE.pick(key, candidates(K), launch)
    if config.meta == CUBLAS.meta:  # F.linear's own result (one kernel with the bias fused)
        return F.linear(x2, weight, bias)
    launch(config)
    return y
