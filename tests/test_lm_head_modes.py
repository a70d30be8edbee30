"""`lm_head_modes`: the output head quantized in some modes only (MXFP4 drafts), float in the others.

bf16 (the target) must keep the exact float head so speculative output stays lossless, and every mode
the head is not quantized in runs the very same float matmul; a tied head gets its own packed copy
while the input embedding stays float; the plan, checkpoints and `specq inspect` record it.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

import specq
from specq.formats import mxfp4
from specq.passes.plan import entry_modes, load_recipe
from specq.passes.rewrite import rewrite_weight_matmuls
from specq.transform.multimode_linear import MultiModeLinear
from specq.transform.transform import bytes_per_mode, packed_tensors
from tiny_models import make_tiny_model

ALL = ("bf16", "mxfp4", "w4a16", "w4a4")
CALIB = torch.randint(3, 250, (2, 32), generator=torch.Generator().manual_seed(7))
IDS = torch.tensor([[1, 17, 99, 3, 250, 42, 7, 128, 64, 5], [9, 8, 7, 6, 5, 4, 3, 2, 200, 100]])
# llama: untied lm_head; gpt2 (Conv1D body) and gemma3 (scaled embedding): lm_head tied to the embedding
FAMILIES = ("llama", "gpt2", "gemma3")


@pytest.fixture(scope="module")
def models():
    """family -> (untouched, transformed with lm_head_modes=["mxfp4"], transformed without)."""
    out = {}
    for fam in FAMILIES:
        ref = make_tiny_model(fam, seed=3)
        head = specq.transform(copy.deepcopy(ref), modes=ALL, calibration_ids=CALIB, lm_head_modes=["mxfp4"])
        plain = specq.transform(copy.deepcopy(ref), modes=ALL, calibration_ids=CALIB)
        out[fam] = (ref, head, plain)
    return out


def _logits(model, ids=IDS, mode=None):
    with torch.no_grad():
        if mode is None:
            return model(input_ids=ids).logits
        with specq.mode(model, mode):
            return model(input_ids=ids).logits


def _head_input(model, mode):
    """(logits, input of lm_head) of one forward in `mode`."""
    seen = []
    h = model.lm_head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        logits = _logits(model, mode=mode)
    finally:
        h.remove()
    return logits, seen[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_mxfp4_head_logits_match_float64_reference_and_bf16_is_exact(models, family):
    ref, mm, plain = models[family]
    head = mm.lm_head
    assert isinstance(head, MultiModeLinear) and head.quant_modes == ("mxfp4",)
    assert head.float_modes == ("bf16", "w4a16", "w4a4")
    # bf16 (target) mode: bit-identical to the untouched model, float32
    assert torch.equal(_logits(mm, mode="bf16"), _logits(ref))
    # mxfp4 mode: the other layers are exactly the plain transform's mxfp4 layers (same head input) ...
    got, x = _head_input(mm, "mxfp4")
    plain_logits, x_plain = _head_input(plain, "mxfp4")
    assert torch.equal(x, x_plain)
    # ... and the head is x @ dequant(MXFP4 head).T, against a float64 reference
    w = mxfp4.dequantize(head.mxfp4_packed, head.mxfp4_scales, torch.float64)
    want = x.double() @ w.t()
    err = (got.double() - want).abs().max().item()
    assert err <= 1e-5 * (1 + want.abs().max().item()), err
    assert not torch.equal(got, plain_logits)  # the head really is quantized in mxfp4 mode
    # the modes the head is not quantized in run the exact float head: same logits as without lm_head_modes
    for m in ("w4a16", "w4a4"):
        assert torch.equal(_logits(mm, mode=m), _logits(plain, mode=m)), m


def test_bytes_per_mode_counts_the_packed_head_in_mxfp4_only(models):
    _, mm, plain = models["llama"]
    with_head, without = bytes_per_mode(mm), bytes_per_mode(plain)
    w = plain.lm_head.weight
    saved = w.numel() * w.element_size() - (mm.lm_head.mxfp4_packed.numel() + mm.lm_head.mxfp4_scales.numel())
    assert without["mxfp4"] - with_head["mxfp4"] == saved > 0
    for m in ("bf16", "w4a16", "w4a4"):
        assert with_head[m] == without[m]


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_tied_head_gets_its_own_packed_copy_and_embedding_stays_float(models, family):
    ref, mm, _ = models[family]
    emb, emb_ref = mm.get_input_embeddings(), ref.get_input_embeddings()
    assert mm.lm_head.weight is emb.weight  # still tied (the bf16 head), and unchanged
    assert torch.equal(emb.weight, emb_ref.weight)
    with torch.no_grad():
        for m in ALL:
            with specq.mode(mm, m):
                assert torch.equal(emb(IDS), emb_ref(IDS)), m
    assert mm.lm_head.mxfp4_packed.shape == (emb.weight.shape[0], emb.weight.shape[1] // 2)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_checkpoint_round_trip(models, family, tmp_path):
    _, mm, _ = models[family]
    path = specq.save_pretrained(mm, tmp_path / family)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    assert "mxfp4" in wm["lm_head.mxfp4_packed"] and "mxfp4" in wm["lm_head.mxfp4_scales"]
    assert "int4_packed" not in " ".join(k for k in wm if k.startswith("lm_head."))
    # the float head is common (w4a16/w4a4 run it); a tied one is stored once, as the embedding
    assert "common" in wm["lm_head.weight"]
    if family == "gpt2":
        assert index["aliases"]["lm_head.weight"] == "transformer.wte.weight"
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["lm_head_modes"] == ["mxfp4"]
    assert config["quantization_config"]["formats"]["w4a4"]["act_group_sizes"] == [32]  # the float head adds none

    loaded = specq.from_pretrained(path)
    for m in ALL:
        assert torch.equal(_logits(loaded, mode=m), _logits(mm, mode=m)), m
    if family == "gpt2":
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    # only the head's quantized mode: no float head is loaded (it is skipped, not an error)
    only = specq.from_pretrained(path, modes=["mxfp4"])
    assert "weight" not in dict(only.lm_head.named_parameters())
    assert torch.equal(_logits(only, mode="mxfp4"), _logits(mm, mode="mxfp4"))
    # a mode the head is float in, without bf16: the float head comes from the common shard
    w4 = specq.from_pretrained(path, modes=["w4a16"])
    assert torch.equal(_logits(w4, mode="w4a16"), _logits(mm, mode="w4a16"))
    # modes the head is never quantized in: it stays the model's own module
    float_only = specq.from_pretrained(path, modes=["bf16", "w4a4"])
    assert not isinstance(float_only.lm_head, MultiModeLinear)
    assert torch.equal(_logits(float_only, mode="bf16"), _logits(mm, mode="bf16"))


def test_transformers_auto_model_loads_it(models, tmp_path):
    import transformers

    _, mm, _ = models["gpt2"]
    path = specq.save_pretrained(mm, tmp_path / "gpt2")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    for m in ALL:
        assert torch.equal(_logits(model, mode=m), _logits(mm, mode=m)), m


def test_plan_records_the_head_modes_and_inspect_shows_them(models, tmp_path):
    from specq.cli.main import main

    _, mm, plain = models["gpt2"]
    plan = mm.specq_plan
    assert plan["lm_head_modes"] == ["mxfp4"] and "lm_head_modes" not in plain.specq_plan
    (head,) = [e for e in plan["matmuls"] if e["module"] == "lm_head"]
    assert head["action"] == "quantize" and head["modes"] == ["mxfp4"]
    assert "lm_head_modes" in head["reason"] and "tied" in head["reason"]
    assert head["int4_group_size"] is None and head["mxfp4_scale_rule"] == "act_mse"
    assert entry_modes(head, ALL) == ("mxfp4",)
    others = [e for e in plan["matmuls"] if e["module"] != "lm_head"]
    assert all("modes" not in e and entry_modes(e, ALL) == ("mxfp4", "w4a16", "w4a4") for e in others)
    json.dumps(plan)
    path = specq.save_pretrained(mm, tmp_path / "ck")
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert r.exit_code == 0, r.output
    assert "lm_head modes   mxfp4" in r.stdout
    (line,) = [x for x in r.stdout.splitlines() if x.split()[:2] == ["lm_head", "256x64"]]
    assert "quantize" in line and "only in mxfp4" in line
    r = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    layers = {e["module"]: e for e in json.loads(r.stdout)["layers"]}
    assert layers["lm_head"]["modes"] == ["mxfp4"] and layers["transformer.h.0.attn.c_attn"]["modes"] is None


def test_rewrite_pass_quantizes_the_head_only_in_its_modes(models):
    from specq.passes.capture import capture

    ref, mm, _ = models["llama"]
    packed = packed_tensors(mm)
    for mode in ("mxfp4", "w4a16"):
        gm = capture(copy.deepcopy(ref), IDS).gm
        gm, n = rewrite_weight_matmuls(gm, mm.specq_plan, packed, mode)
        assert n == 14 + (mode == "mxfp4")  # 7 matmuls per layer, 2 layers, + the head in mxfp4


def test_other_modes_and_recipe_forms():
    ref = make_tiny_model("llama", seed=5)
    # several modes, via a recipe dict on top of the default recipe
    mm = specq.transform(copy.deepcopy(ref), modes=ALL, calibration_ids=CALIB,
                         recipe={"base": "default", "lm_head_modes": ["mxfp4", "w4a16"]})
    assert mm.lm_head.quant_modes == ("mxfp4", "w4a16") and mm.lm_head.float_modes == ("bf16", "w4a4")
    assert mm.lm_head.int4_group_size == 64
    assert torch.equal(_logits(mm, mode="bf16"), _logits(ref))
    # no bf16 mode: the head keeps its float weight for w4a4, the other matmuls drop theirs
    mm = specq.transform(copy.deepcopy(ref), modes=("mxfp4", "w4a4"), calibration_ids=CALIB, lm_head_modes="mxfp4")
    assert mm.lm_head.weight is not None and not hasattr(mm.model.layers[0].mlp.down_proj, "weight")
    # modes without any of lm_head_modes: today's float head (recipe-level values outside modes are ignored)
    mm = specq.transform(copy.deepcopy(ref), modes=("bf16", "w4a16"), recipe={"base": "default",
                                                                            "lm_head_modes": ["mxfp4"]})
    assert not isinstance(mm.lm_head, MultiModeLinear)
    assert load_recipe("default")["lm_head_modes"] == []


@pytest.mark.parametrize("value, match", [
    (["bf16"], "cannot contain 'bf16'.*allowed values are \\('mxfp4', 'w4a16', 'w4a4'\\)"),
    (["fp8"], "unknown lm_head_modes value.*'fp8'.*allowed values are \\('mxfp4', 'w4a16', 'w4a4'\\)"),
    ([3], "must be a list of mode names"),
])
def test_invalid_values_are_clear_errors(value, match):
    ref = make_tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        specq.transform(copy.deepcopy(ref), lm_head_modes=value)
    with pytest.raises(ValueError, match=match):
        load_recipe({"base": "default", "lm_head_modes": value})
    with pytest.raises(ValueError, match="not among the modes being built"):
        specq.transform(copy.deepcopy(ref), modes=("bf16", "mxfp4"), lm_head_modes=["w4a4"])
    with pytest.raises(ValueError, match="unknown keys"):
        load_recipe({"base": "default", "overrides": [{"match": "lm_head", "lm_head_modes": ["mxfp4"]}]})


def test_cli_flag(tmp_path):
    from conftest import make_tiny_tokenizer
    from specq.cli.main import main

    src = tmp_path / "tiny"
    make_tiny_model("llama", seed=4).save_pretrained(src)
    make_tiny_tokenizer().save_pretrained(src)
    run = CliRunner().invoke
    r = run(main, ["convert", str(src), "--lm-head-modes", "bf16", "--out", str(tmp_path / "a"), "--no-eval"])
    assert r.exit_code == 2 and "allowed values: mxfp4,w4a16,w4a4" in r.stderr and "float head" in r.stderr
    r = run(main, ["convert", str(src), "--modes", "bf16,w4a16", "--lm-head-modes", "mxfp4", "--out",
                   str(tmp_path / "b"), "--no-eval"])
    assert r.exit_code == 2 and "not among --modes" in r.stderr
    r = run(main, ["convert", str(src), "--modes", "bf16,mxfp4", "--lm-head-modes", "mxfp4", "--out",
                   str(tmp_path / "c"), "--no-eval", "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    q = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert q["lm_head_modes"] == ["mxfp4"]
    r = run(main, ["eval", str(src), "--lm-head-modes", "fp4", "--quiet"])
    assert r.exit_code == 2 and "allowed values" in r.stderr
