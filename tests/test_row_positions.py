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


@pytest.fixture(scope="module")
def multimode():
    import specq
    from tiny_models import make_tiny_model

    return specq.transform(make_tiny_model("llama", seed=1), modes=("bf16", "mxfp4"),
                           recipe={"name": "mse", "base": "default", "mxfp4_scale_rule": "mse"})


@pytest.mark.parametrize("levels", [["mxfp4", "bf16"], ["ngram", "bf16"], ["bf16"]])
def test_per_row_generate_is_lossless_and_wastes_fewer_verifies(multimode, levels):
    """compiled_generate(per_row=True): each row equals HF greedy target-only decoding (float32), and
    a speculative batch needs no more verify forwards than the shared-position loop."""
    import specq
    from specq.runtime.compiled import compiled_generate, release_steps

    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 256, (3, 8), generator=g)
    prompt[1, 4:] = prompt[1, :4]  # some repetition for the n-gram level
    with torch.no_grad(), specq.mode(multimode, "bf16"):
        ref = multimode.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0,
                                 attention_mask=torch.ones_like(prompt))
    outs = {}
    for per_row in (False, True):
        torch._dynamo.reset()
        release_steps(multimode)
        outs[per_row] = compiled_generate(multimode, prompt, 20, levels=levels, gamma=3, eos_token_id=[],
                                          compile="eager", per_row=per_row)
        assert torch.equal(outs[per_row].sequences, ref), (levels, per_row)
    release_steps(multimode)
    torch._dynamo.reset()
    if len(levels) == 2:
        assert outs[True].stats.levels[1].forwards <= outs[False].stats.levels[1].forwards
        # per row and per round, an active row commits its accepted drafts plus the verifier's token
        # (the first new token comes from the prefill; the last round of a row may be cut at
        # max_new_tokens); rows that are done are not counted
        lvl = outs[True].stats.levels[0]
        assert 3 * 19 <= lvl.accepted + lvl.row_rounds <= 3 * 19 + 3 * 3
        assert lvl.mean_accepted_length <= 3 and lvl.row_rounds <= 3 * lvl.rounds


def test_per_row_is_the_default_for_batches_of_two_levels(multimode):
    """per_row="auto" (the default): a batch with two levels decodes per row (the same verify forwards
    as per_row=True), one row does not; a bad value is refused."""
    from specq.runtime.compiled import compiled_generate, release_steps

    prompt = torch.randint(3, 256, (3, 8), generator=torch.Generator().manual_seed(11))
    runs = {}
    for per_row in ("auto", True, False):
        release_steps(multimode)
        torch._dynamo.reset()
        runs[per_row] = compiled_generate(multimode, prompt, 16, levels=["mxfp4", "bf16"], gamma=3,
                                          eos_token_id=[], compile="eager", per_row=per_row)
    release_steps(multimode)
    assert torch.equal(runs["auto"].sequences, runs[True].sequences)
    assert runs["auto"].stats.levels[1].forwards == runs[True].stats.levels[1].forwards
    assert runs[True].stats.levels[1].forwards < runs[False].stats.levels[1].forwards
    with pytest.raises(ValueError, match="per_row must be"):
        compiled_generate(multimode, prompt, 4, levels=["mxfp4", "bf16"], compile="eager", per_row="yes")


def test_per_row_refuses_three_levels(multimode):
    from specq.runtime.compiled import compiled_generate

    with pytest.raises(ValueError, match="two levels"):
        compiled_generate(multimode, torch.randint(3, 256, (2, 8)), 4, levels=["ngram", "mxfp4", "bf16"],
                          gamma=[2, 2], compile="eager", per_row=True)


@pytest.mark.gpu
@pytest.mark.parametrize("compile_", [None, "inductor"])
def test_cuda_per_row_generate_is_lossless(multimode, compile_):
    """On CUDA with CUDA graphs: per-row decoding (mxfp4 -> bf16 and ngram -> bf16) gives HF greedy's
    tokens per row (float32), as eager steps and as inductor-compiled ones."""
    import copy

    import specq
    from specq.runtime.compiled import compiled_generate, release_steps

    mm = copy.deepcopy(multimode).cuda()
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(3, 256, (4, 8), generator=g)
    prompt[2, 4:] = prompt[2, :4]
    prompt = prompt.cuda()
    with torch.no_grad(), specq.mode(mm, "bf16"):
        ref = mm.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0,
                          attention_mask=torch.ones_like(prompt))
    torch._dynamo.reset()
    for levels in (["mxfp4", "bf16"], ["ngram", "bf16"]):
        out = compiled_generate(mm, prompt, 24, levels=levels, gamma=3, eos_token_id=[], compile=compile_,
                                cuda_graphs=True, per_row=True)
        assert torch.equal(out.sequences, ref), levels
    release_steps(mm)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_cuda_row_positions_bf16_decode_ops():
    """bf16 on CUDA, compiled with inductor (decode-attention kernel with per-row masks, dense GEMV):
    rows at different cache positions give the logits of a cache-free forward of each row's own
    sequence, within bf16 rounding."""
    from specq.runtime.compiled import CompiledSteps
    from tiny_models import make_tiny_model

    model = make_tiny_model("llama", seed=4).to(device="cuda", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 256, (2, 6), generator=g).cuda()
    torch._dynamo.reset()
    steps = CompiledSteps(model, make_static_cache(model, 2, 64), compile="inductor", row_positions=True)
    seqs = [prompt[0].tolist(), prompt[1].tolist()]
    steps.logits(prompt, torch.tensor([0, 0], device="cuda"))
    for pos, keep in (([6, 6], [3, 1]), ([9, 7], [1, 1]), ([10, 8], [1, 1])):
        q = 3 if pos == [6, 6] else 1
        block = torch.randint(3, 256, (2, q), generator=g).cuda()
        got = steps.logits(block, torch.tensor(pos, device="cuda"))
        for b in range(2):
            with torch.no_grad():
                want = model(torch.tensor([seqs[b] + block[b].tolist()], device="cuda"),
                             use_cache=False).logits[0, pos[b]:pos[b] + q]
            assert (got[b].float() - want.float()).abs().max() <= 0.05 * want.float().abs().max()
            seqs[b] += block[b, :keep[b]].tolist()
    torch._dynamo.reset()
