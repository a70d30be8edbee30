"""Graph passes on tiny models: capture, find_weight_matmuls (hand counts), plan/recipes, rewrite."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import specq
from specq.passes.capture import capture, param_names_of_dynamo_graph
from specq.passes.find_weight_matmuls import find_weight_matmuls
from specq.passes.plan import decide, list_recipes, load_recipe, make_plan
from specq.passes.rewrite import rewrite_weight_matmuls
from specq.transform.transform import packed_tensors
from tiny_models import TINY_FAMILIES, make_tiny_model

# weight matmuls per family in a 2-layer model, counted by hand from the architectures:
# llama-like: q,k,v,o,gate,up,down per layer + lm_head; phi3: qkv,o,gate_up,down + lm_head;
# gpt2: c_attn,c_proj,c_fc,c_proj (Conv1D addmm) + lm_head; opt: q,k,v,out,fc1,fc2 + lm_head
HAND = {"llama": 15, "qwen2": 15, "qwen3": 15, "mistral": 15, "gemma3": 15, "phi3": 9, "gpt2": 9, "opt": 13}
TIED = {"gemma3", "gpt2", "opt"}  # lm_head shares the input embedding in these tiny configs
CALIB = torch.tensor([[5, 9, 17, 33, 2, 200, 7, 8, 100, 3, 60, 61]])  # act_mse calibration ids
BIASED = {"qwen2": 6, "gpt2": 8, "opt": 12}  # matmuls with a bias


@pytest.fixture(scope="module")
def captured():
    out = {}
    for fam in TINY_FAMILIES:
        model = make_tiny_model(fam)
        cg = capture(model)
        out[fam] = (model, cg, find_weight_matmuls(cg.gm, cg.param_names, cg.aliases, cg.shapes))
    return out


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_find_weight_matmuls_hand_count(captured, family):
    model, cg, found = captured[family]
    assert len(found) == HAND[family]
    assert sum(m.bias_fqn is not None for m in found) == BIASED.get(family, 0)
    for m in found:
        # each match maps to a real module attribute with the graph's shape
        w = getattr(model.get_submodule(m.module), m.param)
        assert w is model.get_parameter(m.weight_fqn) or m.weight_fqn in m.aliases or w is model.get_parameter(
            m.aliases[0] if m.aliases else m.weight_fqn)
        shape = (m.out_features, m.in_features) if m.layout == "out_in" else (m.in_features, m.out_features)
        assert tuple(w.shape) == shape
        assert m.whole_module
    head = [m for m in found if m.module == "lm_head"]
    assert len(head) == 1 and head[0].tied_to_embedding == (family in TIED)
    layouts = {m.layout for m in found if m.module != "lm_head"}
    assert layouts == ({"in_out"} if family == "gpt2" else {"out_in"})
    assert {m.op for m in found if m.module != "lm_head"} == ({"addmm"} if family == "gpt2" else {"linear"})


def test_find_in_dynamo_graph():
    model = make_tiny_model("phi3")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(input_ids=torch.tensor([[3, 4, 5]]), use_cache=False)
    gm = graphs[0]
    names = param_names_of_dynamo_graph(gm)
    assert names and all(v in dict(model.named_parameters()) for v in names.values())
    found = find_weight_matmuls(gm, names)
    assert len(found) == HAND["phi3"]
    assert {m.module.rsplit(".", 1)[-1] for m in found} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"}


def test_plan_is_json_and_keeps_lm_head(captured):
    model, cg, found = captured["gemma3"]
    plan = make_plan(found, load_recipe(None, "gemma3_text"), ("bf16", "mxfp4", "w4a16", "w4a4"),
                     dtype=torch.float32, model_type="gemma3_text")
    plan2 = json.loads(json.dumps(plan))
    assert plan2 == plan and plan["dtype"] == "float32"
    keep = [e for e in plan["matmuls"] if e["action"] == "keep"]
    assert [e["module"] for e in keep] == ["lm_head"]
    q = [e for e in plan["matmuls"] if e["action"] == "quantize"]
    assert all(e["int4_group_size"] == min(128, e["in_features"]) for e in q)
    assert all(e["had_block"] == 64 and e["act_group_size"] == 32 for e in q)
    assert any("group 64" in n for e in q for n in e["notes"])  # K=64 < group 128: explicit fallback


def test_plan_decisions_for_awkward_widths():
    rec = load_recipe("default")
    modes = ("bf16", "mxfp4", "w4a16", "w4a4")

    def entry(k, module="x.proj"):
        return {"module": module, "param": "weight", "in_features": k, "out_features": 32, "layout": "out_in",
                "op": "linear", "whole_module": True, "tied_to_embedding": False}

    e = decide(entry(576), rec, modes)  # SmolLM2 hidden: 576 = 64 * 9
    assert e["action"] == "quantize" and e["int4_group_size"] == 64 and e["had_block"] == 64
    assert e["act_group_size"] == rec["act_group_size"]
    e = decide(entry(1536), rec, modes)
    assert e["int4_group_size"] == 128 and e["notes"] == []
    assert decide(entry(40), rec, modes)["action"] == "keep"  # not a multiple of 32
    assert decide(entry(40), rec, ("bf16", "w4a16"))["action"] == "keep"  # no INT4 group >= 32 divides 40
    e = decide(entry(576), load_recipe({"base": "default", "had_block": "full"}), modes)
    assert e["had_block"] == 576
    assert decide(entry(64, "lm_head"), rec, modes)["action"] == "keep"
    e = decide(entry(96), load_recipe({"base": "default", "act_group_size": 64}), modes)
    assert e["act_group_size"] == 32 and any("activation group 64" in n for n in e["notes"])


def test_recipes_load_and_validate():
    assert "default" in list_recipes()
    for name in list_recipes():
        r = load_recipe(name)
        assert r["name"] == name
    assert load_recipe(None, "an-unknown-architecture")["name"] == "default"
    with pytest.raises(ValueError, match="unknown keys"):
        load_recipe({"groupsize": 64})
    with pytest.raises(ValueError, match="mxfp4_scale_rule"):
        load_recipe({"mxfp4_scale_rule": "ceil"})
    with pytest.raises(ValueError, match="had_block"):
        load_recipe({"had_block": -1})
    with pytest.raises(ValueError, match="unknown recipe"):
        load_recipe("nope")


@pytest.mark.parametrize("family,mode", [("llama", "w4a4"), ("gpt2", "mxfp4"), ("opt", "w4a16"), ("phi3", "w4a4")])
def test_rewrite_matches_transformed_eager_model(captured, family, mode):
    model, _, _ = captured[family]
    mm = specq.transform(copy.deepcopy(model), calibration_ids=CALIB)
    ids = torch.tensor([[5, 9, 17, 33, 2, 200]])
    gm = capture(model, ids).gm
    gm, n = rewrite_weight_matmuls(gm, mm.specq_plan, packed_tensors(mm), mode)
    assert n == HAND[family] - 1
    targets = [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]
    assert sum(t == f"specq.linear_{mode}.default" for t in targets) == n
    assert sum("linear" in t and "specq" not in t or "addmm" in t for t in targets) == 1  # only lm_head
    with torch.no_grad():
        got = gm(input_ids=ids, use_cache=False).logits
        with specq.mode(mm, mode):
            want = mm(input_ids=ids).logits
    assert torch.equal(got, want)


def test_rewrite_bad_input(captured):
    model, _, _ = captured["llama"]
    mm = specq.transform(copy.deepcopy(model), modes=("bf16", "mxfp4"), calibration_ids=CALIB)
    gm = capture(model).gm
    with pytest.raises(ValueError, match="not in the plan"):
        rewrite_weight_matmuls(gm, mm.specq_plan, packed_tensors(mm), "w4a4")
    assert rewrite_weight_matmuls(gm, mm.specq_plan, packed_tensors(mm), "bf16")[1] == 0
    with pytest.raises(ValueError, match="no mxfp4_packed"):
        rewrite_weight_matmuls(gm, mm.specq_plan, {}, "mxfp4")
    other = capture(make_tiny_model("phi3")).gm
    with pytest.raises(ValueError, match="not found in the graph"):
        rewrite_weight_matmuls(other, mm.specq_plan, packed_tensors(mm), "mxfp4")
