"""The reference ops' dequantization cache: same numbers as no cache, invalidated by in-place writes."""

import torch

from specq.formats import int4, mxfp4
from specq.kernels import dequant_cache, ops


def _ref(x, packed, scales):
    return x.double() @ mxfp4.dequantize(packed, scales, torch.float64).T


def test_cached_equals_uncached_and_tracks_in_place_writes(monkeypatch):
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    packed, scales = mxfp4.quantize(w)
    x = torch.randn(3, 128)
    first = ops.linear_mxfp4(x, packed, scales, None)
    again = ops.linear_mxfp4(x, packed, scales, None)  # served from the cache
    assert torch.equal(first, again)
    torch.testing.assert_close(first.double(), _ref(x, packed, scales), rtol=1e-5, atol=1e-5)
    # an in-place write (as load_state_dict does) must invalidate the entry
    p2, s2 = mxfp4.quantize(torch.randn(64, 128))
    packed.copy_(p2)
    scales.copy_(s2)
    after = ops.linear_mxfp4(x, packed, scales, None)
    torch.testing.assert_close(after.double(), _ref(x, p2, s2), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("SPECQ_DEQUANT_CACHE", "0")
    assert torch.equal(ops.linear_mxfp4(x, packed, scales, None), after)


def test_entries_are_dropped_with_their_weights():
    dequant_cache.clear()
    packed, scales = int4.quantize(torch.randn(32, 128), group_size=64)
    ops.linear_w4a16(torch.randn(2, 128), packed, scales, None, 64, 0)
    assert len(dequant_cache._entries) == 1
    del packed
    assert len(dequant_cache._entries) == 0
