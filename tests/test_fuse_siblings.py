"""The sibling-linear fusion pass (specq/passes/fuse_siblings.py): q/k/v and gate/up become one matmul
and a split, with the same numbers; nodes that differ in anything but their weights stay apart."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import specq.kernels.ops  # noqa: F401  (registers the specq ops)
from specq.formats import int4
from specq.passes.fuse_siblings import fuse_sibling_linears

LINEAR = torch._C._nn.linear
W4A16 = torch.ops.specq.linear_w4a16.default


class _Weights(torch.nn.Module):
    """Holds the tensors a hand-built graph reads with get_attr."""

    def __init__(self, **tensors):
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t)


def _graph(weights: _Weights, calls) -> fx.GraphModule:
    """calls: [(target, input index, [weight names], extra args)]; each get_attr is placed right before
    its first use, as dynamo places them when inductor freezing is on."""
    g = fx.Graph()
    xs = [g.placeholder("x0"), g.placeholder("x1")]
    outs = []
    for target, xi, names, extra in calls:
        attrs = [g.get_attr(n) for n in names]
        outs.append(g.call_function(target, (xs[xi], *attrs, *extra)))
    g.output(tuple(outs))
    return fx.GraphModule(weights, g)


def _int4(n, k, group, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return int4.quantize(w, group)


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def test_linears_sharing_an_input_become_one_with_the_same_numbers():
    gen = torch.Generator().manual_seed(0)
    w = {f"w{i}": torch.randn(n, 32, generator=gen, dtype=torch.float64) for i, n in enumerate((16, 8, 8, 24))}
    b = {f"b{i}": torch.randn(n, generator=gen, dtype=torch.float64) for i, n in enumerate((16, 8))}
    calls = [(LINEAR, 0, ["w0"], [None]), (LINEAR, 0, ["w1"], [None]), (LINEAR, 0, ["w2"], [None]),
             (LINEAR, 1, ["w3"], [None]),                                   # another input: alone
             (LINEAR, 1, ["w0", "b0"], []), (LINEAR, 1, ["w1", "b1"], [])]  # with biases: a pair
    gm = _graph(_Weights(**w, **b), calls)
    x0, x1 = (torch.randn(3, 32, generator=gen, dtype=torch.float64) for _ in range(2))
    want = gm(x0, x1)
    gm, fused = fuse_sibling_linears(gm)
    assert fused == 2
    assert _count(gm, LINEAR) == 3  # {w0,w1,w2} on x0, w3 on x1, {w0+b0, w1+b1} on x1
    got = gm(x0, x1)
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-12)


def test_int4_siblings_fuse_only_with_equal_settings():
    p0, s0 = _int4(32, 128, 64, 1)
    p1, s1 = _int4(16, 128, 64, 2)
    p2, s2 = _int4(16, 128, 32, 3)  # another group size
    weights = _Weights(p0=p0, s0=s0, p1=p1, s1=s1, p2=p2, s2=s2)
    calls = [(W4A16, 0, ["p0", "s0"], [None, 64, 64]), (W4A16, 0, ["p1", "s1"], [None, 64, 64]),
             (W4A16, 0, ["p2", "s2"], [None, 32, 64]),    # group 32: not with the others
             (W4A16, 0, ["p1", "s1"], [None, 64, 0])]     # no rotation: not with the others
    gm = _graph(weights, calls)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(4))
    want = gm(x, x)
    gm, fused = fuse_sibling_linears(gm)
    assert fused == 1
    assert _count(gm, W4A16) == 3
    got = gm(x, x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_mixed_biases_and_keyword_calls_are_left_alone():
    gen = torch.Generator().manual_seed(5)
    weights = _Weights(w0=torch.randn(8, 16, generator=gen), w1=torch.randn(8, 16, generator=gen),
                       b0=torch.randn(8, generator=gen))
    gm = _graph(weights, [(LINEAR, 0, ["w0", "b0"], []), (LINEAR, 0, ["w1"], [None])])
    assert fuse_sibling_linears(gm)[1] == 0
    g = fx.Graph()
    x = g.placeholder("x")
    a, b = g.get_attr("w0"), g.get_attr("w1")
    g.output((g.call_function(LINEAR, (x,), {"weight": a}), g.call_function(LINEAR, (x,), {"weight": b})))
    assert fuse_sibling_linears(fx.GraphModule(weights, g))[1] == 0


@pytest.mark.parametrize("mode", ["bf16", "w4a16"])
def test_a_tiny_llama_graph_fuses_qkv_and_gate_up(mode):
    """On dynamo's graph of a transformed tiny llama: two groups per layer (q/k/v, gate/up), logits as
    before (float32; the fused graph runs uncompiled, so only the matmul shapes differ)."""
    import specq
    from tiny_models import make_tiny_model

    model = specq.transform(make_tiny_model("llama", seed=2), modes=("bf16", "w4a16"),
                            recipe={"name": "mse", "base": "default", "mxfp4_scale_rule": "mse"})
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(6))
    seen = []

    def backend(gm, example_inputs):
        gm, fused = fuse_sibling_linears(gm)
        seen.append(fused)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad(), specq.mode(model, mode):
        want = model(ids).logits
        got = torch.compile(model, backend=backend, fullgraph=True)(ids).logits
    torch._dynamo.reset()
    assert seen == [2 * model.config.num_hidden_layers]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ shared storage (the CUDA route)

def _tiny_multimode(seed=2):
    import specq
    from tiny_models import make_tiny_model

    return specq.transform(make_tiny_model("llama", seed=seed), modes=("bf16", "mxfp4", "w4a16"),
                           recipe={"name": "mse", "base": "default", "mxfp4_scale_rule": "mse"})


def test_siblings_rehomed_into_one_storage_are_fused_as_views():
    """Without freezing, CompiledSteps re-homes q/k/v and gate/up into one tensor per attribute (same
    values) and the pass reads each group as one as_strided view: no torch.cat in any graph, logits as
    the untouched eager model's in every mode."""
    import specq
    from specq.runtime.compiled import CompiledSteps, make_static_cache

    model = _tiny_multimode()
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(7))
    want = {}
    for mode in ("bf16", "mxfp4", "w4a16"):
        with torch.no_grad(), specq.mode(model, mode):
            want[mode] = model(ids).logits
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    steps = CompiledSteps(model, make_static_cache(model, 1, 32), compile=inner)
    layers = model.config.num_hidden_layers
    assert steps.sibling_groups == 2 * layers
    attn = model.model.layers[0].self_attn
    for name in ("weight", "int4_packed", "int4_scales", "mxfp4_packed", "mxfp4_scales"):
        q, k, v = (getattr(getattr(attn, p), name) for p in ("q_proj", "k_proj", "v_proj"))
        assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
        assert k.storage_offset() == q.numel() and v.storage_offset() == q.numel() + k.numel()
    for mode in ("bf16", "mxfp4", "w4a16"):
        got = steps.logits(ids, 0, mode)
        torch.testing.assert_close(got, want[mode], rtol=1e-5, atol=1e-5)
    assert len(graphs) == 3
    for gm in graphs:
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        weight_cats = [n for n in calls if n.target is torch.cat
                       and any(a.op in ("placeholder", "get_attr") for a in n.args[0])]
        assert weight_cats == []  # the model's own cats (rotary embedding) read activations
        assert sum(n.target is torch.as_strided for n in calls) >= 2 * layers


def test_tied_tensors_are_not_rehomed():
    from specq.runtime.sibling_storage import share_sibling_storage

    a, b = torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(8, 4, bias=False)
    model = torch.nn.ModuleDict({"a": a, "b": b, "tied": torch.nn.Linear(8, 4, bias=False)})
    model["tied"].weight = a.weight
    assert share_sibling_storage(model, [["a", "b"]]) == 0
    assert a.weight.untyped_storage().data_ptr() != b.weight.untyped_storage().data_ptr()
    del model["tied"]
    before = (a.weight.clone(), b.weight.clone())
    assert share_sibling_storage(model, [["a", "b"]]) == 1
    assert a.weight.untyped_storage().data_ptr() == b.weight.untyped_storage().data_ptr()
    assert torch.equal(a.weight, before[0]) and torch.equal(b.weight, before[1])
    assert share_sibling_storage(model, [["a", "b"]]) == 1  # already one storage: nothing copied
