"""The torch.compile backend "specq" (specq/backend.py), on CPU with tiny models.

Compiled output equals the eager multi-mode model in the same mode (the independent reference:
specq.transform's own quantization and the eager MultiModeLinear), on plain HF models (quantized on
the fly from the recipe) and on transformed ones (the active mode); compile counts show no
recompiles for repeated calls and exactly one per mode switch. One test goes through inductor.
"""

from __future__ import annotations

import copy

import pytest
import torch

import specq
import specq.backend as backend

MODES = ("bf16", "mxfp4", "w4a16", "w4a4")


@pytest.fixture(scope="module")
def llama():
    from tiny_models import make_tiny_model

    return make_tiny_model("llama", seed=2)


# The backend cannot calibrate (it sees a graph, not a model it can sample text from), so its MXFP4
# uses the data-free "mse" block-exponent rule; the reference is transformed with the same rule.
NO_CALIBRATION = {"name": "default-mse", "base": "default", "mxfp4_scale_rule": "mse"}


@pytest.fixture(scope="module")
def llama_mm(llama):
    return specq.transform(copy.deepcopy(llama), modes=MODES, recipe=NO_CALIBRATION)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def eager_logits(mm, ids, mode):
    with torch.no_grad(), specq.mode(mm, mode):
        return mm(ids, use_cache=False).logits


def test_registered_by_name():
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("specq") is backend.specq_backend
    assert "specq" in torch._dynamo.list_backends()
    backend.register()  # idempotent
    assert lookup_backend("specq") is backend.specq_backend


def test_entry_point_declared():
    from importlib.metadata import entry_points

    eps = entry_points(group="torch_dynamo_backends")
    assert "specq" in eps.names
    assert eps["specq"].value == "specq.backend:specq_backend"


