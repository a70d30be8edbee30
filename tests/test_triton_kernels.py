"""The Triton kernels (specq/kernels/triton_*.py) against float64 math and the reference ops.

CPU CI: every kernel runs under ``TRITON_INTERPRET=1`` on tiny, ragged shapes. The interpreter
must be chosen before triton is imported and applies to the whole process, so these checks run in
ONE subprocess (this file with ``--interpret-worker``), which prints a JSON report; the tests read it
from a module fixture. The pytest process itself never imports triton in interpreter mode, so other
tests are not disturbed. GPU: the same checks at larger, ragged shapes (skipped without CUDA),
through ``torch.ops.specq.*`` so that the CUDA dispatch to the Triton kernels is what is tested.

What is compared (``rel`` = ||out - ref|| / ||ref||):
- mxfp4, w4a16: the kernel against float64 ``x @ dequant(W).T + b`` (rotation in float64 via the
  dense Hadamard matrix) and, on CPU, against the reference op (the op's numerical definition).
- the activation pre-kernel: rotation against float64; its INT4 codes and scales against
  ``activation.quantize_int4`` applied to the kernel's own rotated x (identical up to very rare ties).
- w4a4: the kernel against float64 from the pre-kernel's own codes and scales (exact INT products),
  and against the reference op. That last check is loose in bf16/fp16: the reference rounds the
  rotated x to bf16 through several Kronecker factors, so about 1% of the values land one bf16 ulp
  away from ours and 1% of the INT4 codes move by one step, which moves the output by a few percent.
- dense GEMV (triton_dense_gemv): every tile config against float64 ``x @ W.T + b``; on the GPU also
  the op with CUDA-graph capture.
- tensor-core weight-only kernel (triton_wq): every tile config (SWAP and split-K included) at M = 7 and 70.
- W4A4 GEMM: every large-M tile config, both operand orders (SWAP), against float64 from its codes.
- decode attention (triton_attention): against float64 softmax attention with GQA and causal masks
  per batch row (whole masked blocks skipped).
Tolerances: float32 1e-5 (2e-5 for reductions over K > 4096); bf16/fp16 1.5e-2 (the interpreter truncates fp32 -> bf16
instead of rounding, so it sits near 5e-3 rather than 2e-3).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import zlib

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (name, op, dtype, M, K, N, group, act_group, had_block, bias[, W4A4 scale levels])
CPU_CASES = [
    ("mxfp4_bf16_ragged", "mxfp4", "bfloat16", 5, 96, 40, 0, 0, 0, True),
    ("mxfp4_fp32", "mxfp4", "float32", 3, 64, 24, 0, 0, 0, False),
    ("mxfp4_bf16_gemv", "mxfp4", "bfloat16", 1, 160, 40, 0, 0, 0, True),
    ("mxfp4_bf16_largeM", "mxfp4", "bfloat16", 70, 128, 40, 0, 0, 0, False),
    ("mxfp4_bf16_gemv_m3", "mxfp4", "bfloat16", 3, 2112, 7, 0, 0, 0, True),
    ("mxfp4_fp16_gemv_m4_even", "mxfp4", "float16", 4, 2048, 9, 0, 0, 0, False),
    ("mxfp4_bf16_splitk_m6", "mxfp4", "bfloat16", 6, 2080, 8, 0, 0, 0, True),
    ("w4a16_bf16_g32", "w4a16", "bfloat16", 5, 96, 40, 32, 0, 0, True),
    ("w4a16_bf16_g128_h32", "w4a16", "bfloat16", 17, 256, 33, 128, 0, 32, False),
    ("w4a16_fp16_g64_h12", "w4a16", "float16", 3, 192, 24, 64, 0, 12, True),
    ("w4a16_bf16_gemv_g64", "w4a16", "bfloat16", 1, 192, 40, 64, 0, 0, True),
    ("w4a16_fp16_gemv_h64", "w4a16", "float16", 1, 128, 24, 128, 0, 64, False),
    ("w4a16_bf16_gemv_m2_g32", "w4a16", "bfloat16", 2, 2080, 6, 32, 0, 0, True),
    ("w4a16_bf16_gemv_m4_even", "w4a16", "bfloat16", 4, 4096, 5, 128, 0, 0, False),
    ("w4a16_bf16_splitk_m7_g64", "w4a16", "bfloat16", 7, 2048, 5, 64, 0, 0, True),
    ("w4a16_fp32_g32", "w4a16", "float32", 4, 64, 24, 32, 0, 0, False),
    ("w4a16_bf16_largeM_h16", "w4a16", "bfloat16", 70, 128, 40, 64, 0, 16, False),
    ("w4a4_bf16_tok", "w4a4", "bfloat16", 5, 96, 40, 32, 0, 0, True),
    ("w4a4_bf16_g32_h32", "w4a4", "bfloat16", 17, 256, 33, 128, 32, 32, False),
    ("w4a4_fp16_tok_h12", "w4a4", "float16", 3, 192, 24, 64, 0, 12, False),
    ("w4a4_fp32_g32", "w4a4", "float32", 4, 64, 24, 32, 32, 0, True),
    ("w4a4_bf16_g32_h32_gemv_m2", "w4a4", "bfloat16", 2, 256, 33, 128, 32, 32, True),
    ("w4a4_bf16_largeM_tok_h64", "w4a4", "bfloat16", 70, 256, 40, 128, 0, 64, False),
    # scale levels: the integer-level GEMM (large M, per token), the float kernels with snapped scales
    # (per-group activations; the streaming route at 2 rows)
    ("w4a4_bf16_largeM_tok_h64_levels16", "w4a4", "bfloat16", 70, 256, 40, 128, 0, 64, True, 16),
    ("w4a4_bf16_g32_h32_levels16", "w4a4", "bfloat16", 17, 256, 33, 128, 32, 32, False, 16),
    ("w4a4_bf16_tok_h32_gemv_m2_levels9", "w4a4", "bfloat16", 2, 256, 33, 128, 0, 32, True, 9),
    ("w4a4_bf16_largeM_g32_h64_levels16", "w4a4", "bfloat16", 70, 256, 40, 128, 32, 64, False, 16),
    ("w4a4_fp32_g32_gemv_m3_levels16", "w4a4", "float32", 3, 256, 24, 128, 32, 0, True, 16),
]

GPU_CASES = [
    ("mxfp4_m1", "mxfp4", "bfloat16", 1, 4096, 1000, 0, 0, 0, False),
    ("mxfp4_m7", "mxfp4", "bfloat16", 7, 1184, 4099, 0, 0, 0, True),
    ("mxfp4_m33", "mxfp4", "bfloat16", 33, 640, 768, 0, 0, 0, False),
    ("mxfp4_m300", "mxfp4", "bfloat16", 300, 1184, 1000, 0, 0, 0, True),
    ("mxfp4_fp16_m16", "mxfp4", "float16", 16, 2048, 513, 0, 0, 0, False),
    ("mxfp4_fp32_m5", "mxfp4", "float32", 5, 1024, 520, 0, 0, 0, True),
    ("w4a16_m1", "w4a16", "bfloat16", 1, 4096, 1000, 128, 0, 0, False),
    ("w4a16_m7_h128", "w4a16", "bfloat16", 7, 1152, 4099, 128, 0, 128, True),
    ("w4a16_m33_g64", "w4a16", "bfloat16", 33, 640, 768, 64, 0, 0, False),
    ("w4a16_m300_h96", "w4a16", "bfloat16", 300, 1152, 1000, 128, 0, 96, True),
    ("w4a16_m1030_g32", "w4a16", "bfloat16", 1030, 512, 260, 32, 0, 0, False),
    ("w4a16_fp16_m16", "w4a16", "float16", 16, 2048, 513, 128, 0, 64, False),
    ("w4a16_fp32_m5", "w4a16", "float32", 5, 1024, 520, 128, 0, 0, True),
    ("w4a4_m1_tok_h128", "w4a4", "bfloat16", 1, 4096, 1000, 128, 0, 128, False),
    ("w4a4_m7_g32", "w4a4", "bfloat16", 7, 1152, 4099, 128, 32, 0, True),
    ("w4a4_m2_g32_h64", "w4a4", "bfloat16", 2, 2048, 1000, 128, 32, 64, True),
    ("w4a4_m300_g32_h128", "w4a4", "bfloat16", 300, 1152, 1000, 128, 32, 128, False),
    ("w4a4_m1030_tok_h64", "w4a4", "bfloat16", 1030, 512, 260, 64, 0, 64, True),
    ("w4a4_m260_tok_h12", "w4a4", "bfloat16", 260, 1152, 520, 128, 0, 12, False),
    ("w4a4_fp32_m5_g32", "w4a4", "float32", 5, 1024, 520, 128, 32, 0, True),
    ("w4a4_m7_tok_h128_levels16", "w4a4", "bfloat16", 7, 1152, 4099, 128, 0, 128, True, 16),
    ("w4a4_m100_tok_levels16", "w4a4", "bfloat16", 100, 1152, 1000, 128, 0, 0, False, 16),
    ("w4a4_m1030_tok_h64_levels16", "w4a4", "bfloat16", 1030, 512, 260, 64, 0, 64, True, 16),
    ("w4a4_m300_g32_levels16", "w4a4", "bfloat16", 300, 1152, 1000, 128, 32, 128, False, 16),
    ("w4a4_m600_g32_h128_levels16", "w4a4", "bfloat16", 600, 14336, 520, 128, 32, 128, True, 16),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _tol(dtype: torch.dtype, k: int) -> float:
    return (1e-5 if k <= 4096 else 2e-5) if dtype == torch.float32 else 1.5e-2


def _rot64(x: torch.Tensor, had_block: int) -> torch.Tensor:
    from specq.formats import hadamard

    x64 = x.double().cpu()
    if had_block == 0:
        return x64
    h = hadamard.hadamard_matrix(had_block)
    return (x64.reshape(-1, x.shape[-1] // had_block, had_block) @ h).reshape(x64.shape)


def run_case(case, device: str, use_ops: bool) -> dict:
    """Run one case; returns {check: (value, limit)} where each check passes iff value <= limit."""
    from specq.formats import activation, int4, mxfp4
    from specq.kernels import ops, triton_act, triton_backend, triton_w4a4

    name, op, dtype_name, M, K, N, group, act_group, had_block, has_bias, *rest = case
    levels = rest[0] if rest else 0
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    x = torch.randn(M, K, generator=gen).to(dtype)
    w = torch.randn(N, K, generator=gen) * 0.05
    b = (torch.randn(N, generator=gen) * 0.1).to(dtype) if has_bias else None
    b64 = b.double() if b is not None else torch.zeros(N, dtype=torch.float64)
    tol = _tol(dtype, K)
    checks = {}
    if op == "mxfp4":
        p, s = mxfp4.quantize(w)
        w64 = mxfp4.dequantize(p, s, torch.float64)
        args = (p, s, b)
        fn = torch.ops.specq.linear_mxfp4 if use_ops else triton_backend.linear_mxfp4
        ref_op = lambda: ops.linear_mxfp4_op(x, p, s, b)  # noqa: E731
    else:
        p, s = int4.quantize(w.to(dtype), group)
        w64 = int4.dequantize(p, int4.snapped_scales(s, levels) if levels else s, torch.float64)
        if op == "w4a16":
            args = (p, s, b, group, had_block)
            fn = torch.ops.specq.linear_w4a16 if use_ops else triton_backend.linear_w4a16
            ref_op = lambda: ops.linear_w4a16_op(x, p, s, b, group, had_block)  # noqa: E731
        else:
            args = (p, s, b, group, act_group, had_block, levels)
            fn = torch.ops.specq.linear_w4a4 if use_ops else triton_backend.linear_w4a4
            ref_op = lambda: ops.linear_w4a4_op(x, p, s, b, group, act_group, had_block, levels)  # noqa: E731
    dev_args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    xd = x.to(device)
    if device != "cpu":  # poison the allocator's free memory so unwritten outputs show up as NaN
        torch.empty(64 << 20, dtype=torch.float32, device=device).fill_(float("nan"))
    y = fn(xd, *dev_args)
    if device != "cpu":
        torch.cuda.synchronize()
    checks["shape_dtype"] = (0.0 if (tuple(y.shape) == (M, N) and y.dtype == dtype) else 1.0, 0.0)
    checks["finite"] = (0.0 if bool(torch.isfinite(y).all()) else 1.0, 0.0)
    if op in ("mxfp4", "w4a16"):
        xr64 = _rot64(x, had_block) if op == "w4a16" else x.double()
        checks["vs_float64"] = (_rel(y, xr64 @ w64.T + b64), tol)
    else:
        x2 = xd.reshape(M, K)
        xr = triton_act.rotate(x2, had_block) if had_block > 0 else x2
        if had_block > 0:
            checks["rotation_vs_float64"] = (_rel(xr, _rot64(x, had_block)), tol)
        act_levels = levels if act_group else 0  # grouped activations snap their scales too
        q, sx = triton_act.quantize(x2, act_group, had_block, levels=act_levels)
        # on the CPU: PyTorch's CUDA division by a Python scalar multiplies by the reciprocal, which
        # moves amax / 7 by an ulp now and then and breaks exact ties differently; the op's definition
        # (and the kernel) divide.
        if act_levels:  # values code * v, one unit per token; a code one step off moves a value by v
            q_ref, s_ref = activation.quantize_int4_levels(xr.cpu(), act_group, act_levels)
            step = float(act_levels)
        else:
            q_ref, s_ref = activation.quantize_int4(xr.cpu(), act_group)
            step = 1.0
        q, sx = triton_w4a4.from_word_order(q.cpu()), sx.cpu()
        diff = (q.int() - q_ref.int()).abs()
        checks["act_codes_mismatch_frac"] = (float((diff > 0).float().mean()), max(1e-3, 2.0 / diff.numel()))
        checks["act_codes_max_step"] = (float(diff.max()), step)
        checks["act_scales"] = (_rel(sx, s_ref.reshape(sx.shape)), 1e-6)
        # the fake-quantized activation (the GEMV route of W4A4 at decode sizes) against the
        # reference's fake quantization of the kernel's own rotated x
        fq = triton_act.fake_quantize(x2, act_group, had_block, levels=act_levels).cpu()
        # (limits: the interpreter truncates fp32 -> bf16 where the GPU rounds; a rare tie may move one
        # INT4 code by a step on the GPU)
        fq_limit = 1e-2 if (device == "cpu" and dtype == torch.bfloat16) else 5e-3
        checks["fake_quant_vs_reference"] = (
            _rel(fq, activation.fake_quantize_int4(xr.cpu(), act_group, act_levels)), fq_limit)
        ag = act_group if act_group > 0 and not act_levels else K
        xq64 = (q.double().cpu().reshape(M, K // ag, ag) * sx.double().cpu().reshape(M, -1, 1)).reshape(M, K)
        checks["vs_float64_same_codes"] = (_rel(y, xq64 @ w64.T + b64), tol)
    if device == "cpu":
        ref = ref_op()
        loose = op == "w4a4" and dtype != torch.float32 and had_block > 0
        limit = 0.1 if loose else (1e-2 if op == "w4a4" else tol)
        checks["vs_reference_op"] = (_rel(y, ref), limit)
    return checks


# Every GEMV tile configuration (weight rows per program 1/2/4; ragged and even K), run directly so that
# the configs autotuning may pick on a GPU are all checked here, not only the untimed default. INT4 at
# M = 1 runs the scaled-x decode, at M >= 2 the exact-q decode (triton_gemv.kernel_format).
GEMV_CONFIG_CASES = [(fmt, m, bn, jt, nw, k) for fmt in (0, 1) for (m, bn, jt, nw, k) in
                     [(1, 1, 32, 1, 1088), (2, 2, 32, 1, 1024), (3, 4, 64, 2, 2112), (4, 2, 64, 2, 2048),
                      (1, 4, 64, 2, 2048), (2, 4, 32, 1, 2112)]]


def _quantized_case(fmt: int, m: int, k: int, n: int, int4_group: int, seed: int):
    """Random bf16 x [m, k] and bias [n], a weight [n, k] in fmt (0 MXFP4, 1 INT4) as int32 words +
    scales, its float64 dequantization and the format's group: (x, b, words, scales, w64, group)."""
    from specq.formats import int4, mxfp4

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen) * 0.05
    b = (torch.randn(n, generator=gen) * 0.1).to(torch.bfloat16)
    if fmt == 0:
        p, s = mxfp4.quantize(w)
        return x, b, p.view(torch.int32), s, mxfp4.dequantize(p, s, torch.float64), 32
    p, s = int4.quantize(w.bfloat16(), int4_group)
    return x, b, p, s, int4.dequantize(p, s, torch.float64), int4_group


