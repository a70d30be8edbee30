"""The decode-time ops of the compiled CUDA steps, on the CPU: `specq.linear_dense` with its routing
pass (specq.passes.dense_gemv) and `specq.decode_attention` with its routing from the grouped SDPA
attention function (specq.runtime.attention). On the CPU both ops are their references (F.linear,
SDPA over repeated K/V), so these tests check the graph rewrite, the layouts, the masks transformers
builds, and the references against float64; the Triton kernels are checked in test_triton_kernels.py
(interpreter and GPU)."""

from __future__ import annotations

import pytest
import torch

import specq.kernels.ops  # noqa: F401  (defines torch.ops.specq.*)
from specq.kernels import attention_op
from specq.passes.dense_gemv import route_small_linears


def _count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def _llama(dtype=torch.bfloat16, seed=3):
    from tiny_models import make_tiny_model

    return make_tiny_model("llama", dtype=dtype, seed=seed)


@pytest.mark.parametrize("tokens,dtype,expect_all", [(1, torch.bfloat16, True), (4, torch.bfloat16, True),
                                                      (5, torch.bfloat16, False), (1, torch.float32, False)])
def test_small_linears_are_routed_to_the_dense_op(tokens, dtype, expect_all):
    """Every linear of a tiny llama's dynamo graph (7 per layer + lm_head) is routed at <= 4 rows of
    bf16 x, none at 5 rows or in float32; the logits are unchanged (on the CPU the op is F.linear)."""
    model = _llama(dtype)
    ids = torch.randint(3, 256, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    seen = []

    def backend(gm, example_inputs):
        gm, routed = route_small_linears(gm)
        seen.append((routed, _count(gm, torch.ops.specq.linear_dense.default)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, backend=backend, fullgraph=True)(ids).logits
    torch._dynamo.reset()
    n_linear = 7 * model.config.num_hidden_layers + 1
    assert seen == ([(n_linear, n_linear)] if expect_all else [(0, 0)])
    assert torch.equal(got, want)


def test_dense_op_is_f_linear_and_checks_shapes():
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    w = torch.randn(5, 16, dtype=torch.bfloat16)
    b = torch.randn(5, dtype=torch.bfloat16)
    assert torch.equal(torch.ops.specq.linear_dense(x, w, b), torch.nn.functional.linear(x, w, b))
    assert torch.equal(torch.ops.specq.linear_dense(x, w, None), torch.nn.functional.linear(x, w))
    with pytest.raises(ValueError, match="must equal the weight's K"):
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode:
            torch.ops.specq.linear_dense(mode.from_tensor(x), mode.from_tensor(torch.randn(5, 8)), None)


# ------------------------------------------------------------------ decode attention

def _attention_case(b, hq, hkv, q, d, length, valid, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qt = torch.randn(b, hq, q, d, generator=gen).to(dtype)
    kt = torch.randn(b, hkv, length, d, generator=gen).to(dtype)
    vt = torch.randn(b, hkv, length, d, generator=gen).to(dtype)
    pos = torch.arange(length)
    mask = torch.stack([pos[None, :] <= (n - q + torch.arange(q))[:, None] for n in valid])[:, None]
    return qt, kt, vt, mask


def _float64_attention(q, k, v, mask, scale):
    g = q.shape[1] // k.shape[1]
    s = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) @ v.double().repeat_interleave(g, 1)).transpose(1, 2)


def test_decode_attention_reference_matches_float64():
    """GQA (query head j*G + g reads kv head j), per-row causal masks, output [B, q, Hq, D]."""
    q, k, v, mask = _attention_case(2, 6, 2, 3, 16, 40, [10, 40])
    out = torch.ops.specq.decode_attention(q, k, v, mask, 0.25)
    assert out.shape == (2, 3, 6, 16) and out.is_contiguous()
    torch.testing.assert_close(out.double(), _float64_attention(q, k, v, mask, 0.25), rtol=1e-5, atol=1e-5)


def test_decode_attention_rows_with_nothing_to_attend_are_zero():
    q, k, v, mask = _attention_case(1, 4, 2, 2, 16, 8, [5])
    mask[0, 0, 1] = False
    out = torch.ops.specq.decode_attention(q, k, v, mask, 0.25)
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))
    torch.testing.assert_close(out[0, 0].double(), _float64_attention(q, k, v, mask, 0.25)[0, 0])


def test_decode_attention_refuses_bad_shapes():
    q, k, v, mask = _attention_case(1, 6, 4, 1, 16, 8, [5])
    with pytest.raises(ValueError, match="not a multiple"):
        torch.ops.specq.decode_attention(q, k, v, mask, 0.25)
    q, k, v, mask = _attention_case(1, 4, 2, 1, 16, 8, [5])
    with pytest.raises(ValueError, match="mask must be bool"):
        torch.ops.specq.decode_attention(q, k, v, mask.float(), 0.25)
    with pytest.raises(ValueError, match="must both be"):
        torch.ops.specq.decode_attention(q, k, v[..., :8], mask, 0.25)


def test_steps_route_attention_to_the_op_with_the_same_logits(monkeypatch):
    """Compiled steps (dynamo, eager backend) of a bf16 tiny llama with the op enabled for the CPU:
    every layer's decode attention goes through specq.decode_attention with transformers' own bool
    mask, and the logits of a prefill + one-token steps equal those of the SDPA path exactly."""
    from specq.runtime import attention
    from specq.runtime.compiled import CompiledSteps, make_static_cache

    model = _llama()
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    calls = []
    real = attention_op.reference

    def counting(*args):
        calls.append(args[3].shape if args[3] is not None else None)
        return real(*args)

    def run():
        torch._dynamo.reset()
        steps = CompiledSteps(model, make_static_cache(model, 1, 64), compile="eager", cuda_graphs=False)
        out = [steps.logits(ids, 0).clone()]
        for i, tok in enumerate((7, 9, 11)):
            out.append(steps.logits(torch.tensor([[tok]]), 6 + i).clone())
        out.append(steps.logits(torch.tensor([[5, 6, 7]]), 9).clone())  # a 3-token verify
        return out

    want = run()
    monkeypatch.setattr(attention, "DECODE_ATTENTION_DEVICES", ("cpu",))
    monkeypatch.setattr(attention_op, "reference", counting)
    got = run()
    torch._dynamo.reset()
    layers = model.config.num_hidden_layers
    # a 6-token prefill (a compiled step too: <= max_graph_q), 3 one-token steps, one 3-token verify
    assert calls == [(1, 1, 6, 64)] * layers + [(1, 1, 1, 64)] * (3 * layers) + [(1, 1, 3, 64)] * layers
    for a, b in zip(got, want):
        assert torch.equal(a, b)
