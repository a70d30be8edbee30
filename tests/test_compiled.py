"""Compiled steps (specq/runtime/compiled.py): exactness against untouched HF decoding, cache rewind by
position, no recompiles in steady state, and the compiled multi-level speculative loop against
target-only decoding and against the runtime's own loop. CPU in CI (float32, tiny models); the CUDA
graph test runs only where CUDA is."""

from __future__ import annotations

import copy

import pytest
import torch

from specq.runtime.compiled import (CompiledSteps, compiled_generate, get_steps, make_static_cache,
                                    set_cache_position)

PROMPT_LEN = 10
NEW = 16


@pytest.fixture(scope="module")
def llama():
    from tiny_models import make_tiny_model

    return make_tiny_model("llama", seed=1)


@pytest.fixture(scope="module")
def prompt():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 256, (2, PROMPT_LEN), generator=g)


def hf_greedy(model, ids, new=NEW):
    """The untouched HF reference: generate with its own dynamic cache, EOS never stops it."""
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0,
                              attention_mask=torch.ones_like(ids))


@pytest.fixture(scope="module")
def multimode(llama):
    import specq

    # the data-free "mse" MXFP4 rule: calibration (the default recipe's act_mse) is not what these
    # tests are about and costs a sampled calibration text per transform
    recipe = {"name": "default-mse", "base": "default", "mxfp4_scale_rule": "mse"}
    return specq.transform(copy.deepcopy(llama), modes=("bf16", "mxfp4", "w4a16", "w4a4"), recipe=recipe)


def test_steps_write_by_position_and_rewind(llama, prompt):
    """A forward at position p overwrites what an earlier (rejected) forward wrote there, and
    entries past the queries are never attended to: logits equal a cache-free full forward."""
    ids = prompt[:1]
    with torch.no_grad():
        full = llama(torch.cat([ids, ids[:, :6]], 1), use_cache=False).logits
    steps = CompiledSteps(llama, make_static_cache(llama, 1, 64), compile=None)
    steps.logits(ids, 0)
    steps.logits(torch.randint(3, 256, (1, 5)), PROMPT_LEN)  # a draft that will be rejected
    got = steps.logits(ids[:, :4], PROMPT_LEN).clone()  # the verify overwrites its entries
    last = steps.logits(ids[:, 4:6], PROMPT_LEN + 4)
    torch.testing.assert_close(got, full[:, PROMPT_LEN:PROMPT_LEN + 4], rtol=0, atol=1e-5)
    torch.testing.assert_close(last, full[:, PROMPT_LEN + 4:PROMPT_LEN + 6], rtol=0, atol=1e-5)


def test_bucketed_prefill_equals_unpadded(llama, prompt):
    """A prefill longer than max_graph_q runs the graph of its power-of-two bucket, padded on the
    right: the prompt's logits and the decoding after it equal HF's (float32), and prompts of other
    lengths in the same bucket reuse that graph (no recompile)."""
    ref = hf_greedy(llama, prompt)
    torch._dynamo.reset()
    steps = CompiledSteps(llama, make_static_cache(llama, 2, 128), compile="eager", cuda_graphs=False,
                          max_graph_q=4, max_prefill_graph=64)
    with torch.no_grad():
        full = llama(prompt, use_cache=False).logits
    logits = steps.logits(prompt, 0)
    assert logits.shape == full.shape
    torch.testing.assert_close(logits, full, rtol=0, atol=1e-5)
    assert torch.equal(steps.decode_greedy(prompt, NEW, burst=4), ref)
    compiles = steps.compile_count
    steps.logits(prompt[:, :7], 0)  # bucket 64 again: no new graph
    assert steps.compile_count == compiles
    assert steps._prefill_bucket(PROMPT_LEN, 0) == 64 and steps._prefill_bucket(PROMPT_LEN, 100) is None
    assert steps._prefill_bucket(65, 0) is None and steps._prefill_bucket(4, 0) is None  # past max / a step
    assert steps._prefill_bucket(PROMPT_LEN, 0, batch=64) is None  # 64 x 64 tokens: too big for a graph


def test_decode_greedy_equals_hf_and_no_recompiles(llama, prompt):
    """Compiled (dynamo, "eager" backend: cheap on CPU) target-only decoding gives HF's tokens;
    after the first request, further requests compile nothing (same shapes, same mode)."""
    ref = hf_greedy(llama, prompt)
    torch._dynamo.reset()
    steps = CompiledSteps(llama, make_static_cache(llama, 2, 128), compile="eager", max_graph_q=8)
    out = steps.decode_greedy(prompt, NEW, burst=4)
    assert torch.equal(out, ref)
    first = steps.compile_count
    assert first == 1  # one (mode, q=1) step; the prompt (q > max_graph_q) runs uncompiled
    assert torch.equal(steps.decode_greedy(prompt, NEW, burst=4), ref)
    steps.greedy(prompt[:, :3], PROMPT_LEN)  # a new query length: exactly one more compile
    assert steps.compile_count == first + 1
    steps.greedy(prompt[:, 3:6], PROMPT_LEN + 3)  # same shape, other values and a slice: none
    assert steps.compile_count == first + 1