def run_gemv_config(fmt: int, m: int, bn: int, jt: int, nw: int, k: int, device: str = "cpu") -> dict:
    from specq.kernels import triton_gemv
    from specq.kernels.triton_common import Config

    x, b, words, s, w64, group = _quantized_case(fmt, m, k, 7, 64, 1000 * fmt + 100 * m + bn + jt)
    cfg = Config.make(num_warps=nw, num_stages=1, BN=bn, JT=jt)
    y = triton_gemv.gemv(x.to(device), words.to(device), s.to(device), b.to(device), fmt, group, config=cfg)
    return {"vs_float64": (_rel(y, x.double() @ w64.T + b.double()), 1.5e-2)}


# bf16 x is read as int32 words of two values when its rows start on 4-byte boundaries; an odd row
# stride or an odd first element (views of a wider buffer) must take the per-value loads and give the
# same result. (fmt, m, k, pad, first element)
GEMV_STRIDE_CASES = [(0, 2, 1088, 1, 0), (1, 3, 2048, 1, 0), (1, 2, 1024, 2, 0), (0, 1, 1024, 2, 1)]


def run_gemv_strided(fmt: int, m: int, k: int, pad: int, first: int, device: str = "cpu") -> dict:
    from specq.kernels import triton_gemv

    x, b, words, s, w64, group = _quantized_case(fmt, m, k, 7, 64, 31 * fmt + m + pad + first)
    wide = torch.zeros(m, k + pad, dtype=x.dtype)
    wide[:, first:first + k] = x
    xv = wide.to(device)[:, first:first + k]  # row stride k + pad, rows starting at element `first`
    y = triton_gemv.gemv(xv, words.to(device), s.to(device), b.to(device), fmt, group)
    # the same values through the other x path (contiguous: even stride, int32 words), where pad is odd:
    # both convert bf16 -> fp32 exactly and run the same FMA chains, so the outputs are bitwise equal
    y_words = triton_gemv.gemv(x.to(device), words.to(device), s.to(device), b.to(device), fmt, group)
    return {"vs_float64": (_rel(y, x.double() @ w64.T + b.double()), 1.5e-2),
            "stride": (float(xv.stride(0) != k + pad), 0.0),
            "equal_to_word_path": (float(not torch.equal(y, y_words)), 0.0)}


