"""The CPU INT4 kernel (aten int4pack matmul) against float64 math, and when it must not run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from specq.formats import hadamard, int4
from specq.kernels import cpu_int4, dequant_cache, ops

pytestmark = pytest.mark.skipif(not cpu_int4.enabled(), reason="this torch has no CPU int4pack kernel")

EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
# (N, K, INT4 group) of the default model's matmuls: q/o, k/v, gate/up, down (default recipe)
DEFAULT_SHAPES = [(576, 576, 64), (192, 576, 64), (1536, 576, 64), (576, 1536, 128)]


def _quantized(n, k, group_size, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype)
    packed, scales = int4.quantize(w, group_size)
    return packed, scales, bias


def _x(m, k, dtype, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _h(k, had_block):
    if had_block == 0:
        return torch.eye(k, dtype=torch.float64)
    return torch.block_diag(*[hadamard.hadamard_matrix(had_block)] * (k // had_block))


def _tags(packed):
    return {key[1][0] for key in dequant_cache._entries if key[0] == id(packed)}


def _assert_within_gemm_rounding(got, x, w64, bias, had_block, dtype):
    """|got - H(x) W^T - b| <= 16 eps (|H(x)| |W|^T + |b|) + the rounding of H(x) itself."""
    x64 = x.double()
    xr = x64 @ _h(x.shape[-1], had_block)
    want = xr @ w64.T + bias.double()
    bound = xr.abs() @ w64.abs().T + bias.double().abs()
    if had_block:
        bound = bound + x64.abs().amax(-1, keepdim=True) * math.sqrt(x.shape[-1]) * w64.abs().sum(1)
    err = (got.double() - want).abs()
    tol = 16 * EPS[dtype] * bound
    assert got.dtype == dtype and got.shape == want.shape
    assert bool((err <= tol).all()), f"max err {err.max().item():.3g}, worst ratio {(err / tol).max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, k, group_size", DEFAULT_SHAPES)
@pytest.mark.parametrize("m", [1, 5, 37])
def test_w4a16_kernel_matches_float64(n, k, group_size, m, dtype):
    packed, scales, bias = _quantized(n, k, group_size, dtype)
    x = _x(m, k, dtype)
    got = ops.linear_w4a16(x, packed, scales, bias, group_size, 64)
    assert _tags(packed) == {"int4pack_cpu"}  # the kernel ran; no dense copy was made
    _assert_within_gemm_rounding(got, x, int4.dequantize(packed, scales, torch.float64), bias, 64, dtype)
    # leading dims are kept
    got3 = ops.linear_w4a16(x.reshape(1, m, k), packed, scales, bias, group_size, 64)
    assert torch.equal(got3.reshape(m, n), got)


def test_w4a4_kernel_matches_float64():
    n, k, group_size, dtype = 576, 576, 64, torch.bfloat16
    packed, scales, bias = _quantized(n, k, group_size, dtype)
    x = _x(4, k, dtype)
    got = ops.linear_w4a4(x, packed, scales, bias, group_size, 32, 64)
    assert _tags(packed) == {"int4pack_cpu"}
    # float64 reference: rotate, quantize per group of 32 (scale amax/7), multiply
    xr = ops.rotate(x, 64).double()  # the rotation's own rounding is the reference's, in x.dtype
    xg = xr.reshape(4, -1, 32)
    s = xg.abs().amax(-1, keepdim=True) / 7
    xq = (torch.round(xg / s).clamp(-8, 7) * s).reshape(4, k)
    w64 = int4.dequantize(packed, scales, torch.float64)
    want = xq @ w64.T + bias.double()
    # x_hat is rounded to bf16 before the matmul (q * s is not exact in 8 bits): |x_hat| eps per element
    bound = xq.abs() @ w64.abs().T + bias.double().abs()
    err = (got.double() - want).abs()
    assert bool((err <= 32 * EPS[dtype] * bound).all()), f"max err {err.max().item():.3g}"


def _grid_weight(n, k, group_size, seed):
    """INT4 codes with power-of-two scales (2**-4 or 2**-5): every q * scale is exact in bf16/fp16."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), generator=g)
    scales = 2.0 ** -torch.randint(4, 6, (n, k // group_size), generator=g).double()
    return int4.pack(q), scales, (q.double().reshape(n, -1, group_size) * scales.unsqueeze(-1)).reshape(n, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, k, group_size", DEFAULT_SHAPES)
@pytest.mark.parametrize("had_block", [0, 64])
def test_w4a16_kernel_is_exact_on_a_grid(n, k, group_size, had_block, dtype):
    """Inputs on a grid where every product and partial sum is exact in float32: the only rounding
    left is the output's, so the kernel must give float64 math rounded once to x.dtype, bit for bit
    (a wrong scale, zero point or nibble order cannot hide inside a rounding tolerance)."""
    packed, scales64, w64 = _grid_weight(n, k, group_size, seed=3)
    scales = scales64.to(dtype)
    g = torch.Generator().manual_seed(4)
    x = (torch.randint(-8, 9, (7, k), generator=g) * 0.125).to(dtype)
    xr = ops.rotate(x, had_block)  # the rotation both paths share (tested in test_hadamard.py)
    xr64 = xr.double()
    # precondition: x (after rotation) is on a grid of 2**-9 and w on 2**-5, so every product and
    # partial sum is a multiple of 2**-14; bounded by 2**24 of those units, float32 sums them exactly
    # in any order
    assert bool(((xr64 * 2 ** 9).round() == xr64 * 2 ** 9).all())
    assert float((xr64.abs() @ w64.abs().T).max()) * 2 ** 14 < 2 ** 24
    want = (xr64 @ w64.T).float().to(dtype)
    got = ops.linear_w4a16(x, packed, scales, None, group_size, had_block)
    assert _tags(packed) == {"int4pack_cpu"}
    assert torch.equal(got, want)
    # the reference gives the same bits here (it rounds q * scale to dtype, which is exact on this grid)
    assert torch.equal(ops.reference_w4a16(x, packed, scales, None, had_block), want)


def _reference_exact(x, packed, scales, bias, had_block):
    w = int4.dequantize(packed, scales, x.dtype)
    return F.linear(ops.rotate(x, had_block), w, bias)


def test_float32_keeps_the_reference_bit_for_bit():
    packed, scales, bias = _quantized(64, 128, 32, torch.float32)
    x = _x(3, 128, torch.float32)
    got = ops.linear_w4a16(x, packed, scales, bias, 32, 64)
    assert torch.equal(got, _reference_exact(x, packed, scales, bias, 64))
    assert "int4pack_cpu" not in _tags(packed)


@pytest.mark.parametrize("n, k, group_size", [(64, 128, 16), (40, 128, 32)])  # group / N the kernel lacks
def test_uncovered_shapes_fall_back_to_the_reference(n, k, group_size):
    packed, scales, bias = _quantized(n, k, group_size, torch.bfloat16)
    x = _x(2, k, torch.bfloat16)
    got = ops.linear_w4a16(x, packed, scales, bias, group_size, 0)
    assert torch.equal(got, _reference_exact(x, packed, scales, bias, 0))
    assert "int4pack_cpu" not in _tags(packed)


def test_switch_off(monkeypatch):
    packed, scales, bias = _quantized(64, 128, 32, torch.bfloat16)
    x = _x(2, 128, torch.bfloat16)
    on = ops.linear_w4a16(x, packed, scales, bias, 32, 64)
    monkeypatch.setenv("SPECQ_INT4_CPU", "0")
    off = ops.linear_w4a16(x, packed, scales, bias, 32, 64)
    assert torch.equal(off, _reference_exact(x, packed, scales, bias, 64))
    assert not torch.equal(on, off)  # so the first call really was the kernel


def test_repacked_weight_follows_in_place_writes():
    packed, scales, bias = _quantized(64, 128, 32, torch.bfloat16, seed=0)
    x = _x(2, 128, torch.bfloat16)
    ops.linear_w4a16(x, packed, scales, bias, 32, 0)
    p2, s2, _ = _quantized(64, 128, 32, torch.bfloat16, seed=5)
    packed.copy_(p2)
    scales.copy_(s2)
    got = ops.linear_w4a16(x, packed, scales, bias, 32, 0)
    _assert_within_gemm_rounding(got, x, int4.dequantize(p2, s2, torch.float64), bias, 0, torch.bfloat16)


def test_inductor_compiled_call_uses_the_kernel():
    packed, scales, bias = _quantized(192, 576, 64, torch.bfloat16)
    x = _x(5, 576, torch.bfloat16)
    eager = ops.linear_w4a16(x, packed, scales, bias, 64, 64)
    torch._dynamo.reset()
    f = torch.compile(lambda t: ops.linear_w4a16(t, packed, scales, bias, 64, 64) * 2, backend="inductor",
                      fullgraph=True)
    assert torch.equal(f(x), eager * 2)


_COMPILE_AFTER_REGISTER = r"""
import torch
import torch._inductor.config
from specq.formats import int4, mxfp4
from specq.kernels import inductor_cpu, ops
torch._inductor.config.fx_graph_cache = False  # a cached graph would skip the lowering under test
inductor_cpu.register()  # as the compiled CPU steps do, before anything else lowers the ops
g = torch.Generator().manual_seed(0)
w = (torch.randn(64, 256, generator=g) * 0.05).to(torch.bfloat16)
x = torch.randn(3, 256, generator=g).to(torch.bfloat16)
p4, s4 = int4.quantize(w, 64)
pm, sm = mxfp4.quantize(w.float())
for fn in (lambda t: ops.linear_w4a16(t, p4, s4, None, 64, 0) * 2,
           lambda t: ops.linear_mxfp4(t, pm, sm, None) * 2):
    assert torch.equal(torch.compile(fn, backend="inductor", fullgraph=True)(x), fn(x))
print("ok")
"""


def test_inductor_compile_without_freezing_after_register():
    """Once the CPU decompositions are registered (they decline without freezing), a plain inductor
    compile of the ops still works: it used to assert 'both a fallback and a decomp for same op'
    whenever register() ran before the op's first lowering (a fresh process decides that order)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _COMPILE_AFTER_REGISTER], capture_output=True, text=True,
                          timeout=600, cwd=root, env=dict(os.environ, PYTHONPATH=root))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
