"""Edge cases of the speculative runtime: EOS inside a drafted block, max_new_tokens reached mid-block,
gamma larger than what remains, batches of unequal prompts (left padding), a drafter that never
agrees, streaming, and bad input (clear errors before any work)."""

from __future__ import annotations

import copy

import pytest
import torch
from runtime_reference import naive_greedy, repetitive_prompt
from tiny_models import make_tiny_model

from specq.runtime.generate import generate


@pytest.fixture(scope="module")
def target():
    return make_tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def twin(target):
    """A separate model with the target's weights: a drafter that is always right (every block is
    accepted in full), so EOS and max_new_tokens land inside drafted blocks deterministically."""
    return copy.deepcopy(target)


@pytest.fixture(scope="module")
def contrarian(target):
    """A drafter whose argmax is the target's argmin: it never agrees (acceptance 0, forever)."""
    m = copy.deepcopy(target)
    with torch.no_grad():
        m.lm_head.weight.neg_()
    return m


def test_eos_inside_drafted_block(target, twin):
    prompt = repetitive_prompt(seed=7)
    ref = naive_greedy(target, prompt, 20)
    for j in range(1, 9):  # EOS at every offset inside blocks of gamma + 1 = 5 tokens
        eos = int(ref[j])
        first = int((ref == eos).nonzero()[0])  # the first time the target emits that token
        out = generate(target, prompt.view(1, -1), 20, levels=[twin, "bf16"], gamma=4, eos_token_id=eos,
                       pad_token_id=0)
        new = out.sequences[0, len(prompt):]
        assert out.num_new_tokens == [first + 1]
        assert torch.equal(new[: first + 1], ref[: first + 1])
        assert len(new) == first + 1  # like HF generate(): a batch of one ends at its EOS
        assert out.stats.new_tokens == first + 1


def test_max_new_tokens_mid_block_and_large_gamma(target, twin):
    prompt = repetitive_prompt(seed=8)
    ref = naive_greedy(target, prompt, 12)
    for n, gamma in ((7, 4), (3, 10), (1, 4), (12, 5), (5, 100)):
        out = generate(target, prompt.view(1, -1), n, levels=["ngram", twin, "bf16"], gamma=gamma, eos_token_id=[])
        assert out.sequences.shape[1] == len(prompt) + n
        assert torch.equal(out.sequences[0, len(prompt):], ref[:n]), (n, gamma)
    # nothing is drafted past max_new_tokens: the twin is always right, so exactly n tokens are drafted
    out = generate(target, prompt.view(1, -1), 7, levels=[twin, "bf16"], gamma=4, eos_token_id=[])
    assert out.stats.levels[0].drafted == 7 - out.stats.levels[1].forwards
    assert out.stats.levels[0].accepted == out.stats.levels[0].drafted


def test_zero_new_tokens(target):
    prompt = repetitive_prompt(seed=9).view(1, -1)
    out = generate(target, prompt, 0, levels=["ngram", "bf16"])
    assert torch.equal(out.sequences, prompt)


def test_drafter_that_never_agrees(target, contrarian):
    prompt = repetitive_prompt(seed=10)
    ref = naive_greedy(target, prompt, 30)
    out = generate(target, prompt.view(1, -1), 30, levels=[contrarian, "bf16"], gamma=4, eos_token_id=[])
    assert torch.equal(out.sequences[0, len(prompt):], ref)
    st = out.stats.levels[0]
    assert st.accepted == 0 and st.drafted > 0 and out.stats.levels[1].forwards == 30
    # nested: the contrarian under a good shallow level under the target
    out = generate(target, prompt.view(1, -1), 30, levels=[contrarian, "shallow:1", "bf16"], gamma=[3, 2],
                   eos_token_id=[])
    assert torch.equal(out.sequences[0, len(prompt):], ref)


@pytest.mark.parametrize("family", ("llama", "opt", "gemma3"))
def test_batch_of_unequal_prompts(family):
    model = make_tiny_model(family, seed=0)
    small = make_tiny_model(family, seed=3)
    prompts = [repetitive_prompt(seed=s, length=n) for s, n in ((11, 4), (12, 12), (13, 8))]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = p
        mask[b, T - len(p):] = 1
    n = 20
    refs = [naive_greedy(model, p, n) for p in prompts]
    eos = int(refs[1][5])  # row 1 stops early (at the first occurrence of this token)
    refs = [naive_greedy(model, p, n, eos=[eos]) for p in prompts]
    for levels in (["bf16"], ["ngram", "bf16"], ["ngram", "shallow:1", "bf16"], [small, "bf16"]):
        out = generate(model, ids, n, levels=levels, gamma=3, attention_mask=mask, eos_token_id=eos,
                       pad_token_id=0)
        assert out.num_new_tokens == [len(r) for r in refs], levels
        for b, r in enumerate(refs):
            row = out.sequences[b, T:]
            assert torch.equal(row[: len(r)], r), (family, levels, b)
            assert bool((row[len(r):] == 0).all())
            assert torch.equal(out.sequences[b, :T], ids[b])  # the (padded) prompt is kept as given


def test_streamer_receives_accepted_tokens_in_order(target):
    prompt = repetitive_prompt(seed=14).view(1, -1)
    chunks = []
    out = generate(target, prompt, 25, levels=["ngram", "shallow:1", "bf16"], gamma=3, eos_token_id=[],
                   streamer=chunks.append)
    assert len(chunks) == out.stats.levels[-1].forwards
    assert torch.equal(torch.cat(chunks, dim=1), out.sequences[:, prompt.shape[1]:])


def test_bad_input_is_rejected_before_work(target):
    prompt = repetitive_prompt(seed=15).view(1, -1)
    other_vocab = make_tiny_model("llama", seed=0)
    other_vocab.resize_token_embeddings(300)
    cases = [
        (dict(levels=["bogus", "bf16"]), "unknown level"),
        (dict(levels=["mxfp4", "bf16"]), "needs a multi-mode model"),
        (dict(levels=[other_vocab, "bf16"]), "vocabulary"),
        (dict(levels=["bf16", "ngram"]), "cannot verify"),
        (dict(levels=["ngram", "shallow:1"]), "last level is the target"),
        (dict(levels=["shallow:5", "bf16"]), "shallow level needs"),
        (dict(levels=["ngram", "bf16"], gamma=0), "gamma must be >= 1"),
        (dict(levels=["ngram", "shallow:1", "bf16"], gamma=[2]), "drafting levels"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0, temperature=1.0), "top_p"),
        (dict(max_cache_len=prompt.shape[1]), "max_cache_len"),
        (dict(max_new_tokens=600), "positions"),
        (dict(attention_mask=torch.cat([torch.ones(1, 3), torch.zeros(1, prompt.shape[1] - 3)], 1).long()),
         "left-padded"),
    ]
    for kwargs, message in cases:
        kw = dict(max_new_tokens=8, levels=["bf16"])
        kw.update(kwargs)
        with pytest.raises(ValueError, match=message):
            generate(target, prompt, **kw)
    with pytest.raises(ValueError, match="2-D"):
        generate(target, prompt[0], 8, levels=["bf16"])