# Tensor-core GEMV (triton_mma_gemv): both formats, 1..16 rows of x (one and two 8-row x tiles), one and two
# 16-row weight tiles per program, 1..16 warps along K (every warp count the candidates use), K ragged
# against the warp step (masked) and N ragged against the tile; INT4 above 8 rows with the offset codes.
# (fmt, m, tiles, warps, k, n, int4 group)
MMA_GEMV_CASES = [(1, 1, 1, 1, 256, 16, 128), (1, 3, 1, 2, 1152, 40, 128), (1, 11, 2, 4, 1024, 37, 256),
                  (1, 16, 2, 2, 768, 32, 128), (1, 9, 1, 2, 640, 24, 128), (0, 1, 1, 1, 256, 16, 32), (0, 5, 2, 2, 544, 33, 32),
                  (0, 8, 1, 4, 2048, 20, 32), (0, 16, 1, 2, 1088, 20, 32), (1, 7, 1, 8, 2048, 24, 128),
                  (0, 2, 1, 16, 4096, 16, 32)]


def run_mma_gemv(fmt: int, m: int, tiles: int, warps: int, k: int, n: int, group: int, device: str = "cpu") -> dict:
    from specq.kernels import triton_mma_gemv
    from specq.kernels.triton_common import Config

    x, b, words, s, w64, group = _quantized_case(fmt, m, k, n, group, 17 * fmt + m + tiles + warps)
    cfg = Config.make(num_warps=warps, num_stages=1, TILES=tiles, KW=warps, PREFETCH=int(m % 2 == 1),
                      OFFSET=int(fmt == 1 and m > 8))
    y = triton_mma_gemv.gemv(x.to(device), words.to(device), s.to(device), b.to(device), fmt, group, config=cfg)
    return {"vs_float64": (_rel(y, x.double() @ w64.T + b.double()), 1.5e-2)}


