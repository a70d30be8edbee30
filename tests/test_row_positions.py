"""Per-row positions in one static cache (specq/runtime/row_positions.py): rows of a batch advance by
different amounts, rejected drafts are overwritten in place, and every row's logits equal a cache-free
HF forward of that row's own sequence (float32, tiny llama; eager and sdpa attention)."""

from __future__ import annotations

import pytest
import torch

from specq.runtime.compiled import make_static_cache
from specq.runtime.row_positions import enable_row_positions, forward_rows, row_mask


def _hf(model, seq):
    with torch.no_grad():
        return model(torch.tensor([seq]), use_cache=False).logits[0]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_rows_advance_independently(impl):
    from tiny_models import make_tiny_model

    model = make_tiny_model("llama", seed=4)
    model.config._attn_implementation = impl
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 256, (2, 6), generator=g)
    cache = make_static_cache(model, 2, 64)
    enable_row_positions(cache, 2)
    seqs = [prompt[0].tolist(), prompt[1].tolist()]
    with torch.no_grad():
        forward_rows(model, cache, prompt, torch.tensor([0, 0]))
        # a 3-token verify block per row; row 0 keeps all 3 tokens, row 1 keeps only the first
        block = torch.randint(3, 256, (2, 3), generator=g)
        got = forward_rows(model, cache, block, torch.tensor([6, 6]))
        for b in range(2):
            want = _hf(model, seqs[b] + block[b].tolist())[6:9]
            torch.testing.assert_close(got[b], want, rtol=0, atol=1e-5)
        seqs[0] += block[0].tolist()
        seqs[1] += block[1, :1].tolist()
        # next block: row 0 at position 9, row 1 at 7 (overwriting its two rejected entries)
        block = torch.randint(3, 256, (2, 2), generator=g)
        got = forward_rows(model, cache, block, torch.tensor([9, 7]))
        for b, p in ((0, 9), (1, 7)):
            want = _hf(model, seqs[b] + block[b].tolist())[p:p + 2]
            torch.testing.assert_close(got[b], want, rtol=0, atol=1e-5)


def test_row_mask_and_refusals():
    m = row_mask(torch.tensor([2, 0]), 2, 5)
    assert m.shape == (2, 1, 2, 5) and m.dtype == torch.bool
    assert m[0, 0, 0].tolist() == [True, True, True, False, False]
    assert m[1, 0, 1].tolist() == [True, True, False, False, False]
    add = row_mask(torch.tensor([0]), 1, 3, torch.float32)
    assert add[0, 0, 0, 0] == 0 and add[0, 0, 0, 1] == torch.finfo(torch.float32).min
    from tiny_models import make_tiny_model

    model = make_tiny_model("llama", seed=4)
    with pytest.raises(ValueError, match="holds 2 rows"):
        enable_row_positions(make_static_cache(model, 2, 16), 3)


def test_rows_under_dynamo_one_graph_for_all_positions():
    """forward_rows traces into one fullgraph (the per-layer update swap included) that serves every
    combination of row positions: same logits as eager, no recompile when positions change."""
    from tiny_models import make_tiny_model

    model = make_tiny_model("llama", seed=5)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 256, (2, 5), generator=g)
    eager_cache, comp_cache = make_static_cache(model, 2, 32), make_static_cache(model, 2, 32)
    enable_row_positions(eager_cache, 2)
    enable_row_positions(comp_cache, 2)
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(forward_rows, backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad():
        forward_rows(model, eager_cache, prompt, torch.tensor([0, 0]))
        forward_rows(model, comp_cache, prompt, torch.tensor([0, 0]))
        for pos in ([5, 5], [6, 5], [8, 6]):
            tok = torch.randint(3, 256, (2, 1), generator=g)
            want = forward_rows(model, eager_cache, tok, torch.tensor(pos))
            got = step(model, comp_cache, tok, torch.tensor(pos))
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch._dynamo.reset()
    assert len(compiles) == 1
