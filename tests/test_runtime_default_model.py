"""On the real default model (SmolLM2-135M-Instruct, float32): every strategy returns exactly the
tokens of target-only greedy decoding by transformers' own `generate()` (an independent reference),
64 new tokens from a chat prompt."""

from __future__ import annotations

import copy

import pytest
import torch

import specq
from specq.runtime.generate import generate

NEW = 64
PROMPT = "Write a Python function that checks whether a number is prime, and explain how it works."


@pytest.fixture(scope="module")
def prompt_ids(default_tokenizer, encode_chat):
    return encode_chat(default_tokenizer, PROMPT)


@pytest.fixture(scope="module")
def reference(default_model_fp32, prompt_ids):
    with torch.inference_mode():
        return default_model_fp32.generate(prompt_ids, max_new_tokens=NEW, do_sample=False,
                                           attention_mask=torch.ones_like(prompt_ids))


@pytest.fixture(scope="module")
def multimode(default_model_fp32):
    """A transformed copy (the session model must not be modified in place)."""
    return specq.transform(copy.deepcopy(default_model_fp32), modes=("bf16", "mxfp4", "w4a16", "w4a4"))


@pytest.mark.parametrize("levels", [["bf16"], ["ngram", "bf16"], ["shallow:8", "bf16"], ["ngram", "shallow:8", "bf16"]],
                         ids=lambda lv: "+".join(lv))
def test_plain_strategies_match_hf_generate(default_model_fp32, prompt_ids, reference, levels):
    # a shallow copy of this 30-layer model accepts little (no early-exit training): keep its gamma small
    out = generate(default_model_fp32, prompt_ids, NEW, levels=levels, gamma=2 if "shallow:8" in levels else 4)
    assert torch.equal(out.sequences, reference)


@pytest.mark.parametrize("levels", [["mxfp4", "bf16"], ["ngram", "mxfp4", "bf16"]], ids=lambda lv: "+".join(lv))
def test_mlspecqd_matches_hf_generate(multimode, prompt_ids, reference, levels):
    out = generate(multimode, prompt_ids, NEW, levels=levels, gamma=4)
    assert torch.equal(out.sequences, reference)
    assert out.stats.levels[-2].accepted > 0  # the mxfp4 draft is useful on the real model
    assert len(out.stats.kv_caches) == 1  # one cache for all modes
    assert out.stats.kv_caches[0]["allocations"] == 30


def test_qspec_matches_w4a16_greedy(multimode, prompt_ids):
    """QSpec's target is the w4a16 mode; its reference is w4a16 decoding by HF generate()."""
    with specq.mode(multimode, "w4a16"), torch.inference_mode():
        ref = multimode.generate(prompt_ids, max_new_tokens=NEW, do_sample=False,
                                 attention_mask=torch.ones_like(prompt_ids))
    out = generate(multimode, prompt_ids, NEW, levels=["w4a4", "w4a16"], gamma=3)
    assert torch.equal(out.sequences, ref)