# MXFP4 scale bytes across the tensor-core GEMV's documented range (E8M0 e in [34, 160]: |w| from ~2^-93
# to 2^35): random codes, each 32-element group with its own random scale. (m, e_lo, e_hi)
MMA_GEMV_SCALE_CASES = [(3, 34, 160), (1, 100, 150)]


def run_mma_gemv_scale_range(m: int, e_lo: int, e_hi: int, device: str = "cpu") -> dict:
    from specq.formats import mxfp4
    from specq.kernels import triton_mma_gemv

    gen = torch.Generator().manual_seed(e_lo + e_hi + m)
    n, k = 24, 512
    packed = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    scales = torch.randint(e_lo, e_hi + 1, (n, k // 32), generator=gen, dtype=torch.uint8)
    w64 = mxfp4.dequantize(packed, scales, torch.float64)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    y = triton_mma_gemv.gemv(x.to(device), packed.view(torch.int32).to(device), scales.to(device), None, 0, 32)
    ref = x.double() @ w64.T
    # rows are dominated by their largest scales; compare each output against its row's magnitude
    err = ((y.double().cpu() - ref).abs() / ref.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)).max()
    return {"vs_float64_rowwise": (float(err), 1e-2), "finite": (float(not torch.isfinite(y).all()), 0.0)}


# Dense GEMV (triton_dense_gemv): every tile config at ragged K and N, rows of x 1..4, bias or not.
DENSE_CONFIG_CASES = [(m, i, k, bias) for i in range(11) for (m, k, bias) in [(1, 1100, True), (3, 2112, False)]]
DENSE_CONFIG_CASES += [(4, i, 1024, True) for i in (0, 1, 2)] + [(2, i, 64, False) for i in (0, 3)]


def run_dense_config(m: int, index: int, k: int, bias: bool, device: str = "cpu", dtype=torch.bfloat16) -> dict:
    from specq.kernels import triton_dense_gemv

    gen = torch.Generator().manual_seed(97 * m + index + k)
    n = 13
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    b = (torch.randn(n, generator=gen) * 0.1).to(dtype) if bias else None
    cfgs = triton_dense_gemv.candidates(k, with_cublas=False)
    cfg = cfgs[min(index, len(cfgs) - 1)]
    y = triton_dense_gemv.gemv(x.to(device), w.to(device), None if b is None else b.to(device), config=cfg)
    ref = x.double() @ w.double().T + (b.double() if bias else 0.0)
    return {"vs_float64": (_rel(y.cpu(), ref), 1.5e-2), "shape": (float(tuple(y.shape) != (m, n)), 0.0)}


# Tensor-core weight-only kernel (triton_wq): every candidate config at a decode-verify M (7, with
# split-K configs) and a large M (70), both operand orders (SWAP), MXFP4 and INT4, bf16 activations.
WQ_CONFIG_CASES = [(fmt, m, i) for fmt in (0, 1) for m in (7, 70) for i in range(14)]


def run_wq_config(fmt: int, m: int, index: int, device: str = "cpu") -> dict:
    from specq.kernels import triton_wq

    k, n = 1024, 40
    x, b, words, s, w64, group = _quantized_case(fmt, m, k, n, 128, 1000 * fmt + 10 * m + index)
    cfgs = triton_wq._candidates(m, fmt, group, n, k)
    if index >= len(cfgs):  # fewer candidates in this regime: nothing to run
        return {"index": (0.0, 0.0)}
    y = torch.empty(m, n, dtype=torch.bfloat16, device=device)
    triton_wq._dot_matmul(x.to(device), words.to(device), s.to(device), b.to(device), fmt, group, y,
                          config=cfgs[index])
    return {"vs_float64": (_rel(y, x.double() @ w64.T + b.double()), 1.5e-2)}


# W4A4 GEMM (triton_w4a4): every large-M config (both operand orders, SWAP 0/1), per-token and
# per-group activation scales, against float64 from the kernel's own INT4 codes and scales.
W4A4_CONFIG_CASES = [(ag, i) for ag in (0, 32) for i in range(11)]


def run_w4a4_config(ag: int, index: int, device: str = "cpu", m: int = 70, k: int = 256, n: int = 40,
                    n_configs: int = 11) -> dict:
    from specq.formats import activation, int4
    from specq.kernels import triton_w4a4

    gen = torch.Generator().manual_seed(31 * ag + index + m)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen) * 0.05
    b = (torch.randn(n, generator=gen) * 0.1).to(torch.bfloat16)
    p, s = int4.quantize(w.bfloat16(), 128)
    q, sx = activation.quantize_int4(x, ag)
    sx = sx.reshape(m, -1).contiguous().float()
    xd = (q.double().reshape(m, -1, ag or k) * sx.double().reshape(m, -1, 1)).reshape(m, k)
    ref = xd @ int4.dequantize(p, s, torch.float64).T + b.double()
    cfgs = triton_w4a4._candidates(m, 128, ag, n, k)
    cfg = cfgs[index]
    q = triton_w4a4.to_word_order(q).contiguous()
    q, sx, p, s, b = (t.to(device) for t in (q, sx, p, s, b))
    out = torch.empty(m, n, dtype=torch.bfloat16, device=device)
    triton_w4a4.launch_w4a4(cfg, q, sx, p, s, b, out, True, 128, ag)
    return {"vs_float64": (_rel(out, ref), 1.5e-2), "configs": (float(len(cfgs) != n_configs), 0.0)}


# W4A4 GEMM up to 64 rows: every candidate, split along K and not, K a multiple of the K step and not:
# (activation group, config index, M, K). 20 x 40 tiles are too few to fill a GPU, so each shape comes split.
W4A4_SMALL_CASES = [(ag, i, m, k) for ag in (0, 32) for m, k in ((20, 1024), (33, 1152)) for i in range(7)]