@pytest.mark.parametrize("mode", ["w4a16"])  # mxfp4: the inductor test; w4a4: the GPT-2 test
def test_plain_model_quantized_on_the_fly(llama, llama_mm, ids, mode):
    """A plain HF model compiled with options={"mode": m} computes what the transformed model
    computes in mode m; a repeated call recompiles nothing; a new shape does not re-quantize."""
    torch._dynamo.reset()
    backend.stats.reset()
    fast = torch.compile(llama, backend="specq", options={"mode": mode, "inner": "aot_eager"})
    with torch.no_grad():
        out = fast(ids, use_cache=False).logits
        again = fast(ids, use_cache=False).logits
    planned = sum(e["action"] == "quantize" for e in llama_mm.specq_plan["matmuls"])
    assert backend.stats.graphs == 1 and backend.stats.rewrites == planned == backend.stats.quantized
    ref = eager_logits(llama_mm, ids, mode)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert torch.equal(again, out)
    with torch.no_grad():
        fast(ids[:, :7], use_cache=False)  # new shape: a recompile, the packed weights are reused
    assert backend.stats.graphs == 2 and backend.stats.quantized == planned
    # the compiled model itself is left as it was: plain nn.Linear modules, no mode holder
    from specq.transform.modes import STATE_ATTR

    assert STATE_ATTR not in llama.__dict__
    assert type(llama.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_bf16_mode_rewrites_nothing(llama, ids):
    torch._dynamo.reset()
    backend.stats.reset()
    fast = torch.compile(llama, backend="specq", options={"inner": "eager"})
    with torch.no_grad():
        out = fast(ids, use_cache=False).logits
        ref = llama(ids, use_cache=False).logits
    assert backend.stats.rewrites == 0 and backend.stats.by_mode == {"bf16": 1}
    assert torch.equal(out, ref)


def test_dense_gemv_routing_forced_on_cpu(llama):
    """options["dense_gemv"]=True routes every linear of a one-token bf16 forward to specq.linear_dense
    (on the CPU the op is F.linear, so the logits are identical); "auto" does nothing off CUDA."""
    model = copy.deepcopy(llama).to(torch.bfloat16)
    one = torch.randint(3, 256, (1, 1), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(one, use_cache=False).logits
        for option, routed in ((True, 7 * model.config.num_hidden_layers + 1), ("auto", 0)):
            torch._dynamo.reset()
            backend.stats.reset()
            out = torch.compile(model, backend="specq", options={"inner": "eager", "dense_gemv": option})(
                one, use_cache=False).logits
            assert backend.stats.dense_routed == routed
            assert torch.equal(out, ref)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="dense_gemv"):
        torch.compile(model, backend="specq", options={"dense_gemv": "yes"})(one, use_cache=False)
    torch._dynamo.reset()


def test_transformed_model_follows_active_mode(llama_mm, ids):
    """On a multi-mode model, set_mode switches the compiled graph: one compile per mode, none when
    switching back; each mode's output equals its eager output."""
    torch._dynamo.reset()
    backend.stats.reset()
    fast = torch.compile(llama_mm, backend="specq", options={"inner": "aot_eager"})
    outs = {}
    try:
        for mode in ("w4a4", "mxfp4", "w4a4", "mxfp4"):
            specq.set_mode(llama_mm, mode)
            with torch.no_grad():
                outs.setdefault(mode, []).append(fast(ids, use_cache=False).logits)
    finally:
        specq.set_mode(llama_mm, "bf16")
    assert backend.stats.graphs == 2
    assert backend.stats.by_mode == {"w4a4": 1, "mxfp4": 1}
    assert backend.stats.rewrites == 0  # the graph already holds specq ops
    for mode, got in outs.items():
        ref = eager_logits(llama_mm, ids, mode)
        for g in got:
            torch.testing.assert_close(g, ref, rtol=0, atol=1e-5)


def test_gpt2_conv1d_addmm(ids):
    """GPT-2's Conv1D (addmm with a [in, out] weight) is found and rewritten too."""
    from tiny_models import make_tiny_model

    gpt2 = make_tiny_model("gpt2", seed=3)
    mm = specq.transform(copy.deepcopy(gpt2), modes=("bf16", "w4a4"), recipe=NO_CALIBRATION)
    torch._dynamo.reset()
    backend.stats.reset()
    fast = torch.compile(gpt2, backend="specq", options={"mode": "w4a4", "inner": "aot_eager"})
    with torch.no_grad():
        out = fast(ids, use_cache=False).logits
    assert backend.stats.rewrites == sum(e["action"] == "quantize" for e in mm.specq_plan["matmuls"]) > 0
    torch.testing.assert_close(out, eager_logits(mm, ids, "w4a4"), rtol=0, atol=1e-5)


def test_inductor_on_cpu(llama, llama_mm, ids):
    """The default inner compiler is inductor: the rewritten graph (specq ops as extern calls, packed
    weights as constants) compiles and matches eager in that mode to float32 rounding."""
    torch._dynamo.reset()
    backend.stats.reset()
    fast = torch.compile(llama, backend="specq", options={"mode": "mxfp4"})
    with torch.no_grad():
        out = fast(ids, use_cache=False).logits
        fast(ids, use_cache=False)
    assert backend.stats.graphs == 1
    torch.testing.assert_close(out, eager_logits(llama_mm, ids, "mxfp4"), rtol=1e-4, atol=1e-4)


def test_bad_options_are_refused(llama, llama_mm, ids):
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown option"):
        torch.compile(llama, backend="specq", options={"modee": "mxfp4"})(ids, use_cache=False)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown mode"):
        torch.compile(llama, backend="specq", options={"mode": "int3"})(ids, use_cache=False)
    torch._dynamo.reset()
    specq.set_mode(llama_mm, "w4a4")
    try:
        with pytest.raises(Exception, match="set_mode"):
            torch.compile(llama_mm, backend="specq", options={"mode": "mxfp4", "inner": "eager"})(
                ids, use_cache=False)
    finally:
        specq.set_mode(llama_mm, "bf16")
