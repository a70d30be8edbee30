"""The specq ops against dequantize-then-matmul in float64, plus opcheck, compile, export, grads, errors."""

from __future__ import annotations

import math

import pytest
import torch

from specq.formats import hadamard, int4, mxfp4
from specq.formats.activation import fake_quantize_int4
from specq.kernels import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
SHAPES = [(64, 128), (96, 64), (48, 576)]  # (N, K); K = 576 with 64-blocks is the default model's width


def _weights(n, k, dtype, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype)
    return w, bias


def _x(shape, k, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, k, generator=g).to(dtype)


def _assert_close(got, want64, bound64, dtype):
    """|got - want| <= c * eps(dtype) * (|x| @ |W|.T + |b|), the rounding bound of a dtype GEMM."""
    assert got.dtype == dtype and got.shape == want64.shape
    err = (got.double() - want64).abs()
    tol = 16 * EPS[dtype] * bound64 + 1e-30
    assert bool((err <= tol).all()), f"max err {err.max().item():.3g}, worst ratio {(err / tol).max().item():.3g}"


def _rotate64(x64, had_block):
    if had_block == 0:
        return x64
    k = x64.shape[-1]
    big = torch.block_diag(*[hadamard.hadamard_matrix(had_block)] * (k // had_block))
    return x64 @ big


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k", SHAPES)
def test_linear_mxfp4_matches_float64(n, k, dtype):
    w, bias = _weights(n, k, dtype, 32)
    packed, scales = mxfp4.quantize(w)
    w64 = mxfp4.dequantize(packed, scales, torch.float64)
    for shape, b in [((3, 5), bias), ((7,), None), ((), bias)]:
        x = _x(shape, k, dtype)
        got = ops.linear_mxfp4(x, packed, scales, b)
        x64 = x.double()
        want = x64 @ w64.T + (0 if b is None else b.double())
        bound = x64.abs() @ w64.abs().T + (0 if b is None else b.double().abs())
        _assert_close(got, want, bound, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("had_block", [0, 64])
def test_linear_w4a16_matches_float64(n, k, dtype, had_block):
    group_size = 32 if k % 128 else 128
    w, bias = _weights(n, k, dtype, group_size)
    packed, scales = int4.quantize(w.to(dtype), group_size)
    w64 = int4.dequantize(packed, scales, torch.float64)
    x = _x((2, 3), k, dtype)
    got = ops.linear_w4a16(x, packed, scales, bias, had_block=had_block)
    xr = _rotate64(x.double(), had_block)
    want = xr @ w64.T + bias.double()
    bound = xr.abs() @ w64.abs().T + bias.double().abs()
    if had_block:  # the rotation itself is rounded to dtype before the GEMM
        bound = bound + (x.double().abs().max(-1, keepdim=True).values * math.sqrt(k)) * w64.abs().sum(1)
    _assert_close(got, want, bound, dtype)
    # explicit group_size gives the same as the inferred one
    assert torch.equal(got, ops.linear_w4a16(x, packed, scales, bias, group_size=group_size, had_block=had_block))


def _grid_activations(shape, k, had_block, dtype, seed=2):
    """x whose rotation is exactly on the INT4 grid of its own per-token scale, so activation
    quantization is lossless and rounding noise cannot flip a code: x = H^T z, z = ints * 2**-3."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(-6, 7, (*shape, k), generator=g).double() * 0.125
    z[..., 0] = 7 * 0.125  # amax of every token
    if had_block == 0:
        return z.to(dtype), z
    big = torch.block_diag(*[hadamard.hadamard_matrix(had_block)] * (k // had_block))
    x = z @ big.T  # so that H(x) = x @ big = z
    return x.to(dtype), z


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("had_block", [0, 64])
def test_linear_w4a4_matches_float64_on_grid(n, k, dtype, had_block):
    w, bias = _weights(n, k, dtype, 32)
    packed, scales = int4.quantize(w.to(dtype), 32)
    w64 = int4.dequantize(packed, scales, torch.float64)
    x, z = _grid_activations((2, 3), k, had_block, dtype)
    got = ops.linear_w4a4(x, packed, scales, bias, act_group_size=0, had_block=had_block)
    want = z @ w64.T + bias.double()  # Q(H(x)) = z exactly
    bound = z.abs() @ w64.abs().T + bias.double().abs()
    _assert_close(got, want, bound, dtype)


@pytest.mark.parametrize("act_group_size", [0, 32])
def test_linear_w4a4_lossy_activations_match_float64(act_group_size):
    """Off the grid: the float64 reference quantizes the activation itself (per token / per group)."""
    n, k = 64, 128
    w, bias = _weights(n, k, torch.float32, 32)
    packed, scales = int4.quantize(w, 32)
    w64 = int4.dequantize(packed, scales, torch.float64)
    x = _x((4, 3), k, torch.float32)
    got = ops.linear_w4a4(x, packed, scales, bias, act_group_size=act_group_size)
    xg = x.double().reshape(4, 3, -1, act_group_size or k)
    s = xg.abs().amax(-1, keepdim=True) / 7
    xq = (torch.round(xg / s).clamp(-8, 7) * s).reshape(4, 3, k)
    want = xq @ w64.T + bias.double()
    _assert_close(got, want, xq.abs() @ w64.abs().T + bias.double().abs(), torch.float32)
    # and the activation quantization really happened (w4a16 differs)
    assert not torch.allclose(got, ops.linear_w4a16(x, packed, scales, bias), atol=1e-3)


def test_zero_tokens():
    packed, scales = mxfp4.quantize(torch.randn(16, 64))
    assert ops.linear_mxfp4(torch.zeros(0, 64), packed, scales).shape == (0, 16)
    p4, s4 = int4.quantize(torch.randn(16, 64), 32)
    assert ops.linear_w4a4(torch.zeros(2, 0, 64), p4, s4, had_block=64).shape == (2, 0, 16)


# ------------------------------------------------------------------ torch.library integration

@pytest.fixture(scope="module")
def packed_weights():
    w = torch.randn(32, 128) * 0.1
    return mxfp4.quantize(w), int4.quantize(w, 32), torch.randn(32)


def _op_cases(packed_weights, dtype, requires_grad):
    (p, s), (P, S), b = packed_weights
    x = torch.randn(2, 3, 128).to(dtype).requires_grad_(requires_grad)
    b = b.to(dtype)
    return [
        (torch.ops.specq.linear_mxfp4.default, (x, p, s, b)),
        (torch.ops.specq.linear_w4a16.default, (x, P, S.to(dtype), b, 32, 64)),
        (torch.ops.specq.linear_w4a4.default, (x, P, S.to(dtype), None, 32, 32, 64)),
    ]


@pytest.mark.parametrize("dtype, requires_grad", [(torch.float32, False), (torch.bfloat16, False),
                                                  (torch.float32, True)])
def test_opcheck(packed_weights, dtype, requires_grad):
    for op, args in _op_cases(packed_weights, dtype, requires_grad):
        torch.library.opcheck(op, args)


class _ThreeModes(torch.nn.Module):
    def __init__(self, packed_weights):
        super().__init__()
        (p, s), (P, S), b = packed_weights
        for name, t in dict(p=p, s=s, P=P, S=S).items():
            self.register_buffer(name, t)
        self.bias = torch.nn.Parameter(b.clone(), requires_grad=False)

    def forward(self, x):
        a = ops.linear_mxfp4(x, self.p, self.s, self.bias)
        b = ops.linear_w4a16(x, self.P, self.S, self.bias, had_block=64)
        c = ops.linear_w4a4(x, self.P, self.S, None, act_group_size=32, had_block=64)
        return a + 2 * b + 3 * c


def test_compile_fullgraph(packed_weights):
    torch._dynamo.reset()
    m = _ThreeModes(packed_weights)
    counts = {"graphs": 0, "ops": 0}

    def backend(gm, example_inputs):  # dynamo's graph: one node per op, no graph breaks
        counts["graphs"] += 1
        counts["ops"] += sum(1 for nd in gm.graph.nodes if "specq" in str(nd.target))
        return gm.forward

    x = torch.randn(2, 5, 128)
    compiled = torch.compile(m, backend=backend, fullgraph=True)
    assert torch.equal(compiled(x), m(x))
    assert counts == {"graphs": 1, "ops": 3}
    aot = torch.compile(m, backend="aot_eager", fullgraph=True)  # fake impls, functionalization
    assert torch.allclose(aot(x), m(x), atol=1e-6)


def test_export_with_dynamic_tokens(packed_weights):
    m = _ThreeModes(packed_weights)
    seq = torch.export.Dim("seq", max=512)
    ep = torch.export.export(m, (torch.randn(2, 5, 128),), dynamic_shapes={"x": {1: seq}})
    targets = [str(nd.target) for nd in ep.graph.nodes if nd.op == "call_function"]
    assert sum("specq.linear" in t for t in targets) == 3
    x = torch.randn(2, 9, 128)
    assert torch.allclose(ep.module()(x), m(x), atol=1e-6)


def test_gradients_flow_to_x(packed_weights):
    (p, s), (P, S), b = packed_weights
    x = torch.randn(3, 128, dtype=torch.float64)
    w_mx = mxfp4.dequantize(p, s, torch.float64)
    w_i4 = int4.dequantize(P, S, torch.float64)
    h = torch.block_diag(*[hadamard.hadamard_matrix(64)] * 2)
    g = torch.randn(3, 32, dtype=torch.float64)
    for f, w_eff in [(lambda t: ops.linear_mxfp4(t.float(), p, s), w_mx),
                     (lambda t: ops.linear_w4a16(t.float(), P, S, had_block=64), w_i4 @ h.T),
                     # straight-through estimator: the activation quantizer counts as identity
                     (lambda t: ops.linear_w4a4(t.float(), P, S, act_group_size=32, had_block=64), w_i4 @ h.T)]:
        xr = x.clone().requires_grad_()
        f(xr).double().backward(g)
        assert torch.allclose(xr.grad, g @ w_eff, atol=1e-4)
    bias = b.clone().requires_grad_()
    ops.linear_w4a16(x.float(), P, S, bias, had_block=64).double().backward(g)
    assert torch.allclose(bias.grad.double(), g.sum(0), atol=1e-5)


# ------------------------------------------------------------------ bad input

def _good():
    w = torch.randn(16, 64)
    (p, s), (P, S) = mxfp4.quantize(w), int4.quantize(w, 32)
    return torch.randn(2, 64), p, s, P, S


def test_mxfp4_bad_input():
    x, p, s, _, _ = _good()
    cases = [
        (lambda: ops.linear_mxfp4(x.int(), p, s), TypeError, "x must be float32, bfloat16 or float16"),
        (lambda: ops.linear_mxfp4(x.double(), p, s), TypeError, "x must be float32"),
        (lambda: ops.linear_mxfp4(x[:, :32], p, s), ValueError, r"x.shape\[-1\] \(32\) must equal the weight's K \(64\)"),
        (lambda: ops.linear_mxfp4(x, p.int(), s), TypeError, "packed must be torch.uint8"),
        (lambda: ops.linear_mxfp4(x, p, s.float()), TypeError, "scales must be torch.uint8"),
        (lambda: ops.linear_mxfp4(x, p.reshape(-1), s), ValueError, "packed must be 2-D"),
        (lambda: ops.linear_mxfp4(x, p[:, :0], s[:, :0]), ValueError, "packed is empty"),
        (lambda: ops.linear_mxfp4(x[:, :48], p[:, :24], s), ValueError, "must be a multiple of 32"),
        (lambda: ops.linear_mxfp4(x, p, s[:, :1]), ValueError, r"scales must have shape \[N, K/32\] = \[16, 2\]"),
        (lambda: ops.linear_mxfp4(x, p, s, torch.zeros(8)), ValueError, r"bias must be 1-D \[N\] = \[16\]"),
        (lambda: ops.linear_mxfp4(x, p, s, torch.zeros(16, dtype=torch.bfloat16)), TypeError, "bias dtype"),
        (lambda: ops.linear_mxfp4(x.to("meta"), p, s), ValueError, "one device"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


def test_int4_bad_input():
    x, _, _, P, S = _good()
    cases = [
        (lambda: ops.linear_w4a16(x, P.to(torch.uint8), S), TypeError, "packed must be torch.int32"),
        (lambda: ops.linear_w4a16(x, P, S.int()), TypeError, "scales must be a floating-point"),
        (lambda: ops.linear_w4a16(x, P, S, group_size=48), ValueError, r"group_size \(48\) must be positive and divide K \(64\)"),
        (lambda: ops.linear_w4a16(x, P, S, group_size=16), ValueError, r"scales must have shape \[N, K/group_size\] = \[16, 4\]"),
        (lambda: ops.linear_w4a16(x, P, S, had_block=48), ValueError, r"had_block \(48\) must divide K \(64\)"),
        (lambda: ops.linear_w4a16(torch.randn(2, 56 * 2), int4.quantize(torch.randn(4, 112), 56)[0],
                                  int4.quantize(torch.randn(4, 112), 56)[1], had_block=56),
         ValueError, "no Hadamard matrix of order had_block=56"),
        (lambda: ops.linear_w4a16(x, P, S, had_block=-1), ValueError, "had_block must be >= 0"),
        (lambda: ops.linear_w4a4(x, P, S, act_group_size=48), ValueError, r"act_group_size \(48\) must be 0"),
        (lambda: ops.linear_w4a4(x[:, :32], P, S), ValueError, "must equal the weight's K"),
        (lambda: ops.linear_w4a16(x, P[:0], S[:0]), ValueError, "packed is empty"),
        (lambda: ops.linear_w4a16(x, P.reshape(-1), S), ValueError, "both must be 2-D"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


def test_errors_also_raised_at_trace_time():
    x, p, s, _, _ = _good()
    x_short = x[:, :32].contiguous()
    mode = torch._subclasses.fake_tensor.FakeTensorMode()
    fx, fp, fs = (mode.from_tensor(t) for t in (x_short, p, s))
    with mode, pytest.raises(ValueError, match="must equal the weight's K"):
        ops.linear_mxfp4(fx, fp, fs)
