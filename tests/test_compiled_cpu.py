"""The CPU recipe of compiled steps (specq/runtime/compiled_cpu.py): frozen inductor graphs with the specq
ops decomposed, grouped-query SDPA, skipped module guards. Tiny models; each inductor compile of a
tiny model takes a few seconds, so graphs are shared by module-scoped fixtures where possible."""

from __future__ import annotations

import copy

import pytest
import torch

from specq.runtime.attention import grouped_sdpa
from specq.runtime.compiled import CompiledSteps, compiled_generate, make_static_cache

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU recipe; CUDA uses CUDA graphs")

PROMPT_LEN = 10
NEW = 12
MSE = {"name": "default-mse", "base": "default", "mxfp4_scale_rule": "mse"}  # no calibration sampling


def hf_greedy(model, ids, new=NEW):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0,
                              attention_mask=torch.ones_like(ids))


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(3, 256, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(0))


def _multimode(dtype, seed=1):
    import specq
    from tiny_models import make_tiny_model

    return specq.transform(make_tiny_model("llama", dtype=dtype, seed=seed),
                           modes=("bf16", "w4a16", "w4a4"), recipe=MSE)


@pytest.fixture(scope="module")
def mm_fp32():
    return _multimode(torch.float32)


@pytest.fixture(scope="module")
def mm_bf16():
    return _multimode(torch.bfloat16)


# ------------------------------------------------------------------ grouped-query SDPA

def _attention(q, k, v, mask):
    """float64 attention with K/V repeated per query head (repeat_kv's order), the independent reference."""
    g = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(g, dim=1) for t in (k, v))
    s = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def test_grouped_sdpa_matches_float64_and_folds_the_heads(monkeypatch):
    from specq.runtime.attention import grouped_sdpa_attention_forward

    seen = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **kw: seen.append(tuple(q.shape)) or real(q, *a, **kw))
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, 16, generator=g).bfloat16() for h, n in ((6, 4), (2, 20), (2, 20)))
    mask = (torch.arange(20)[None, :] <= (12 + torch.arange(4))[:, None]).view(1, 1, 4, 20)
    out, _ = grouped_sdpa_attention_forward(module, q, k, v, mask)
    assert seen == [(1, 2, 12, 16)]  # 2 key/value heads, 3 query heads x 4 queries each
    torch.testing.assert_close(out.double(), _attention(q, k, v, mask), rtol=2e-2, atol=2e-2)
    seen.clear()
    grouped_sdpa_attention_forward(module, q.float(), k.float(), v.float(), mask)
    assert seen == [(1, 6, 4, 16)]  # float32 is not folded (its kernel's sums depend on the row count)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_grouped_sdpa_gives_the_same_bits_in_a_model(dtype):
    """Folded heads compute every output exactly as transformers' sdpa path: equal logits, bit for bit,
    for a prefill, one token and a verify block, on the static cache the compiled steps use."""
    from tiny_models import make_tiny_model

    model = make_tiny_model("llama", dtype=dtype, seed=3)
    ids = torch.randint(3, 256, (1, 16), generator=torch.Generator().manual_seed(1))

    def run():
        steps = CompiledSteps(model, make_static_cache(model, 1, 64), compile=None)
        return [steps.logits(ids[:, :10], 0).clone(), steps.logits(ids[:, 10:11], 10).clone(),
                steps.logits(ids[:, 11:16], 11).clone()]

    plain = run()
    with grouped_sdpa(model):
        assert model.config._attn_implementation != "sdpa"
        folded = run()
    assert model.config._attn_implementation == "sdpa"  # restored
    for a, b in zip(plain, folded):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ frozen inductor steps

@pytest.mark.parametrize("levels,gamma,target", [
    (["bf16"], 1, "bf16"),
    (["ngram", "w4a16", "bf16"], [2, 3], "bf16"),
    (["w4a4", "w4a16"], 3, "w4a16"),
])
def test_frozen_steps_are_lossless_in_float32(mm_fp32, prompt, levels, gamma, target):
    import specq

    with specq.mode(mm_fp32, target):
        ref = hf_greedy(mm_fp32, prompt)
    out = compiled_generate(mm_fp32, prompt, NEW, levels=levels, gamma=gamma, eos_token_id=[], compile="inductor")
    assert torch.equal(out.sequences, ref)