@pytest.mark.parametrize("levels,gamma,target", [
    (["bf16"], 1, "bf16"),
    (["mxfp4", "bf16"], 3, "bf16"),
    (["ngram", "mxfp4", "bf16"], [2, 3], "bf16"),
    (["w4a4", "w4a16"], 4, "w4a16"),
])
def test_compiled_generate_is_lossless(multimode, prompt, levels, gamma, target):
    """Every chain returns the target mode's own greedy tokens, batch of 2 (reference: HF generate of
    the eager multi-mode model switched to the target mode)."""
    import specq

    with specq.mode(multimode, target):
        ref = hf_greedy(multimode, prompt)
    out = compiled_generate(multimode, prompt, NEW, levels=levels, gamma=gamma, eos_token_id=[], compile=None)
    assert torch.equal(out.sequences, ref)
    assert out.num_new_tokens == [NEW, NEW]
    if len(levels) > 1:
        drafter = out.stats.levels[-2]
        assert drafter.rounds > 0 and 0 <= drafter.accepted <= drafter.drafted


def test_compiled_modes_are_guarded(multimode, prompt):
    """Compiled code is specialised per mode: switching modes compiles each mode once, switching back
    compiles nothing, and each mode's compiled tokens equal that mode's eager tokens."""
    import specq

    torch._dynamo.reset()
    steps = CompiledSteps(multimode, make_static_cache(multimode, 2, 128), compile="eager", max_graph_q=4)
    outs = {}
    for mode in ("mxfp4", "w4a16", "mxfp4"):
        outs[mode] = steps.decode_greedy(prompt, 8, burst=4, mode=mode)
    assert steps.compile_count == 2
    for mode in ("mxfp4", "w4a16"):
        with specq.mode(multimode, mode):
            assert torch.equal(outs[mode], hf_greedy(multimode, prompt, 8))


def test_matches_runtime_generate_with_eos(multimode, prompt):
    """Stopping at EOS and padding after it agree with the runtime's own loop (specq.generate)."""
    import specq

    free = compiled_generate(multimode, prompt[:1], NEW, levels=["mxfp4", "bf16"], gamma=3, eos_token_id=[],
                             compile=None)
    eos = int(free.sequences[0, PROMPT_LEN + 5])  # a token the model emits: it must stop there
    ours = compiled_generate(multimode, prompt, NEW, levels=["mxfp4", "bf16"], gamma=3, eos_token_id=eos,
                             pad_token_id=0, compile=None)
    theirs = specq.generate(multimode, prompt, NEW, levels=["mxfp4", "bf16"], gamma=3, eos_token_id=eos,
                            pad_token_id=0)
    assert ours.num_new_tokens == theirs.num_new_tokens
    assert ours.num_new_tokens[0] <= 6
    n = ours.sequences.shape[1]
    assert torch.equal(ours.sequences, theirs.sequences[:, :n])
    assert bool((theirs.sequences[:, n:] == 0).all())


def test_steps_are_reused_across_requests(multimode, prompt):
    a = get_steps(multimode, 2, 64, compile=None)
    assert get_steps(multimode, 2, 40, compile=None) is a  # fits: same graphs, same cache
    b = get_steps(multimode, 1, 40, compile=None)  # another batch size: a new cache
    assert b is not a
    copy.deepcopy(multimode)  # the steps (CUDA graphs on GPU) live beside the model, not in it


def test_bad_inputs_are_refused(llama, multimode, prompt):
    with pytest.raises(NotImplementedError, match="compile=False"):
        compiled_generate(multimode, prompt, 4, levels=["shallow:1", "bf16"], compile=None)
    with pytest.raises(ValueError, match="needs a multi-mode model"):
        compiled_generate(llama, prompt, 4, levels=["mxfp4", "bf16"], compile=None)
    with pytest.raises(ValueError, match="gamma"):
        compiled_generate(multimode, prompt, 4, levels=["mxfp4", "bf16"], gamma=[1, 2], compile=None)
    with pytest.raises(ValueError, match="first"):
        compiled_generate(multimode, prompt, 4, levels=["mxfp4", "ngram", "bf16"], compile=None)
    with pytest.raises(TypeError, match="StaticCache"):
        CompiledSteps(llama, object())
    with pytest.raises(ValueError, match="cuda_graphs"):
        CompiledSteps(llama, make_static_cache(llama, 1, 32), cuda_graphs=True)


def test_sliding_window_cache_is_refused():
    from tiny_models import make_tiny_model

    gemma = make_tiny_model("gemma3")
    with pytest.raises(NotImplementedError, match="sliding"):
        CompiledSteps(gemma, make_static_cache(gemma, 1, 32))