def run_w4a4_small(ag: int, index: int, m: int, k: int, device: str = "cpu") -> dict:
    from specq.kernels import triton_w4a4

    cfgs = triton_w4a4._candidates(m, 128, ag, 40, k)
    checks = run_w4a4_config(ag, index, device, m=m, k=k, n=40, n_configs=7)
    checks["some_split"] = (float(sum(c["SPLIT_K"] > 1 for c in cfgs) != 3), 0.0)
    return checks


# W4A4 GEMM with integer scale levels (weights decoded as q * level, one int32 sum over all of K, scaled by
# unit * sx at the end): every large-M config at 16 levels, the small-M ones (split along K, ragged K) too,
# and fewer levels on two: (config index, levels, M, K). Output in fp32: the int32 sum is exact, so the
# kernel must equal float64 to fp32 rounding, not just bf16's.
W4A4_LEVELS_CASES = ([(i, 16, 70, 256) for i in range(11)] + [(i, 16, 33, 1152) for i in range(7)]
                     + [(0, 7, 70, 256), (4, 3, 20, 1024)])


def run_w4a4_levels(index: int, levels: int, m: int, k: int, device: str = "cpu", n: int = 40) -> dict:
    from specq.formats import activation, int4
    from specq.kernels import triton_w4a4

    gen = torch.Generator().manual_seed(97 * index + levels + m)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen) * 0.05 * torch.rand(n, k // 128, 1, generator=gen).repeat_interleave(
        128, 2).reshape(n, k)  # group scales that differ along a row
    b = torch.randn(n, generator=gen) * 0.1
    p, s = int4.quantize(w.bfloat16(), 128)
    lv, unit = int4.snap_scales(s, levels)
    q, sx = activation.quantize_int4(x, 0)
    sx = sx.reshape(m, 1).contiguous().float()
    ref = (q.double() * sx.double()) @ int4.dequantize(p, int4.snapped_scales(s, levels).double()).T + b.double()
    cfgs = triton_w4a4._candidates(m, 128, 0, n, k)
    q = triton_w4a4.to_word_order(q).contiguous()
    q, sx, p, lv, unit, b = (t.to(device) for t in (q, sx, p, lv, unit, b))
    out = torch.empty(m, n, dtype=torch.float32, device=device)
    triton_w4a4.launch_w4a4(cfgs[index], q, sx, p, lv, b, out, True, 128, 0, units=unit)
    return {"vs_float64": (_rel(out, ref), 2e-6), "levels_used": (float(int(lv.max()) != levels), 0.0)}


# Decode attention (triton_attention): (B, Hq, Hkv, q, D, L, valid lengths per row of the batch or
# None for no mask). Masks are causal up to each row's length, so whole blocks are skipped.
ATTENTION_CASES = [(1, 4, 1, 1, 32, 100, [37]), (2, 6, 2, 3, 16, 70, [10, 64]), (1, 8, 2, 5, 64, 130, [129]),
                   (1, 9, 3, 1, 64, 200, None), (3, 4, 4, 2, 32, 40, [2, 40, 17])]


def attention_inputs(case, device: str = "cpu", dtype=torch.bfloat16):
    b, hq, hkv, q, d, length, valid = case
    gen = torch.Generator().manual_seed(b * 1000 + hq * 10 + q)
    qt = torch.randn(b, hq, q, d, generator=gen).to(dtype)
    kt = torch.randn(b, hkv, length, d, generator=gen).to(dtype)
    vt = torch.randn(b, hkv, length, d, generator=gen).to(dtype)
    mask = None
    if valid is not None:
        pos = torch.arange(length)
        mask = torch.stack([pos[None, :] <= (n - q + torch.arange(q))[:, None] for n in valid])[:, None]
    return [t.to(device) if t is not None else None for t in (qt, kt, vt, mask)]


