"""Greedy speculative decoding is lossless: for every strategy, the tokens equal target-only greedy
decoding computed without any KV cache (tests/runtime_reference.py), in float32, on tiny random
models of several families. Strategies over modes use a transformed copy of the tiny model, with the
target's own mode as the reference."""

from __future__ import annotations

import pytest
import torch
from runtime_reference import naive_greedy, repetitive_prompt
from tiny_models import make_tiny_model

import specq
from specq.runtime.generate import generate

FAMILIES = ("llama", "gemma3", "gpt2", "opt")
NEW = 24


@pytest.fixture(scope="module")
def tiny_pair():
    """family -> (target, a separate 'small' model of the same vocabulary)."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = (make_tiny_model(family, seed=0), make_tiny_model(family, seed=1))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def tiny_multimode():
    """family -> a transformed tiny model with all four modes (built once per module)."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = specq.transform(make_tiny_model(family, seed=0), modes=("bf16", "mxfp4", "w4a16", "w4a4"))
        return cache[family]

    return get


def _strategies(small):
    return {
        "autoregressive": ["bf16"],
        "ngram": ["ngram", "bf16"],
        "shallow": ["shallow:1", "bf16"],
        "small_model": [small, "bf16"],
        "ngram+shallow": ["ngram", "shallow:1", "bf16"],
        "ngram+small+shallow": ["ngram", small, "shallow:1", "bf16"],
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_lossless_plain_models(family, tiny_pair):
    target, small = tiny_pair(family)
    prompt = repetitive_prompt(seed=1)
    ref = naive_greedy(target, prompt, NEW)
    for name, levels in _strategies(small).items():
        for gamma in (1, 3, [2, 5, 3][: len(levels) - 1]):
            out = generate(target, prompt.view(1, -1), NEW, levels=levels, gamma=gamma, eos_token_id=[])
            assert torch.equal(out.sequences[0, len(prompt):], ref), (family, name, gamma)
            assert out.stats.new_tokens == NEW


@pytest.mark.parametrize("family", ("llama", "qwen2", "gpt2"))
def test_greedy_lossless_modes(family, tiny_multimode):
    """QSpec (w4a4 -> w4a16), ML-SpecQD 2- and 3-level, and a quantized shallow level."""
    mm = tiny_multimode(family)
    prompt = repetitive_prompt(seed=2)
    refs = {}
    for target_mode in ("bf16", "w4a16"):
        with specq.mode(mm, target_mode):
            refs[target_mode] = naive_greedy(mm, prompt, NEW)
    strategies = {
        "qspec": ["w4a4", "w4a16"],
        "mlspecqd-2": ["mxfp4", "bf16"],
        "mlspecqd-3": ["ngram", "mxfp4", "bf16"],
        "shallow-w4a4+mxfp4": ["shallow:1:w4a4", "mxfp4", "bf16"],
        "qspec+ngram": ["ngram", "w4a4", "w4a16"],
    }
    before = specq.get_mode(mm)
    for name, levels in strategies.items():
        out = generate(mm, prompt.view(1, -1), NEW, levels=levels, gamma=3, eos_token_id=[])
        assert torch.equal(out.sequences[0, len(prompt):], refs[levels[-1]]), (family, name)
        # one static cache for the model, whatever number of its modes are levels
        assert len(out.stats.kv_caches) == 1
        assert out.stats.kv_caches[0]["allocations"] == out.stats.kv_caches[0]["layers"]
    assert specq.get_mode(mm) == before  # the caller's mode is restored


def test_untouched_bf16_equals_mode_bf16(tiny_multimode):
    """A plain model and the bf16 mode of its transformed copy decode identically (same weights)."""
    plain = make_tiny_model("llama", seed=0)
    mm = tiny_multimode("llama")
    prompt = repetitive_prompt(seed=3).view(1, -1)
    a = generate(plain, prompt, NEW, levels=["ngram", "bf16"], eos_token_id=[]).sequences
    b = generate(mm, prompt, NEW, levels=["ngram", "mxfp4", "bf16"], eos_token_id=[]).sequences
    assert torch.equal(a, b)


def test_stats_are_consistent(tiny_pair):
    target, small = tiny_pair("llama")
    prompt = repetitive_prompt(seed=4).view(1, -1)
    out = generate(target, prompt, 30, levels=["ngram", small, "bf16"], gamma=[3, 2], eos_token_id=[])
    st = out.stats
    assert [lvl.name for lvl in st.levels] == ["ngram", "LlamaForCausalLM", "bf16"]
    assert st.new_tokens == 30 and st.time_s > 0 and st.tokens_per_s > 0
    for lvl in st.levels[:-1]:
        assert 0 <= lvl.accepted <= lvl.drafted
        if lvl.drafted:
            assert 0.0 <= lvl.acceptance_rate <= 1.0
    assert st.levels[0].forwards == 0  # prompt lookup runs no model
    # the target's forwards: at most one per produced token, fewer when drafts are accepted
    target_fw = st.levels[-1].forwards
    assert target_fw <= 30
    assert target_fw == 30 - st.levels[1].accepted
    d = st.as_dict()
    assert d["new_tokens"] == 30 and len(d["levels"]) == 3
    table = st.table()
    assert "accept rate" in table and "tokens/s" in table


def test_shallow_level_shares_target_cache(tiny_pair):
    target, _ = tiny_pair("llama")
    prompt = repetitive_prompt(seed=5).view(1, -1)
    out = generate(target, prompt, 16, levels=["shallow:1", "bf16"], eos_token_id=[])
    caches = out.stats.kv_caches
    assert len(caches) == 1 and caches[0]["allocations"] == caches[0]["layers"] == 2
