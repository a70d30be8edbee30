"""W4A4 scale levels: group scales snapped to integer multiples of a per-row unit (int4.snap_scales), the
linear_w4a4 op's ``scale_levels`` argument, and the recipe key ``w4a4_scale_levels`` through plan,
transform, fused graphs and checkpoints. References: float64 brute force and float64 matmuls; the
Triton kernel of the integer path is checked in the interpreter (tests/test_triton_kernels.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import specq
from specq.formats import activation, hadamard, int4
from specq.kernels import cpu_int4, ops
from specq.passes.plan import load_recipe
from specq.transform.multimode_linear import MultiModeLinear
from specq.transform.transform import multimode_linears
from tiny_models import make_tiny_model


def _scales(n=9, g=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = (torch.rand(n, g, generator=gen) * torch.rand(n, 1, generator=gen) * 0.1).to(torch.bfloat16)
    s[3] = 0  # an all-zero row
    s[4, 1:] = 0  # one nonzero group
    s[5, 2] = 0
    return s


@pytest.mark.parametrize("levels", [16, 9, 1])
def test_snap_scales_is_the_nearest_multiple_of_the_row_unit(levels):
    s = _scales()
    lv, unit = int4.snap_scales(s, levels)
    assert lv.dtype == torch.uint8 and unit.dtype == torch.float32
    assert lv.shape == s.shape and unit.shape == (s.shape[0],)
    s64, u64 = s.double(), unit.double()[:, None]
    # brute force over every level 0..L: ours is the nearest (ties aside)
    cand = torch.arange(levels + 1, dtype=torch.float64) * u64[..., None]  # [N, 1, L+1]
    best = (cand - s64[..., None]).abs().min(-1).values
    assert torch.all((lv.double() * u64 - s64).abs() <= best + 1e-12 * s64.abs().max())
    nonzero = s64.amax(1) > 0
    assert torch.all(lv.amax(1)[nonzero] == levels)  # the largest group gets every level
    assert torch.all(lv[~nonzero] == 0) and torch.all(unit[~nonzero] == 0)
    # the unit is the row maximum / levels to UNIT_BITS significant bits, so level * unit is exact in fp32
    rel = (u64.squeeze(1)[nonzero] - s64.amax(1)[nonzero] / levels).abs() / (s64.amax(1)[nonzero] / levels)
    assert torch.all(rel <= 2.0 ** -int4.UNIT_BITS)
    mant, _ = torch.frexp(unit.double())
    assert torch.equal(mant * 2 ** int4.UNIT_BITS, torch.round(mant * 2 ** int4.UNIT_BITS))
    snapped = int4.snapped_scales(s, levels)
    assert snapped.dtype == torch.float32
    assert torch.equal(snapped.double(), lv.double() * u64)


def test_snap_scales_rejects_bad_input_with_the_fix():
    s = _scales()
    for bad in (0, 17, True, 2.0):
        with pytest.raises(ValueError, match="levels must be an int in 1..16"):
            int4.snap_scales(s, bad)
    with pytest.raises(ValueError, match="finite and >= 0"):
        int4.snap_scales(-s.float(), 16)
    with pytest.raises(ValueError, match="finite and >= 0"):
        int4.snapped_scales(torch.full((2, 3), float("nan")), 16)
    with pytest.raises(TypeError, match="2-D floating-point"):
        int4.snap_scales(s[0], 16)
    with pytest.raises(TypeError, match="2-D floating-point"):
        int4.snap_scales(s.to(torch.int32), 16)


@pytest.mark.parametrize("levels", [16, 5])
def test_activation_levels_match_float64(levels):
    """Activation groups with scale levels against float64: t = token amax / 7 / levels, v = round(group
    scale / t), codes = clamp(round(x * fl(1 / (v t))), -8, 7); the int8 values are code * v; fake = code * v * t."""
    gen = torch.Generator().manual_seed(levels)
    x = torch.randn(4, 3, 256, generator=gen) * torch.rand(4, 3, 8, 1, generator=gen).repeat_interleave(
        32, -1).reshape(4, 3, 256) * 5
    x[1, 2] = 0  # an all-zero token
    values, unit = activation.quantize_int4_levels(x, 32, levels)
    assert values.dtype == torch.int8 and unit.shape == (4, 3, 1)
    x64 = x.double().reshape(4, 3, 8, 32)
    gs = (x64.abs().amax(-1) / 7).float().double()  # group scales, rounded to float32 as the kernels hold them
    t = (gs.amax(-1, keepdim=True) / levels).float().double()
    v = torch.where(t > 0, torch.round(gs / torch.where(t > 0, t, 1.0)), 0.0).clamp(0, levels)
    snapped = (v * t).float().double()
    inv = (1.0 / torch.where(snapped > 0, snapped, 1.0)).float().double()  # the reciprocal, rounded to float32
    code = torch.where(snapped[..., None] > 0, torch.round((x64 * inv[..., None]).float().double()),
                       0.0).clamp(-8, 7)
    assert torch.equal(values.double(), (code * v[..., None]).reshape(4, 3, 256))
    assert torch.equal(unit.double(), t)
    assert int(values.abs().max()) <= 8 * levels and torch.all(v.amax(-1)[t.squeeze(-1) > 0] == levels)
    fake = activation.fake_quantize_int4(x, 32, levels)
    assert torch.allclose(fake.double(), (code * snapped[..., None]).reshape(4, 3, 256), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="per-token scales"):
        activation.fake_quantize_int4(x, 0, 16)
    with pytest.raises(ValueError, match="levels must be an int in 0..16"):
        activation.fake_quantize_int4(x, 32, 17)


def _weights(n=48, k=256, group=64, seed=3):
    gen = torch.Generator().manual_seed(seed)
    # group magnitudes that differ along a row, so snapping moves them
    w = torch.randn(n, k, generator=gen) * torch.rand(n, k // group, 1, generator=gen).repeat_interleave(
        group, 2).reshape(n, k)
    return int4.quantize(w, group)


@pytest.mark.parametrize("act_group,had_block", [(0, 64), (32, 0)])
def test_w4a4_op_with_scale_levels_matches_float64(act_group, had_block):
    p, s = _weights()
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    b = torch.randn(48, generator=torch.Generator().manual_seed(2))
    got = ops.linear_w4a4(x, p, s, b, act_group_size=act_group, had_block=had_block, scale_levels=16)
    xr = hadamard.hadamard_transform(x.double(), had_block) if had_block else x.double()
    xq = activation.fake_quantize_int4(xr.float(), act_group, 16 if act_group else 0).double()
    want = xq @ int4.dequantize(p, int4.snapped_scales(s, 16).double()).T + b.double()
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    plain = ops.linear_w4a4(x, p, s, b, act_group_size=act_group, had_block=had_block)
    assert not torch.allclose(plain, got)  # the levels really change the weights
    with pytest.raises(ValueError, match=r"scale_levels \(17\) must be 0"):
        ops.linear_w4a4(x, p, s, b, scale_levels=17)
    # gradients flow to x through the snapped weight (straight-through activation quantizer)
    xg = x.clone().requires_grad_(True)
    ops.linear_w4a4(xg, p, s, None, act_group_size=act_group, scale_levels=16).sum().backward()
    w_snapped = int4.dequantize(p, int4.snapped_scales(s, 16))
    assert torch.allclose(xg.grad, w_snapped.sum(0).expand(5, -1), atol=1e-5)


@pytest.mark.skipif(not cpu_int4.enabled(), reason="aten's CPU int4pack kernels are not available")
def test_cpu_int4_kernel_keeps_w4a16_and_snapped_w4a4_weights_apart():
    """The two modes share one packed copy; their repacked CPU weights must not be mixed up in the cache."""
    p, s = _weights()
    s = s.to(torch.bfloat16)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    w16 = ops.linear_w4a16(x, p, s)
    w4 = ops.linear_w4a4(x, p, s, act_group_size=32, scale_levels=16)
    ref4 = ops.reference_w4a4(x, p, s, None, 32, 0, 16)
    assert (w4.float() - ref4.float()).abs().max() <= 2e-2 * ref4.float().abs().max()
    assert torch.equal(ops.linear_w4a16(x, p, s), w16)  # W4A16 still reads the stored scales
    assert torch.equal(ops.linear_w4a4(x, p, s, act_group_size=32, scale_levels=16), w4)


def test_recipe_key_reaches_the_plan_the_modules_and_the_graph(tmp_path):
    ref = make_tiny_model("llama")
    rec = load_recipe("default") | {"w4a4_scale_levels": 16}
    mm = specq.transform(copy.deepcopy(ref), modes=("w4a16", "w4a4"), recipe=rec)
    quantized = [e for e in mm.specq_plan["matmuls"] if e["action"] == "quantize"]
    assert quantized and all(e["w4a4_scale_levels"] == 16 for e in quantized)
    mods = [m for _, m in multimode_linears(mm)]
    assert mods and all(m.w4a4_scale_levels == 16 for m in mods)
    assert "w4a4_scale_levels=16" in repr(mods[0])
    # the W4A4 forward uses the snapped scales, W4A16 the stored ones
    m = mods[0]
    x = torch.randn(2, m.in_features)
    with specq.mode(mm, "w4a4"):
        got = m(x)
    want = ops.reference_w4a4(x, m.int4_packed, m.int4_scales, m.bias, m.act_group_size, m.had_block, 16)
    assert torch.equal(got, want)
    # a checkpoint keeps the setting (the plan travels with it) and says so in its format metadata
    specq.save_pretrained(mm, tmp_path / "ckpt")
    back = specq.from_pretrained(tmp_path / "ckpt")
    assert all(m.w4a4_scale_levels == 16 for _, m in multimode_linears(back))
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), specq.mode(mm, "w4a4"), specq.mode(back, "w4a4"):
        assert torch.equal(mm(input_ids=ids).logits, back(input_ids=ids).logits)
    fmt = back.config.quantization_config
    fmt = fmt if isinstance(fmt, dict) else fmt.to_dict()
    assert fmt["formats"]["w4a4"]["scale_levels"] == [16]


def test_default_recipe_snaps_to_16_levels_0_keeps_the_stored_scales_and_bad_values_are_refused():
    mm = specq.transform(make_tiny_model("llama"), modes=("w4a4",))
    assert all(m.w4a4_scale_levels == 16 for _, m in multimode_linears(mm))
    assert all(e["w4a4_scale_levels"] == 16 for e in mm.specq_plan["matmuls"] if e["action"] == "quantize")
    mm = specq.transform(make_tiny_model("llama"), modes=("w4a4",), w4a4_scale_levels=0)
    assert all(m.w4a4_scale_levels == 0 for _, m in multimode_linears(mm))
    assert all("w4a4_scale_levels" not in e for e in mm.specq_plan["matmuls"])
    for bad in (17, -1, "16", True):
        with pytest.raises(ValueError, match="w4a4_scale_levels must be an int in 0..16"):
            specq.transform(make_tiny_model("llama"), modes=("w4a4",),
                            recipe=load_recipe("default") | {"w4a4_scale_levels": bad})


def test_fused_sibling_graph_keeps_scale_levels():
    """fuse_siblings concatenates rows of packed weights and scales; snapping is per row, so the fused
    matmul equals the separate ones."""
    from specq.passes.fuse_siblings import fuse_sibling_linears

    p1, s1 = _weights(seed=5)
    p2, s2 = _weights(seed=6)

    class Two(torch.nn.Module):
        def forward(self, x, p1, s1, p2, s2):
            a = torch.ops.specq.linear_w4a4(x, p1, s1, None, 64, 0, 64, 16)
            b = torch.ops.specq.linear_w4a4(x, p2, s2, None, 64, 0, 64, 16)
            return a + 1, b * 2

    gm = torch.fx.symbolic_trace(Two())
    args = (torch.randn(3, 256), p1, s1, p2, s2)
    for node, t in zip([n for n in gm.graph.nodes if n.op == "placeholder"], args):
        node.meta["val"] = t  # what dynamo's graphs carry
    want = gm(*args)
    gm, fused = fuse_sibling_linears(gm, example_inputs=list(args))
    assert fused == 1
    got = gm(*args)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-5)


def test_transform_argument_overrides_the_recipe():
    mm = specq.transform(make_tiny_model("llama"), modes=("w4a4",), w4a4_scale_levels=9)
    assert all(m.w4a4_scale_levels == 9 for _, m in multimode_linears(mm))
    with pytest.raises(ValueError, match="specq.transform: w4a4_scale_levels must be an int in 0..16"):
        specq.transform(make_tiny_model("llama"), modes=("w4a4",), w4a4_scale_levels=20)


def test_gpu_backend_level_cache_is_keyed_by_storage_not_object():
    """Compiled steps pass fused sibling weights as fresh views of one storage on every call: the derived
    levels must be found again for a new view object of the same scales, and recomputed once the scales are
    written in place. (The CUDA backend's use of dequant_cache.cached_by_storage; plain torch, so it runs here.)"""
    pytest.importorskip("triton")
    from specq.kernels import triton_backend

    _, s = _weights()
    base = s.clone()
    first = triton_backend._snapped_levels(base[:24], 16)
    again = triton_backend._snapped_levels(base.as_strided((24, s.shape[1]), base.stride()), 16)
    assert again is first  # the same cached tensors for a new view object
    lv, unit = first
    assert torch.equal(lv, int4.snap_scales(base[:24], 16)[0]) and torch.equal(unit, int4.snap_scales(base[:24], 16)[1])
    base[:24] *= 2  # written in place: derived again
    fresh = triton_backend._snapped_levels(base[:24], 16)
    assert fresh is not first and torch.equal(fresh[1], int4.snap_scales(base[:24], 16)[1])
    snapped = triton_backend._snapped_scales(base[:24], 16, torch.bfloat16)
    assert snapped.dtype == torch.bfloat16 and torch.equal(snapped, int4.snapped_scales(base[:24], 16).bfloat16())