def attention_float64(query, key, value, mask, scale):
    groups = query.shape[1] // key.shape[1]
    k = key.double().repeat_interleave(groups, 1)
    v = value.double().repeat_interleave(groups, 1)
    s = (query.double() @ k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(1, 2)


def run_attention(*case, device: str = "cpu") -> dict:
    from specq.kernels import triton_attention

    q, k, v, mask = attention_inputs(case, device)
    scale = q.shape[-1] ** -0.5
    y = triton_attention.decode_attention(q, k, v, mask, scale)
    ref = attention_float64(q.cpu(), k.cpu(), v.cpu(), None if mask is None else mask.cpu(), scale)
    left = sum(int(c.count_nonzero()) for c in triton_attention._COUNTERS.values())
    return {"vs_float64": (_rel(y.cpu(), ref), 1.5e-2),
            "shape": (float(tuple(y.shape) != (q.shape[0], q.shape[2], q.shape[1], q.shape[3])), 0.0),
            "counters_left_zeroed": (float(left), 0.0)}


def run_attention_separate(*case, device: str = "cpu") -> dict:
    """The two-kernel form (separate combine kernel), as used while a CUDA graph is captured first."""
    from specq.kernels import triton_attention

    saved, triton_attention.FUSED_COMBINE = triton_attention.FUSED_COMBINE, False
    try:
        return run_attention(*case, device=device)
    finally:
        triton_attention.FUSED_COMBINE = saved


# Activation pre-kernel (triton_act): the whole-row kernel (one launch, the default where a row fits) against
# the chunked two-pass kernels (the path for longer rows), bit for bit, and both against the reference codes:
# (M, K, activation group, Hadamard block, dtype)
ACT_PATH_CASES = [(3, 256, 0, 128, "bfloat16"), (5, 4096, 0, 128, "bfloat16"), (2, 192, 0, 12, "float16"),
                  (17, 256, 32, 32, "bfloat16"), (4, 1152, 0, 64, "bfloat16"), (4, 200, 0, 0, "float32"),
                  (3, 640, 32, 128, "bfloat16"), (2, 14336, 0, 128, "bfloat16")]


def run_act_paths(m: int, k: int, ag: int, hb: int, dtype: str, device: str = "cpu") -> dict:
    from specq.formats import activation
    from specq.kernels import triton_act, triton_w4a4

    gen = torch.Generator().manual_seed(m * 7 + k + ag)
    x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4
    # a row whose scales sit just above activation.MIN_SCALE (2^-120) and one below it (codes 0), where the
    # dtype has the range: the reciprocal's edge, with GPU multiplies flushing subnormals
    x[0] *= 2.0 ** -117
    x[-1] *= 2.0 ** -125 if m > 1 else 1.0
    x = x.to(getattr(torch, dtype)).to(device)
    # every plan: whole rows in one tile, one program per chunk, the looped kernel with several segments per
    # row where the row has them (the default plan is one of these, see test_act_default_plan), and the
    # persistent whole-row kernel at the fewest rows its dot takes, on two programs (the CPU counts as one SM),
    # so that programs walk several row blocks, the last one partial, wherever M allows
    npad = 1 << (-(-k // triton_act._chunk(k, hb, ag)) - 1).bit_length()  # padded chunks per row
    seg = min(4, npad)
    loop_plan = triton_act.LoopPlan(rows=16 // seg, seg=seg, warps=4, stages=2)
    persistent = triton_act.PersistentPlan(rows=max(1, 16 // npad), warps=4, stages=2, programs_per_sm=2)
    plans = ("rows", "chunks", loop_plan, persistent)
    outs = {}
    for plan in plans:
        outs[plan] = triton_act.quantize(x, ag, hb, plan=plan) + (triton_act.fake_quantize(x, ag, hb, plan=plan),)
    rows, chunks, loop, pers = outs["rows"], outs["chunks"], outs[loop_plan], outs[persistent]
    wgmma = triton_act.supported(k, hb, ag, codes=True, order=triton_w4a4.ORDER_WGMMA)
    if wgmma:  # the Gluon GEMM's K order, every plan
        rows128, chunks128, loop128, pers128 = (triton_act.quantize(x, ag, hb, triton_w4a4.ORDER_WGMMA, plan=plan)[0]
                                                for plan in plans)
    xr = (triton_act.rotate(x, hb) if hb > 0 else x).cpu()  # the rotation is checked against float64 elsewhere
    q_ref, _ = activation.quantize_int4(xr, ag)
    diff = (triton_w4a4.from_word_order(rows[0].cpu()).int() - q_ref.int()).abs()
    checks = {"order128": (float(wgmma != (k % 128 == 0 and hb != 12)), 0.0)}
    if wgmma:
        codes = triton_w4a4.from_word_order(rows[0].cpu())
        checks["order128_rows"] = (float(not torch.equal(triton_w4a4.from_wgmma_order(rows128.cpu()), codes)), 0.0)
        checks["order128_chunks"] = (float(not torch.equal(triton_w4a4.from_wgmma_order(chunks128.cpu()), codes)),
                                     0.0)
        checks["order128_loop"] = (float(not torch.equal(triton_w4a4.from_wgmma_order(loop128.cpu()), codes)), 0.0)
        checks["order128_persistent"] = (float(not torch.equal(pers128, rows128)), 0.0)
    return checks | {"codes_equal": (float(not torch.equal(rows[0], chunks[0])), 0.0),
            "scales_equal": (float(not torch.equal(rows[1], chunks[1])), 0.0),
            "fake_equal": (float(not torch.equal(rows[2], chunks[2])), 0.0),
            "loop_equal": (float(not all(torch.equal(a, b) for a, b in zip(rows, loop))), 0.0),
            "persistent_equal": (float(not all(torch.equal(a, b) for a, b in zip(rows, pers))), 0.0),
            "codes_vs_reference_mismatch_frac": (float((diff > 0).float().mean()), max(1e-3, 2.0 / diff.numel())),
            "codes_vs_reference_max_step": (float(diff.max()), 1.0)}


# Activation groups with scale levels (activation.quantize_int4_levels): every plan, against the reference's
# values and units and against each other, bit for bit (M, K, group, Hadamard block, dtype, levels)
ACT_LEVEL_CASES = [(17, 256, 32, 32, "bfloat16", 16), (3, 640, 32, 128, "bfloat16", 16),
                   (5, 4096, 32, 128, "bfloat16", 16), (4, 1152, 64, 64, "float32", 7)]


def run_act_levels(m: int, k: int, ag: int, hb: int, dtype: str, levels: int, device: str = "cpu") -> dict:
    from specq.formats import activation
    from specq.kernels import triton_act, triton_w4a4

    gen = torch.Generator().manual_seed(m + k + levels)
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4).to(getattr(torch, dtype)).to(device)
    xr = (triton_act.rotate(x, hb) if hb > 0 else x).cpu()
    v_ref, t_ref = activation.quantize_int4_levels(xr, ag, levels)
    npad = 1 << (-(-k // triton_act._chunk(k, hb, ag)) - 1).bit_length()
    seg = min(4, npad)
    plans = ("rows", "chunks", triton_act.LoopPlan(rows=16 // seg, seg=seg, warps=4, stages=2),
             triton_act.PersistentPlan(rows=max(1, 16 // npad), warps=4, stages=2, programs_per_sm=2))
    checks = {}
    first = None
    for plan in plans:
        q, t = triton_act.quantize(x, ag, hb, plan=plan, levels=levels)
        q, t = q.cpu(), t.cpu()
        first = first or (q, t)
        name = plan if isinstance(plan, str) else type(plan).__name__
        diff = (triton_w4a4.from_word_order(q).int() - v_ref.int()).abs()
        checks[f"{name}_values_mismatch_frac"] = (float((diff > 0).float().mean()), max(1e-3, 2.0 / diff.numel()))
        checks[f"{name}_units"] = (_rel(t, t_ref), 1e-6)
        checks[f"{name}_equals_rows"] = (float(not (torch.equal(q, first[0]) and torch.equal(t, first[1]))), 0.0)
    return checks


# the families of interpreter checks besides CPU_CASES: (report key prefix, cases, check function)
def _families():
    return [("gemv", GEMV_CONFIG_CASES, run_gemv_config), ("gemv_strided", GEMV_STRIDE_CASES, run_gemv_strided),
            ("mma_gemv", MMA_GEMV_CASES, run_mma_gemv),
            ("mma_gemv_scales", MMA_GEMV_SCALE_CASES, run_mma_gemv_scale_range),
            ("act_levels", ACT_LEVEL_CASES, run_act_levels),
            ("dense", DENSE_CONFIG_CASES, run_dense_config), ("act_paths", ACT_PATH_CASES, run_act_paths),
            ("w4a4", W4A4_CONFIG_CASES, run_w4a4_config), ("w4a4_small", W4A4_SMALL_CASES, run_w4a4_small),
            ("w4a4_levels", W4A4_LEVELS_CASES, run_w4a4_levels),
            ("attention", ATTENTION_CASES, run_attention),
            ("attention_separate", ATTENTION_CASES[:3], run_attention_separate),
            ("wq", WQ_CONFIG_CASES, run_wq_config)]


def _worker() -> None:
    """Runs in the subprocess, with TRITON_INTERPRET=1 set before anything imports triton."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "the worker must run with TRITON_INTERPRET=1"
    sys.path.insert(0, ROOT)
    torch.set_num_threads(1)
    jobs = [(case[0], lambda case=case: run_case(case, "cpu", use_ops=False)) for case in CPU_CASES]
    jobs += [(f"{prefix}{case}", lambda fn=fn, case=case: fn(*case)) for prefix, cases, fn in _families()
             for case in cases]
    report = {}
    for key, job in jobs:
        try:
            report[key] = {"checks": job()}
        except Exception as e:  # reported per case, so one failure does not hide the others
            import traceback

            report[key] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
    print(json.dumps(report))


def _interpreted_checks(interpreted: dict, key: str) -> None:
    r = interpreted[key]
    assert "error" not in r, f"{key} raised: {r.get('error')}\n{r.get('trace')}"
    _assert_checks(key, r["checks"])


def _assert_checks(name: str, checks: dict) -> None:
    bad = {k: v for k, v in checks.items() if not (v[0] <= v[1])}
    assert not bad, f"{name}: failed checks (value, limit): {bad}; all: {checks}"


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", SPECQ_AUTOTUNE="0", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--interpret-worker"], env=env,
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_interpreted_kernel_matches_reference(interpreted, case):
    _interpreted_checks(interpreted, case[0])


def _family_cases(extra_attention=()):
    out = [(prefix, fn, case) for prefix, cases, fn in _families() for case in cases]
    return out + [("attention", run_attention, case) for case in extra_attention]


def _family_ids(cases):
    return [f"{prefix}:{'_'.join(map(str, case)).replace(' ', '')}" for prefix, _, case in cases]


@pytest.mark.parametrize("prefix,fn,case", _family_cases(), ids=_family_ids(_family_cases()))
def test_interpreted_kernel_families(interpreted, prefix, fn, case):
    """Every GEMV / dense GEMV / large-M W4A4 tile config and the decode-attention cases, interpreted."""
    _interpreted_checks(interpreted, f"{prefix}{case}")


# larger attention shapes on the GPU: the 8B shape at one token and a 5-token verify, a long cache
GPU_FAMILY_CASES = _family_cases([(1, 32, 8, 1, 128, 512, [384]), (2, 32, 8, 5, 128, 512, [140, 500]),
                                  (1, 9, 3, 4, 64, 1024, [1000])])


@pytest.mark.gpu
@pytest.mark.parametrize("prefix,fn,case", GPU_FAMILY_CASES, ids=_family_ids(GPU_FAMILY_CASES))
def test_gpu_kernel_families(prefix, fn, case):
    import specq.kernels.ops  # noqa: F401

    _assert_checks(f"{prefix}{case}", fn(*case, device="cuda"))


@pytest.mark.gpu
def test_gpu_dense_gemv_op_and_graph_capture():
    """torch.ops.specq.linear_dense on CUDA: after an eager call (which times the GEMV against
    F.linear), a captured call replays with new inputs and equals the eager result; [B, T, K] inputs
    keep their leading dims; M > 4 is F.linear."""
    import specq.kernels.ops  # noqa: F401

    w = torch.randn(1000, 2048, device="cuda", dtype=torch.bfloat16) * 0.05
    b = torch.randn(1000, device="cuda", dtype=torch.bfloat16)
    for shape in ((1, 1, 2048), (2, 2, 2048), (7, 2048)):
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        eager = torch.ops.specq.linear_dense(x, w, b)
        assert eager.shape == (*shape[:-1], 1000)
        assert _rel(eager, x.double() @ w.double().T + b.double()) < 1.5e-2
        _assert_replay_equals_eager(lambda t: torch.ops.specq.linear_dense(t, w, b), x)


@pytest.mark.gpu
@pytest.mark.parametrize("counters_first", [True, False])
def test_gpu_decode_attention_graph_replay(counters_first):
    """The fused combine under CUDA graphs (captured on a side stream, as torch.cuda.graph does): captured
    after an eager call (counters exist: the one-kernel form) or before any (the separate combine
    kernel, the same code), replays equal the eager result on new values, many times in a row (the
    counters are left zeroed)."""
    from specq.kernels import attention_op, triton_attention

    q, k, v, mask = attention_inputs((2, 32, 8, 1, 128, 512, [140, 500]), "cuda")
    fn = lambda t: attention_op.decode_attention_op(t, k, v, mask, 128 ** -0.5)  # noqa: E731
    if counters_first:
        fn(q)
    else:
        triton_attention._COUNTERS.clear()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(q)
    for _ in range(3):
        q.copy_(torch.randn_like(q))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, fn(q))
    assert all(int(c.count_nonzero()) == 0 for c in triton_attention._COUNTERS.values())


def _assert_replay_equals_eager(fn, x: torch.Tensor) -> None:
    """fn captured in a CUDA graph on x (after an eager call, which tunes), replayed on new values
    copied into x, equals fn on those values run eagerly."""
    fn(x)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(x)
    x2 = torch.randn_like(x)
    x.copy_(x2)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fn(x2))


@pytest.mark.gpu
def test_triton_kernels_registered_for_cuda():
    from specq.kernels import ops  # noqa: F401  (imports triton_backend on CUDA machines)

    for op in ("linear_mxfp4", "linear_w4a16", "linear_w4a4", "linear_dense", "decode_attention"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"specq::{op}", "CUDA"), op


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_kernel_matches_float64(case):
    import specq.kernels.ops  # noqa: F401

    _assert_checks(case[0], run_case(case, "cuda", use_ops=True))


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_3d_input():
    """Decode runs inside CUDA graphs: a captured call (after an eager warm-up that tunes) replays
    with new inputs and gives the eager result; [B, T, K] inputs keep their leading dims."""
    from specq.formats import int4

    import specq.kernels.ops  # noqa: F401

    w = torch.randn(520, 1024, device="cuda") * 0.05
    p, s = int4.quantize(w.bfloat16(), 128)
    x = torch.randn(2, 3, 1024, device="cuda", dtype=torch.bfloat16)
    fns = [lambda t: torch.ops.specq.linear_w4a16(t, p, s, None, 128, 128),
           lambda t: torch.ops.specq.linear_w4a4(t, p, s, None, 128, 0, 128),
           lambda t: torch.ops.specq.linear_w4a4(t, p, s, None, 128, 32, 0)]
    for fn in fns:
        assert fn(x).shape == (2, 3, 520)
        _assert_replay_equals_eager(fn, x)


if __name__ == "__main__" and "--interpret-worker" in sys.argv:
    _worker()


def test_streaming_path_choice_by_rows_dtype_and_group():
    """"auto" in wq_matmul: one row -> CUDA-core GEMV; 2..16 bf16 rows -> tensor-core GEMV (MXFP4, INT4 groups
    of 128 * n); fp16 or other groups -> CUDA-core GEMV up to 4 rows; anything larger -> the tiled kernel."""
    pytest.importorskip("triton")
    from specq.kernels import triton_wq

    def path(m, dtype=torch.bfloat16, fmt=triton_wq.FORMAT_INT4, group=128, k=256):
        return triton_wq._streaming_path(torch.zeros(m, k, dtype=dtype), fmt, group)

    if "SPECQ_MMA_MAX_M" in os.environ:
        pytest.skip("SPECQ_MMA_MAX_M overrides the routing under test")
    assert triton_wq.MMA_MIN_M == 2 and triton_wq.MMA_MAX_M == 16  # the H100 measurements' choice
    assert path(1) == "gemv" and path(1, fmt=triton_wq.FORMAT_MXFP4, group=32) == "gemv"
    assert [path(m) for m in (2, 5, 16)] == ["mma"] * 3
    assert path(8, fmt=triton_wq.FORMAT_MXFP4, group=32) == "mma"
    assert path(17) is None
    assert path(3, dtype=torch.float16) == "gemv" and path(5, dtype=torch.float16) is None
    assert path(3, group=64) == "gemv" and path(8, group=64) is None  # INT4 groups under 128: no mma
    assert path(4, dtype=torch.float32) is None


def test_act_default_plan_follows_the_h100_measurements():
    """The activation pre-kernel's launch per shape (triton_act._default_plan, benchmarks/results/
    act_lab_h100.md, act_persist_h100.md): short rows (<= 64 chunks) take one row per program in one segment
    below 256 rows and the persistent whole-row kernel from there (the whole-row one where its two-row blocks
    don't fit); long rows (<= 128 chunks) one whole row per block from 256 rows on per token, and from 256 to
    511 rows with activation groups (act_recip_h100.md); other long rows take the per-chunk kernel below 512
    rows and the looped kernel from there. Every
    plan gives the same bits (run_act_paths checks them against each other)."""
    pytest.importorskip("triton")
    from specq.kernels import triton_act as a

    one_row = a.LoopPlan(rows=1, seg=32, warps=4, stages=2)
    assert [a._default_plan(m, 4096, 128, 0) for m in (1, 16, 255)] == [one_row] * 3
    assert [a._default_plan(m, 4096, 128, 0) for m in (256, 1024)] == [a.WHOLE_ROWS_PLAN] * 2
    assert a._default_plan(4, 8192, 128, 32) == a.LoopPlan(rows=1, seg=64, warps=4, stages=2)
    assert a._default_plan(4, 256, 128, 0) == "rows"  # two chunks: too few tile rows for a segment's dot
    assert a._default_plan(512, 256, 128, 0) == "rows"  # nor for a two-row block
    assert [a._default_plan(m, 14336, 128, 0) for m in (1, 16, 255)] == ["chunks"] * 3
    assert [a._default_plan(m, 14336, 128, 0) for m in (256, 1024)] == [a.LONG_WHOLE_ROWS_PLAN] * 2
    assert [a._default_plan(m, 14336, 128, 32) for m in (1, 16, 255)] == ["chunks"] * 3
    assert [a._default_plan(m, 14336, 128, 32) for m in (256, 511)] == [a.LONG_GROUPED_ROWS_PLAN] * 2
    assert [a._default_plan(m, 14336, 128, 32) for m in (512, 1024)] == [a.LONG_ROWS_PLAN] * 2
    assert a._default_plan(1024, 32768, 128, 0) == a.LONG_ROWS_PLAN  # 256 chunks: no whole-row tile
    x = torch.zeros(2, 256)
    with pytest.raises(ValueError, match="rows \\* seg must be >= 16"):
        a.quantize(x, 0, 128, plan=a.LoopPlan(rows=1, seg=2))
    with pytest.raises(ValueError, match="do not fit one program's tile"):  # 256 chunks a row
        a.quantize(torch.zeros(2, 32768), 0, 128, plan="rows")
    with pytest.raises(ValueError, match="do not fit one program's tile"):  # 4 rows of 128 (padded) chunks
        a.quantize(torch.zeros(2, 14336), 0, 128, plan=a.PersistentPlan(rows=4, warps=4, stages=2, programs_per_sm=1))
    with pytest.raises(ValueError, match="fewer than the 16 tile rows"):  # 2 chunks a row: 8 rows at least
        a.quantize(torch.zeros(2, 256), 0, 128, plan=a.PersistentPlan(rows=4, warps=4, stages=2, programs_per_sm=1))


def test_mma_gemv_rejects_what_it_cannot_run_with_a_clear_error():
    pytest.importorskip("triton")
    from specq.kernels import triton_mma_gemv, triton_wq

    words = torch.zeros(16, 32, dtype=torch.int32)
    scales = torch.ones(16, 2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bf16 x with 1..16 rows"):
        triton_mma_gemv.gemv(torch.zeros(2, 256, dtype=torch.float16), words, scales, None, 1, 128)
    with pytest.raises(ValueError, match="multiple of 128"):
        triton_mma_gemv.gemv(torch.zeros(2, 256, dtype=torch.bfloat16), words, scales, None, 1, 64)
    with pytest.raises(ValueError, match="MMA GEMV path needs bf16"):
        triton_wq.wq_matmul(torch.zeros(2, 256, dtype=torch.float16), words, scales, None, 1, 128, path="mma")


def test_w4a4_word_order_matches_the_weight_decode_and_inverts():
    from specq.kernels import triton_act, triton_w4a4

    q = torch.arange(16).reshape(1, 16)
    assert triton_w4a4.to_word_order(q).tolist() == [[0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]]
    x = torch.randint(-8, 8, (3, 5, 24), dtype=torch.int8)
    assert torch.equal(triton_w4a4.from_word_order(triton_w4a4.to_word_order(x)), x)
    # the Gluon kernel's order: in each block of 128, position 32s + 16h + 4t + b holds code 8(4t + s) + 2b + h
    q = torch.arange(256).reshape(1, 256)
    g = triton_w4a4.to_wgmma_order(q)
    for c in range(2):
        for s_, h, t, b in itertools.product(range(4), range(2), range(4), range(4)):
            assert g[0, 128 * c + 32 * s_ + 16 * h + 4 * t + b] == 128 * c + 8 * (4 * t + s_) + 2 * b + h
    y = torch.randint(-8, 8, (3, 2, 384), dtype=torch.int8)
    assert torch.equal(triton_w4a4.from_wgmma_order(triton_w4a4.to_wgmma_order(y)), y)
    assert torch.equal(triton_w4a4.from_k_order(triton_w4a4.to_k_order(y, 8), 8), y)
    # the pre-kernel permutes whole blocks of 8 inside its chunks: K = 36 (Hadamard 12) cannot be ordered
    assert triton_act.supported(36, 12, 0) and not triton_act.supported(36, 12, 0, codes=True)
    with pytest.raises(ValueError, match="blocks of 8"):
        triton_act.quantize(torch.zeros(2, 36), 0, 12)