def test_set_cache_position_is_a_device_write(llama):
    cache = make_static_cache(llama, 1, 16)
    set_cache_position(cache, torch.tensor(7))
    assert all(int(layer.cumulative_length) == 7 for layer in cache.layers)


@pytest.mark.gpu
def test_cuda_graphs_replay_equals_eager(multimode, prompt):
    """On CUDA: captured bursts and rounds give the eager tokens, and replays compile nothing new."""
    import specq

    mm = copy.deepcopy(multimode).cuda()
    ids = prompt.cuda()
    with specq.mode(mm, "bf16"):
        ref = hf_greedy(mm, ids)
    for compile_ in (None, "inductor"):
        out = compiled_generate(mm, ids, NEW, levels=["mxfp4", "bf16"], gamma=3, eos_token_id=[],
                                compile=compile_, cuda_graphs=True)
        assert torch.equal(out.sequences.cpu(), ref.cpu())
        steps = get_steps(mm, 2, 1, compile=compile_, cuda_graphs=True)
        graphs, compiles = len(steps._graphs), steps.compile_count
        out2 = compiled_generate(mm, ids, NEW, levels=["mxfp4", "bf16"], gamma=3, eos_token_id=[],
                                 compile=compile_, cuda_graphs=True)
        assert torch.equal(out2.sequences, out.sequences)
        assert (len(steps._graphs), steps.compile_count) == (graphs, compiles)


def test_generate_compile_hook(multimode, prompt):
    """specq.generate(..., compile=...) routes greedy mode chains to the compiled path: same tokens."""
    import specq

    ref = specq.generate(multimode, prompt, 12, levels=["ngram", "mxfp4", "bf16"], gamma=[2, 3], eos_token_id=[])
    out = specq.generate(multimode, prompt, 12, levels=["ngram", "mxfp4", "bf16"], gamma=[2, 3], eos_token_id=[],
                         compile="eager")
    assert torch.equal(out.sequences, ref.sequences)
    assert out.stats.kv_caches[0]["compiles"] >= 1
    with pytest.raises(ValueError, match="greedy"):
        specq.generate(multimode, prompt, 4, levels=["mxfp4", "bf16"], temperature=0.7, compile=True)


def test_bench_rows_strict(multimode, prompt):
    """The benchmark's rows (specq.runtime.bench.run_rows, used by `specq bench` and
    benchmarks/e2e.py): lossless rows give their target's tokens in float32, and the table renders."""
    from specq.runtime import bench

    rows = bench.run_rows(multimode, prompt[:1], 8, rows=["hf_eager", "ar_bf16", "ngram_bf16", "mlspecqd2",
                                                          "ar_w4a16", "qspec"],
                          gamma={"mlspecqd2": 3, "qspec": 3, "ngram_bf16": 4}, compile=None, strict=True,
                          log=lambda *a: None)
    by = {r.name: r for r in rows}
    assert all(r.error is None and r.new_tokens == 8 for r in rows)
    assert by["mlspecqd2"].same_as == "hf_eager" and by["mlspecqd2"].agree == 8
    assert by["qspec"].same_as == "ar_w4a16" and by["qspec"].agree == 8
    assert "mxfp4" in by["mlspecqd2"].acceptance
    table = bench.markdown_table(rows, baseline="hf_eager")
    assert table.count("\n") == len(rows) + 1 and "| qspec |" in table
    # without an HF eager row, bf16-target rows are checked against specq's own ar_bf16 row
    rows = bench.run_rows(multimode, prompt[:1], 8, rows=["ar_bf16", "ngram_bf16"], gamma={"ngram_bf16": 4},
                          compile=None, strict=True, log=lambda *a: None)
    assert rows[1].same_as == "ar_bf16" and rows[1].agree == 8 and rows[0].same_as is None


@pytest.mark.gpu
def test_cuda_bucketed_prefill_and_bf16_decode_ops(llama):
    """On CUDA with CUDA graphs (defaults): a 40-token prompt runs the bucket-64 graph and its logits
    equal a cache-free HF forward (float32); in bf16 the compiled steps (decode attention kernel,
    dense GEMV) give one-token logits within bf16 rounding of a cache-free eager forward."""
    model = copy.deepcopy(llama).cuda()
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(5)).cuda()
    steps = CompiledSteps(model, make_static_cache(model, 1, 128), compile="inductor")
    assert steps.max_prefill_graph == 512
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    got = steps.logits(ids, 0)
    assert ("fwd", "bf16", (1, 64)) in steps._graphs
    torch.testing.assert_close(got, full, rtol=0, atol=1e-4)

    bf = copy.deepcopy(llama).to(device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    bsteps = CompiledSteps(bf, make_static_cache(bf, 1, 128), compile="inductor")
    tok = bsteps.prefill(ids)
    with torch.no_grad():
        ref = bf(torch.cat([ids, tok], 1), use_cache=False).logits[:, -1]
    step = bsteps.logits(tok, 40)[:, -1]
    assert (step.float() - ref.float()).abs().max() <= 0.05 * ref.float().abs().max()
