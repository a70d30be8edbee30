"""specq.transform on tiny models of 8 families: modes, exactness, memory, generate, bad input.

References are independent of MultiModeLinear: a deep copy of the untouched model whose weights are
replaced by the formats' own dequantization (un-rotated with the inverse Hadamard for INT4), and, for
w4a4, whose matmul inputs are fake-quantized in the rotated basis by a forward pre-hook.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import specq
from specq.formats import activation, hadamard, int4, mxfp4
from specq.transform.multimode_linear import MultiModeLinear
from specq.transform.transform import apply_plan, bytes_per_mode, multimode_linears
from tiny_models import TINY_FAMILIES, make_tiny_model

MODES = ("bf16", "mxfp4", "w4a16", "w4a4")
QUANT = ("mxfp4", "w4a16", "w4a4")
# (quantized matmuls per layer) * 2 layers; lm_head stays unquantized (default recipe)
HAND_COUNT = {"llama": 14, "qwen2": 14, "qwen3": 14, "mistral": 14, "gemma3": 14, "phi3": 8, "gpt2": 8, "opt": 12}


def _ids(batch=2, length=9, seed=1):
    """Deterministic token ids inside every tiny vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (batch, length), generator=g)


# explicit act_mse calibration ids keep the fixtures fast (self-generated calibration is tested once)
CALIB = torch.randint(3, 250, (2, 32), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def transformed():
    """family -> (untouched model, transformed model with all four modes)."""
    out = {}
    for fam in TINY_FAMILIES:
        ref = make_tiny_model(fam)
        mm = specq.transform(copy.deepcopy(ref), modes=MODES, calibration_ids=CALIB)
        out[fam] = (ref, mm)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _reference(ref: nn.Module, mm: nn.Module, mode: str) -> nn.Module:
    """A copy of the untouched model whose planned weights are fake-quantized (float64 math)."""
    model = copy.deepcopy(ref)
    for e in mm.specq_plan["matmuls"]:
        if e["action"] != "quantize":
            continue
        q = mm.get_submodule(e["module"])
        if mode == "mxfp4":
            w = mxfp4.dequantize(q.mxfp4_packed, q.mxfp4_scales, torch.float64)
        else:
            # W4A4 with scale levels (the default recipe's 16) multiplies by the snapped scales
            levels = e.get("w4a4_scale_levels", 0) if mode == "w4a4" else 0
            scales = int4.snapped_scales(q.int4_scales, levels).double() if levels else q.int4_scales
            w = int4.dequantize(q.int4_packed, scales, torch.float64)
            if e["had_block"]:
                w = hadamard.hadamard_transform(w, e["had_block"], inverse=True)  # (W_rot) @ H^T
        target = model.get_submodule(e["module"])
        p = getattr(target, e["param"])
        with torch.no_grad():
            p.copy_((w if e["layout"] == "out_in" else w.t()).to(p.dtype))
        if mode == "w4a4":
            hb, ag = e["had_block"], e["act_group_size"]
            lv = e.get("w4a4_scale_levels", 0) if ag else 0  # activation groups snap to a per-token unit too

            def pre(module, args, hb=hb, ag=ag, lv=lv):
                x = args[0]
                xr = hadamard.hadamard_transform(x, hb) if hb else x
                xq = activation.fake_quantize_int4(xr, ag, lv)
                return (hadamard.hadamard_transform(xq, hb, inverse=True) if hb else xq,) + args[1:]

            target.register_forward_pre_hook(pre)
    return model


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_weight_matmul_is_transformed(transformed, family):
    ref, mm = transformed[family]
    found = multimode_linears(mm)
    assert len(found) == HAND_COUNT[family]
    plan = mm.specq_plan
    assert len(plan["matmuls"]) == HAND_COUNT[family] + 1  # + lm_head
    kept = [e for e in plan["matmuls"] if e["action"] == "keep"]
    assert [e["module"] for e in kept] == ["lm_head"] and kept[0]["reason"]
    if family == "gpt2":
        assert all(m.layout == "in_out" for _, m in found)
    if family == "phi3":
        assert {p.rsplit(".", 1)[1] for p, _ in found} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_bf16_mode_bit_identical_and_keeps_own_weights(transformed, family):
    ref, mm = transformed[family]
    ids = _ids()
    specq.set_mode(mm, "bf16")
    assert torch.equal(_logits(mm, ids), _logits(ref, ids))
    # the model's own parameter objects and dtype (float32 here) are kept for bf16 mode
    for _, m in multimode_linears(mm):
        assert m.weight.dtype == torch.float32


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("mode", QUANT)
def test_quantized_mode_matches_fake_quantized_reference(transformed, family, mode):
    ref, mm = transformed[family]
    ids = _ids()
    with specq.mode(mm, mode):
        got = _logits(mm, ids)
    want = _logits(_reference(ref, mm, mode), ids)
    base = _logits(ref, ids)
    assert not torch.equal(got, base)  # the mode really is quantized
    err = (got - want).abs().max().item()
    assert err <= 2e-4 * (1 + want.abs().max().item()), f"{family}/{mode}: max err {err}"


def test_mode_context_and_switch_are_o1(transformed):
    _, mm = transformed["llama"]
    states = {id(m.mode_state) for _, m in multimode_linears(mm)}
    assert len(states) == 1  # one shared holder
    ids = _ids()
    buffers_before = {k: v.data_ptr() for k, v in mm.state_dict().items()}
    specq.set_mode(mm, "mxfp4")
    a = _logits(mm, ids)
    with specq.mode(mm, "w4a4"):
        assert specq.get_mode(mm) == "w4a4"
        b = _logits(mm, ids)
    assert specq.get_mode(mm) == "mxfp4"
    with pytest.raises(RuntimeError):
        with specq.mode(mm, "w4a16"):
            raise RuntimeError("boom")
    assert specq.get_mode(mm) == "mxfp4"  # restored on error too
    assert torch.equal(_logits(mm, ids), a) and not torch.equal(a, b)
    assert {k: v.data_ptr() for k, v in mm.state_dict().items()} == buffers_before  # no copy, no requant
    specq.set_mode(mm, "bf16")


class _RecordPacked(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ptrs = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("specq."):
            self.ptrs.setdefault(name.split(".")[1], set()).add(args[1].untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


def test_w4a16_and_w4a4_read_one_int4_copy(transformed):
    _, mm = transformed["qwen2"]
    ids = _ids(1, 4)
    seen = {}
    for mode in ("w4a16", "w4a4"):
        rec = _RecordPacked()
        with specq.mode(mm, mode), rec:
            _logits(mm, ids)
        seen[mode] = rec.ptrs["linear_" + mode]
    assert seen["w4a16"] == seen["w4a4"] and len(seen["w4a16"]) == HAND_COUNT["qwen2"]
    # and there is no second INT4 copy anywhere in the state dict
    int4_storages = [v.untyped_storage().data_ptr() for k, v in mm.state_dict().items() if k.endswith("int4_packed")]
    assert sorted(int4_storages) == sorted(seen["w4a4"])


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_bytes_per_mode(transformed, family):
    ref, mm = transformed[family]
    expect = {m: 0 for m in MODES}
    for e in mm.specq_plan["matmuls"]:
        n, k = e["out_features"], e["in_features"]
        bias = 4 * n if e["bias"] else 0
        if e["action"] == "keep":
            for m in MODES:
                expect[m] += 4 * n * k + bias
            continue
        expect["bf16"] += 4 * n * k + bias
        expect["mxfp4"] += n * k // 2 + n * k // 32 + bias
        for m in ("w4a16", "w4a4"):
            expect[m] += n * k // 2 + 4 * n * k // e["int4_group_size"] + bias
    assert bytes_per_mode(mm) == expect


def test_only_requested_modes_are_stored():
    ref = make_tiny_model("llama")
    a = specq.transform(copy.deepcopy(ref), modes=("mxfp4", "bf16"), calibration_ids=CALIB)
    for _, m in multimode_linears(a):
        assert not hasattr(m, "int4_packed") and hasattr(m, "mxfp4_packed") and hasattr(m, "weight")
    assert specq.get_mode(a) == "bf16"
    with pytest.raises(ValueError, match="not available.*transformed for modes"):
        specq.set_mode(a, "w4a4")
    b = specq.transform(copy.deepcopy(ref), modes=("w4a16", "w4a4"))
    assert specq.get_mode(b) == "w4a16"
    for _, m in multimode_linears(b):
        assert not hasattr(m, "weight") and not hasattr(m, "mxfp4_packed")
        assert m.int4_packed.dtype == torch.int32
    n_float = sum(p.numel() for p in b.parameters())
    # only embeddings, norms and the unquantized lm_head keep float weights
    assert n_float < sum(p.numel() for p in ref.parameters()) / 2
    with pytest.raises(ValueError, match="unknown mode"):
        specq.set_mode(b, "fp8")


def test_empty_apply_plan_loads_packed_state_without_requantizing(transformed):
    ref, mm = transformed["opt"]
    skeleton = make_tiny_model("opt", seed=5)
    apply_plan(skeleton, mm.specq_plan, quantize=False)
    sd = mm.state_dict()
    assert set(skeleton.state_dict()) == set(sd)
    for k, v in skeleton.state_dict().items():
        assert v.shape == sd[k].shape and v.dtype == sd[k].dtype, k
    skeleton.load_state_dict(sd)
    ids = _ids()
    for mode in MODES:
        with specq.mode(skeleton, mode), specq.mode(mm, mode):
            assert torch.equal(_logits(skeleton, ids), _logits(mm, ids)), mode


def test_hf_generate_works_in_every_mode(transformed):
    ref, mm = transformed["llama"]
    ids = _ids(1, 5)
    want = ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for mode in MODES:
        with specq.mode(mm, mode):
            out = mm.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert out.shape == want.shape
        if mode == "bf16":
            assert torch.equal(out, want)


# ------------------------------------------------------------------ unusual and bad input

class _NoMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)

    def forward(self, input_ids):
        return self.emb(input_ids).sum(-1)


class _Odd(nn.Module):
    """Widths that do not fit the default block/group sizes, and custom matmuls with parameters."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 96)
        self.a = nn.Linear(96, 48)  # K=96: INT4 group 128 -> 32, had_block 64 -> 32
        self.b = nn.Linear(48, 64)  # K=48: not a multiple of the MXFP4 block -> kept
        self.c = _RawMatmul(64, 64)  # x @ w, a whole module: quantized with layout in_out
        self.d = _MatmulPlusWork(64)  # x @ w.T then more work inside: kept (cannot swap)

    def forward(self, input_ids):
        return self.d(self.c(self.b(torch.relu(self.a(self.emb(input_ids))))))


class _RawMatmul(nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.w = nn.Parameter(torch.randn(k, n) * 0.1)

    def forward(self, x):
        return x @ self.w


class _MatmulPlusWork(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.w = nn.Parameter(torch.randn(k, k) * 0.1)

    def forward(self, x):
        return torch.tanh(x @ self.w.T) * 2


def test_no_weight_matmul_is_a_clear_error():
    with pytest.raises(ValueError, match="no weight matmul"):
        specq.transform(_NoMatmul(), input_ids=torch.tensor([[1, 2, 3]]))


def test_indivisible_shapes_and_custom_matmuls_are_explicit_decisions():
    torch.manual_seed(0)
    model = _Odd().eval()
    ref = copy.deepcopy(model)
    ids = torch.tensor([[1, 5, 7, 9]])
    specq.transform(model, input_ids=ids)
    plan = {e["module"]: e for e in model.specq_plan["matmuls"]}
    assert set(plan) == {"a", "b", "c", "d"}
    assert plan["a"]["action"] == "quantize" and plan["a"]["int4_group_size"] == 32 and plan["a"]["had_block"] == 32
    assert any("group 32" in n for n in plan["a"]["notes"])
    assert plan["b"]["action"] == "keep" and "MXFP4 block" in plan["b"]["reason"]
    assert plan["c"]["action"] == "quantize" and plan["c"]["layout"] == "in_out"
    assert plan["d"]["action"] == "keep" and "not the whole forward" in plan["d"]["reason"]
    assert isinstance(model.c, MultiModeLinear) and not isinstance(model.b, MultiModeLinear)
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))
        for mode in QUANT:
            with specq.mode(model, mode):
                assert torch.isfinite(model(ids)).all()


def test_bad_arguments():
    m = make_tiny_model("llama")
    with pytest.raises(ValueError, match="unknown mode"):
        specq.transform(m, modes=("bf16", "int8"))
    with pytest.raises(ValueError, match="modes is empty"):
        specq.transform(m, modes=())
    with pytest.raises(ValueError, match="unknown recipe"):
        specq.transform(m, recipe="no-such-recipe")
    with pytest.raises(ValueError, match="not a specq multi-mode model"):
        specq.set_mode(m, "bf16")
    specq.transform(m, modes=("bf16", "mxfp4"), calibration_ids=CALIB)
    with pytest.raises(ValueError, match="already a specq multi-mode model"):
        specq.transform(m)


# ------------------------------------------------------------------ activation-aware MXFP4 scales

def test_weighted_mxfp4_is_a_valid_encoding_that_lowers_weighted_error():
    from specq.transform.calibration import quantize_mxfp4_weighted

    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 128, generator=g, dtype=torch.float64)
    # uniform importance: exactly the formats' own "mse" rule
    p, s = quantize_mxfp4_weighted(w, torch.ones(128, dtype=torch.float64))
    pm, sm = mxfp4.quantize(w, "mse")
    assert torch.equal(p, pm) and torch.equal(s, sm)
    # skewed importance: never worse than floor or mse under the weighted error it minimises
    d = torch.rand(128, generator=g, dtype=torch.float64) ** 4 * 100
    p, s = quantize_mxfp4_weighted(w, d)

    def werr(packed, scales):
        return ((mxfp4.dequantize(packed, scales, torch.float64) - w).square() * d).sum().item()

    e = werr(p, s)
    assert e <= werr(*mxfp4.quantize(w, "floor")) and e <= werr(*mxfp4.quantize(w, "mse"))
    with pytest.raises(ValueError, match="importance"):
        quantize_mxfp4_weighted(w, torch.ones(64))


def test_act_mse_recipe_calibrates_and_matches_reference():
    ref = make_tiny_model("llama")
    rec = {"base": "default", "mxfp4_scale_rule": "act_mse"}
    a = specq.transform(copy.deepcopy(ref), modes=("bf16", "mxfp4"), recipe=rec, calibration_ids=_ids(2, 32, seed=4))
    b = specq.transform(copy.deepcopy(ref), modes=("bf16", "mxfp4"), recipe=rec)  # self-generated calibration
    assert all(e["mxfp4_scale_rule"] == "act_mse" for e in a.specq_plan["matmuls"] if e["action"] == "quantize")
    ids = _ids()
    for mm in (a, b):
        with specq.mode(mm, "mxfp4"):
            got = _logits(mm, ids)
        want = _logits(_reference(ref, mm, "mxfp4"), ids)
        assert (got - want).abs().max().item() <= 2e-4 * (1 + want.abs().max().item())
    with pytest.raises(ValueError, match="no calibration"):
        apply_plan(make_tiny_model("llama"), a.specq_plan, quantize=True)