def test_frozen_int4_steps_run_the_kernel_without_python(mm_bf16, prompt):
    """bf16 w4a16 on frozen steps: the specq op is decomposed (never dispatched at run time) into aten's
    int4pack matmul, and the logits stay within bf16 rounding of the eager op's."""
    import specq
    from torch.profiler import ProfilerActivity, profile

    steps = CompiledSteps(mm_bf16, make_static_cache(mm_bf16, 2, 64), compile="inductor")
    ids = prompt[:, :4]
    steps.logits(ids, 0, mode="w4a16")  # compile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = steps.logits(ids, 0, mode="w4a16").clone()
    names = {e.key for e in prof.key_averages()}
    assert any("_weight_int4pack_mm_for_cpu" in n for n in names)
    assert not any(n.startswith("specq::") for n in names)
    with torch.no_grad(), specq.mode(mm_bf16, "w4a16"):
        want = mm_bf16(ids).logits
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)


def test_modes_are_guarded_without_module_guards(mm_bf16, prompt):
    """The CPU recipe skips dynamo's guards on the model's modules (where the active mode lives); the
    step's mode argument must still pick the graph: one compile per mode, none when switching back."""
    steps = CompiledSteps(mm_bf16, make_static_cache(mm_bf16, 2, 64), compile="inductor")
    ids = prompt[:, :1]
    a = steps.logits(ids, 5, mode="bf16").clone()
    b = steps.logits(ids, 5, mode="w4a16").clone()
    assert steps.compile_count == 2
    assert not torch.equal(a, b)
    assert torch.equal(steps.logits(ids, 5, mode="bf16"), a)
    assert steps.compile_count == 2


def test_two_models_never_share_frozen_graphs(prompt):
    """Frozen graphs hold their model's weights and skip module guards: a second model with the same
    shapes must get its own graphs, not the first model's constants, even when both are compiled with
    the same backend object."""
    from tiny_models import make_tiny_model

    from specq.runtime.compiled import forward_step
    from specq.runtime.compiled_cpu import frozen_step

    backend = torch._dynamo.lookup_backend("inductor")
    ids = prompt[:1, :3]
    outs = []
    for seed in (5, 6):
        model = make_tiny_model("llama", seed=seed)
        step = frozen_step(forward_step, model, backend)
        with torch.no_grad():
            got, _ = step(model, make_static_cache(model, 1, 32), ids, torch.tensor(0), "bf16")
            torch.testing.assert_close(got, model(ids).logits, rtol=1e-4, atol=1e-4)
        outs.append(got)
    assert not torch.allclose(outs[0], outs[1])


def test_deepcopy_and_explicit_freeze_flag(mm_fp32):
    with pytest.raises(ValueError, match="freeze=True needs compile='inductor'"):
        CompiledSteps(mm_fp32, make_static_cache(mm_fp32, 1, 16), compile="eager", freeze=True)
    steps = CompiledSteps(mm_fp32, make_static_cache(mm_fp32, 1, 16), compile="inductor", freeze=False)
    assert not steps.freeze
    assert copy.deepcopy(steps) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mxfp4_weight_of_the_cpu_decomposition_is_exact(dtype):
    """The MXFP4 decomposition's dequantizer (built from the packed bytes alone, so that freezing can
    fold it) gives mxfp4.dequantize's values bit for bit, signed zeros and NaN blocks included."""
    from specq.formats import mxfp4
    from specq.kernels.inductor_cpu import mxfp4_weight

    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (48, 64), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 256, (48, 4), dtype=torch.uint8, generator=g)
    scales[0] = torch.tensor([0, 0xFF, 254, 127], dtype=torch.uint8)  # subnormal, NaN, overflow, 1.0
    got, want = mxfp4_weight(packed, scales, dtype), mxfp4.dequantize(packed, scales, dtype)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got.isnan(), want.isnan()) and got[0, 32:64].isnan().all()
    ok = ~want.isnan()
    assert torch.equal(got[ok], want[ok]) and torch.equal(got[ok].signbit(), want[ok].signbit())
