"""Dynamic INT4 activation quantization against a numpy float32 reference (same IEEE operations)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from specq.formats.activation import fake_quantize_int4, quantize_int4


def reference(x: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(q float32 [..., K], scale float32 [..., G]) by the definition: scale = amax / 7 per token or group,
    q = clamp(rint(x * fl(1 / scale)), -8, 7), a scale below 2^-120 taken as 1."""
    k = x.shape[-1]
    g = 1 if group_size == 0 else k // group_size
    xg = x.astype(np.float32).reshape(*x.shape[:-1], g, k // g)
    scale = (np.abs(xg).max(-1, keepdims=True) / np.float32(7)).astype(np.float32)
    inv = np.float32(1) / np.where(scale >= np.float32(2.0 ** -120), scale, np.float32(1))
    q = np.clip(np.rint(xg * inv), -8, 7).astype(np.float32)
    return q.reshape(x.shape), scale[..., 0]


@settings(max_examples=50, deadline=None, derandomize=True)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 4), st.sampled_from([32, 64])),
                  elements=st.floats(-1e4, 1e4, width=32)),
       st.sampled_from([0, 8, 32]))
def test_matches_reference(x, group_size):
    xt = torch.from_numpy(x)
    q, scales = quantize_int4(xt, group_size)
    q_ref, s_ref = reference(x, group_size)
    assert q.dtype == torch.int8 and q.shape == xt.shape
    assert scales.dtype == torch.float32
    assert scales.shape == (*x.shape[:-1], 1 if group_size == 0 else x.shape[-1] // group_size)
    np.testing.assert_array_equal(q.numpy(), q_ref)
    np.testing.assert_array_equal(scales.numpy(), s_ref)
    # reconstruction: within half a step of the original, and fake_quantize is exactly q * scale
    fq = fake_quantize_int4(xt, group_size)
    rep = np.repeat(s_ref, x.shape[-1] // s_ref.shape[-1], axis=-1)
    np.testing.assert_array_equal(fq.numpy(), (q_ref * rep).astype(np.float32))
    # (+ 2**-117: a token whose scale is below 2^-120 reconstructs as zeros)
    assert (np.abs(fq.numpy().astype(np.float64) - x) <= rep.astype(np.float64) * 0.5 * (1 + 1e-6) + 2.0 ** -117).all()


def test_per_token_and_per_group_differ_as_expected():
    x = torch.tensor([[7.0, 1.0, 0.5, 0.25, 0.1, 0.1, 0.1, 0.1]])
    q_tok, s_tok = quantize_int4(x)
    assert s_tok.tolist() == [[1.0]] and q_tok.tolist() == [[7, 1, 0, 0, 0, 0, 0, 0]]
    q_grp, s_grp = quantize_int4(x, group_size=4)
    assert s_grp[0, 1].item() == pytest.approx(0.1 / 7)
    assert q_grp[0, 4:].tolist() == [7, 7, 7, 7]  # the small group keeps its resolution


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dtype_kept(dtype):
    x = torch.randn(2, 5, 64).to(dtype)
    fq = fake_quantize_int4(x, 32)
    assert fq.dtype == dtype and fq.shape == x.shape
    want = fake_quantize_int4(x.float(), 32).to(dtype)  # computed in float32 either way
    assert torch.equal(fq, want)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.floats(-120, 120), st.integers(1, 64), st.integers(0, 2 ** 31 - 1))
def test_unclamped_codes_never_leave_minus_7_to_7(log2_amax, n, seed):
    """The kernels skip the clamp without scale levels (triton_act._code): x * fl(1 / fl(amax / 7)) rounds into
    [-7, 7] for every |x| <= amax, also at amax itself, at the ulps around it and at scales near MIN_SCALE."""
    rng = np.random.default_rng(seed)
    amax = np.float32(2.0 ** log2_amax) * np.float32(1 + rng.random())
    ulps = np.nextafter(amax, np.float32(0)) * np.arange(1, 4, dtype=np.float32) / 3
    x = np.concatenate([[amax, -amax, np.nextafter(amax, np.float32(0))], ulps,
                        (rng.uniform(-1, 1, n) * amax).astype(np.float32)]).astype(np.float32)
    scale = np.float32(amax / np.float32(7))
    inv = np.float32(1) / (scale if scale >= np.float32(2.0 ** -120) else np.float32(1))
    codes = np.rint(x * inv)
    assert np.abs(codes).max() <= 7
    q, _ = quantize_int4(torch.from_numpy(x[None, :]))
    np.testing.assert_array_equal(q.numpy()[0], codes.astype(np.int8))


def test_scales_below_min_scale_reconstruct_as_zeros():
    from specq.formats.activation import MIN_SCALE
    tiny = torch.tensor([[MIN_SCALE * 6.9, MIN_SCALE * 3, 0.0, -MIN_SCALE]])  # amax / 7 just below MIN_SCALE
    normal = torch.tensor([[MIN_SCALE * 7.1, MIN_SCALE * 3, 0.0, -MIN_SCALE]])  # just above: quantized as usual
    q, s = quantize_int4(tiny)
    assert q.eq(0).all() and fake_quantize_int4(tiny).eq(0).all() and 0 < s.item() < MIN_SCALE
    q, _ = quantize_int4(normal)
    assert q.tolist() == [[7, 3, 0, -1]]


def test_zero_tokens_and_empty_batches():
    x = torch.zeros(3, 16)
    x[1] = torch.arange(16.0) - 8
    fq = fake_quantize_int4(x)
    assert fq[0].eq(0).all() and fq[2].eq(0).all()
    q, s = quantize_int4(torch.zeros(0, 16))
    assert q.shape == (0, 16) and s.shape == (0, 1)


def test_nan_and_inf_poison_only_their_token_or_group():
    x = torch.randn(3, 64)
    x[1, 10] = float("nan")
    x[2, 40] = float("inf")
    fq = fake_quantize_int4(x)
    assert not torch.isnan(fq[0]).any()
    assert torch.isnan(fq[1]).all() and torch.isnan(fq[2]).all()
    fg = fake_quantize_int4(x, 32)
    assert torch.isnan(fg[1, :32]).all() and not torch.isnan(fg[1, 32:]).any()
    assert torch.isnan(fg[2, 32:]).all() and not torch.isnan(fg[2, :32]).any()
    _, s = quantize_int4(x)
    assert torch.isnan(s[1]).all() and torch.isinf(s[2]).all()


def test_traces_without_graph_breaks():
    f = torch.compile(lambda t: fake_quantize_int4(t, 16), backend="eager", fullgraph=True)
    x = torch.randn(4, 64)
    assert torch.equal(f(x), fake_quantize_int4(x, 16))


@pytest.mark.parametrize("x, group_size, match", [
    (torch.randn(2, 48), 32, "multiple of group_size=32"),
    (torch.randn(2, 48), -1, "group_size must be an int >= 0"),
    (torch.randint(0, 4, (2, 48)), 0, "floating-point"),
    (torch.tensor(1.0), 0, "scalar"),
])
def test_bad_input(x, group_size, match):
    with pytest.raises((ValueError, TypeError), match=match):
        quantize_int4(x, group_size)
    with pytest.raises((ValueError, TypeError), match=match):
        fake_quantize_int4(x, group_size)
