"""The embedded default model (SmolLM2-135M-Instruct, float32) transformed into all four modes.

Perplexity bounds come from measurements on the shipped eval text (see docs/ARCHITECTURE.md,
"passes and transform (as built)"): bf16 mode equals the untouched model; each quantized mode stays
within a measured factor of it, and switching modes back and forth gives identical logits.
"""

from __future__ import annotations

import math

import pytest
import torch

import specq
from specq.transform.transform import bytes_per_mode, multimode_linears

pytestmark = pytest.mark.slow

MODES = ("bf16", "mxfp4", "w4a16", "w4a4")
# Perplexity of the first 256 tokens of the shipped eval text, float32, default recipe, measured
# 2026-11-22: bf16 28.4, mxfp4 44.3, w4a16 55.0, w4a4 70.6. Bounds: ~25% headroom (a broken mode
# lands in the thousands: the vocabulary has 49152 tokens).
PPL_BOUND = {"bf16": 32.0, "mxfp4": 56.0, "w4a16": 70.0, "w4a4": 90.0}


@pytest.fixture(scope="module")
def transformed_default(default_multimode_fp32):
    # the session's shared transform (calibrated on the eval window's second half, see conftest.py)
    return default_multimode_fp32


@pytest.fixture(scope="module")
def eval_ids(default_eval_ids):
    return default_eval_ids


def _ppl(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    return math.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()), logits


def test_plan_of_default_model(transformed_default):
    plan = transformed_default.specq_plan
    q = [e for e in plan["matmuls"] if e["action"] == "quantize"]
    assert len(q) == 30 * 7 and len(plan["matmuls"]) == 30 * 7 + 1  # 7 projections x 30 layers + lm_head
    head = [e for e in plan["matmuls"] if e["module"] == "lm_head"]
    assert head[0]["action"] == "keep" and head[0]["tied_to_embedding"]
    # hidden 576 is not a multiple of 128: an explicit, logged group-size decision
    assert {e["int4_group_size"] for e in q if e["in_features"] == 576} == {64}
    assert len(multimode_linears(transformed_default)) == 210
    b = bytes_per_mode(transformed_default)
    assert b["w4a16"] == b["w4a4"] < b["bf16"] / 3 and b["mxfp4"] < b["bf16"] / 3


def test_every_mode_is_sane_and_switching_is_exact(transformed_default, default_model_fp32, eval_ids):
    mm = transformed_default
    ppl, first = {}, {}
    for mode in MODES:
        with specq.mode(mm, mode):
            ppl[mode], first[mode] = _ppl(mm, eval_ids)
    ref_ppl, ref_logits = _ppl(default_model_fp32, eval_ids)
    assert torch.equal(first["bf16"], ref_logits)
    for mode in MODES:
        assert math.isfinite(ppl[mode]) and ppl[mode] < PPL_BOUND[mode], (mode, ppl)
    assert ppl["bf16"] <= min(ppl[m] for m in MODES[1:]) * 1.02
    # back and forth: identical logits every time
    for mode in ("w4a4", "bf16", "mxfp4", "w4a16"):
        with specq.mode(mm, mode):
            assert torch.equal(_ppl(mm, eval_ids)[1], first[mode]), mode
