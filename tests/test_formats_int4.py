"""INT4 (compressed-tensors pack-quantized layout): hand-written words, pack order, an independent
numpy reference for the codes, error bounds, the optional clip search, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from specq.formats import int4

# ------------------------------------------------------------------ hand-written words (docs/formats.md)

DOC_ROW = [1.75, -1.75, 0.5, 0.125, -0.375, 0.0, 0.25, -1.0,    # group 0: amax 1.75 -> scale 0.25
           3.5, -3.5, 0.25, 0.75, -0.25, 1.0, -2.0, 3.0]        # group 1: amax 3.5  -> scale 0.5
DOC_Q = [7, -7, 2, 0, -2, 0, 1, -4, 7, -7, 0, 2, 0, 2, -4, 6]      # ties: 0.5->0, -1.5->-2, 1.5->2, -0.5->0
DOC_WORDS = [0x49868A1F, 0xE4A8A81F]                               # (q + 8) nibbles, element 0 lowest
DOC_SCALES = [0.25, 0.5]


def _as_u32(words: torch.Tensor) -> list[int]:
    return [v & 0xFFFFFFFF for v in words.reshape(-1).tolist()]


def test_hand_written_words():
    packed, scales = int4.quantize(torch.tensor([DOC_ROW]), group_size=8)
    assert packed.dtype == torch.int32 and packed.shape == (1, 2)
    assert _as_u32(packed) == DOC_WORDS
    assert packed.tolist() == [[1233553951, -458708961]]  # the same words as signed int32
    assert scales.dtype == torch.float32 and scales.tolist() == [DOC_SCALES]
    assert int4.unpack(packed).tolist() == [DOC_Q]
    want = [q * DOC_SCALES[i // 8] for i, q in enumerate(DOC_Q)]
    assert int4.dequantize(packed, scales)[0].tolist() == want
    # little-endian bytes of the words: byte b holds element 2b (low nibble) and 2b+1 (high nibble)
    assert packed.view(torch.uint8)[0, :4].tolist() == [0x1F, 0x8A, 0x86, 0x49]


def test_pack_order_and_sign_wrap():
    q = torch.tensor([[-8, -7, -6, -5, -4, -3, -2, -1], [0, 1, 2, 3, 4, 5, 6, 7]])
    words = int4.pack(q)
    assert _as_u32(words) == [0x76543210, 0xFEDCBA98]
    assert words[1, 0].item() < 0  # stored as a two's-complement int32
    assert torch.equal(int4.unpack(words), q.to(torch.int8))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(hnp.arrays(np.int8, st.tuples(st.integers(1, 4), st.sampled_from([8, 16, 64])), elements=st.integers(-8, 7)))
def test_pack_unpack_round_trip(q):
    qt = torch.from_numpy(q)
    packed = int4.pack(qt)
    assert packed.shape == (q.shape[0], q.shape[1] // 8)
    assert torch.equal(int4.unpack(packed), qt)
    # the word arithmetic written out independently
    u = (q.astype(np.int64) + 8).reshape(q.shape[0], -1, 8)
    words = (u << (4 * np.arange(8))).sum(-1)
    assert _as_u32(packed) == words.reshape(-1).tolist()


# ------------------------------------------------------------------ reference and bounds

def _check_against_reference(w: torch.Tensor, group_size: int) -> None:
    packed, scales = int4.quantize(w, group_size)
    assert scales.dtype == w.dtype and scales.shape == (w.shape[0], w.shape[1] // group_size)
    n, k = w.shape
    wd = w.double().numpy().reshape(n, k // group_size, group_size)
    s = scales.double().numpy()
    amax = np.abs(wd).max(-1)
    # the stored scale is amax / 7 rounded to the weight dtype
    np.testing.assert_array_equal(s, torch.from_numpy(amax / 7).to(w.dtype).double().numpy())
    safe = np.where(s > 0, s, 1.0)[..., None]
    q_ref = np.where(s[..., None] > 0, np.clip(np.rint(wd / safe), -8, 7), 0).reshape(n, k)
    np.testing.assert_array_equal(int4.unpack(packed).numpy(), q_ref)
    # error bound: no clipping, so |w - q * s| <= s / 2 (up to the scale's own rounding)
    deq = int4.dequantize(packed, scales, torch.float64).numpy().reshape(wd.shape)
    # (+ 8 of the dtype's smallest subnormal: a group whose amax / 7 underflows gets scale 0 -> zeros)
    tiny = torch.finfo(w.dtype).smallest_normal * torch.finfo(w.dtype).eps * 8
    assert (np.abs(deq - wd) <= s[..., None] * (0.5 + 1e-6) + tiny).all()
    assert (np.abs(q_ref) <= 7).all()


@settings(max_examples=50, deadline=None, derandomize=True)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.sampled_from([32, 64, 128])),
                  elements=st.floats(-1e6, 1e6, width=32)),
       st.sampled_from([8, 32]))
def test_matches_reference_random(w, group_size):
    _check_against_reference(torch.from_numpy(w), group_size)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.integers(-30, 30), st.integers(0, 2**31 - 1))
def test_matches_reference_adversarial(exp, seed):
    """Exact .5 ties (integers + 0.5 times a power-of-two scale), zeros, single outliers."""
    g = np.random.default_rng(seed)
    q = g.integers(-6, 7, size=(4, 64)) + g.choice([0.0, 0.5, -0.5], size=(4, 64))  # |q| <= 6.5
    q[:, ::16] = 7.0  # each group's amax = 7 * 2**exp, so ties sit at exact .5 multiples
    q[3, 16:32] = 0.0  # an all-zero group
    w = np.ldexp(q, exp).astype(np.float32)
    _check_against_reference(torch.from_numpy(w), 16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights(dtype):
    torch.manual_seed(0)
    w = torch.randn(16, 256).to(dtype)
    _check_against_reference(w, 128)
    packed, scales = int4.quantize(w, 128)
    assert int4.dequantize(packed, scales).dtype == dtype  # default dtype: the scales' dtype
    assert int4.dequantize(packed, scales, torch.float32).dtype == torch.float32


def test_zero_group_is_exact():
    w = torch.zeros(2, 32)
    w[1, 16:] = torch.linspace(-1, 1, 16)
    packed, scales = int4.quantize(w, 16)
    assert scales[0].eq(0).all() and scales[1, 0].item() == 0
    deq = int4.dequantize(packed, scales)
    assert deq[0].eq(0).all() and deq[1, :16].eq(0).all()


def test_clip_search_never_worse_than_plain():
    torch.manual_seed(0)
    w = torch.randn(128, 512)
    w[:, ::97] *= 6  # heavy-tailed groups, where a clipped scale pays off
    p0, s0 = int4.quantize(w, 128)
    p1, s1 = int4.quantize(w, 128, clip_ratio="search")
    e0 = (int4.dequantize(p0, s0) - w).square().reshape(128, 4, 128).sum(-1)
    e1 = (int4.dequantize(p1, s1) - w).square().reshape(128, 4, 128).sum(-1)
    assert (e1 <= e0 * (1 + 1e-6)).all() and e1.sum() < e0.sum()
    pr, sr = int4.quantize(w, 128, clip_ratio=0.9)
    assert torch.allclose(sr, s0 * 0.9, rtol=1e-6)
    assert int4.unpack(pr).min() >= -8 and int4.unpack(pr).max() <= 7


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("w, kwargs, match", [
    (torch.zeros(64), {}, "2-D"),
    (torch.zeros(0, 128), {}, "empty"),
    (torch.zeros(4, 128, dtype=torch.int8), {}, "floating-point"),
    (torch.zeros(4, 96), {"group_size": 64}, "multiple of group_size=64"),
    (torch.zeros(4, 12), {"group_size": 4}, "multiple of 8"),
    (torch.zeros(4, 128), {"group_size": 0}, "positive int"),
    (torch.zeros(4, 128), {"group_size": True}, "positive int"),
    (torch.zeros(4, 128), {"clip_ratio": 1.5}, "clip_ratio"),
    (torch.zeros(4, 128), {"clip_ratio": "max"}, "clip_ratio"),
])
def test_quantize_rejects_bad_input(w, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        int4.quantize(w, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_quantize_rejects_non_finite(bad):
    w = torch.zeros(2, 128)
    w[1, 5] = bad
    with pytest.raises(ValueError, match=r"non-finite value \(first at index \[1, 5\]\)"):
        int4.quantize(w)


def test_dequantize_and_unpack_reject_bad_layout():
    packed = torch.zeros(2, 16, dtype=torch.int32)
    with pytest.raises(TypeError, match="packed must be int32"):
        int4.dequantize(packed.to(torch.uint8), torch.ones(2, 1))
    with pytest.raises(ValueError, match="does not fit packed shape"):
        int4.dequantize(packed, torch.ones(2, 3))
    with pytest.raises(ValueError, match="does not fit packed shape"):
        int4.dequantize(packed, torch.ones(3, 1))
    with pytest.raises(TypeError, match="scales must be a 2-D floating-point"):
        int4.dequantize(packed, torch.ones(2, 1, dtype=torch.int32))
    with pytest.raises(TypeError, match="packed must be int32"):
        int4.unpack(torch.zeros(2, 2, dtype=torch.int64))


@pytest.mark.parametrize("clip_ratio", [None, "search"])
def test_row_chunking_does_not_change_the_result(monkeypatch, clip_ratio):
    w = torch.randn(37, 64, dtype=torch.bfloat16)
    whole = int4.quantize(w, 32, clip_ratio=clip_ratio)
    monkeypatch.setattr(int4, "CHUNK_ELEMENTS", 64 * 4)
    chunked = int4.quantize(w, 32, clip_ratio=clip_ratio)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
