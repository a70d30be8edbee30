"""specq.evaluation and `specq eval`: perplexity, greedy top-1 agreement, weight bytes.

References are independent: perplexity against a float64 recomputation window by window; agreement
against an unbatched, cache-free greedy loop in float64. Tiny models keep this fast; one test runs
the real default model in every mode.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import specq
from specq.evaluation import (
    ModeRunner,
    encode_prompts,
    evaluate,
    greedy_continuations,
    load_eval_prompts,
    load_eval_texts,
    perplexity,
    token_windows,
    tokens_per_round,
    top1_agreement,
)

SHORT_TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
]
SHORT_PROMPTS = ["Hi!", "Tell me about the sea and its tides.", "2+2="]


# ------------------------------------------------------------------------------------- data


def test_shipped_text_and_prompt_sets():
    docs = load_eval_texts()
    names = [n for n, _ in docs]
    assert len(docs) >= 5 and len(set(names)) == len(names)
    assert sum(len(t) for _, t in docs) > 4000
    assert any("def " in t for _, t in docs)  # code is part of the set
    prompts = load_eval_prompts()
    assert len(prompts) == 16 and len(set(prompts)) == 16 and all(len(p) > 5 for p in prompts)


def test_token_windows_cover_the_stream(tiny_tokenizer):
    windows = token_windows(tiny_tokenizer, SHORT_TEXTS, max_length=40)
    stream = tiny_tokenizer("\n\n".join(SHORT_TEXTS), add_special_tokens=False)["input_ids"]
    assert torch.equal(torch.cat(windows), torch.tensor(stream))
    assert all(w.numel() == 40 for w in windows[:-1]) and 2 <= windows[-1].numel() <= 40
    with pytest.raises(ValueError, match="max_length"):
        token_windows(tiny_tokenizer, SHORT_TEXTS, max_length=1)


# ------------------------------------------------------------------------------- perplexity


def test_perplexity_matches_float64_reference(tiny_model, tiny_tokenizer):
    model = tiny_model("llama")
    windows = token_windows(tiny_tokenizer, SHORT_TEXTS, max_length=48)  # two window lengths
    result = perplexity(model, windows, batch_size=2)

    ref = copy.deepcopy(model).double()
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = ref(w[None]).logits[0]
            nll += float(F.cross_entropy(logits[:-1], w[1:], reduction="sum"))
            n += w.numel() - 1
    assert result.tokens == n
    assert result.nll == pytest.approx(nll / n, rel=1e-5)
    assert result.perplexity == pytest.approx(torch.tensor(nll / n).exp().item(), rel=1e-5)


# -------------------------------------------------------------------------------- agreement


def _reference_greedy(model, prompt, n, eos=None):
    """Unbatched, cache-free greedy decoding: the verifier's continuation, token by token."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if eos is not None and int(nxt) == eos:
                break
    return ids[0, len(prompt):].tolist()


def _reference_matches(draft, prompt, continuation):
    with torch.no_grad():
        logits = draft(torch.tensor([prompt + continuation])).logits[0]
    preds = logits[len(prompt) - 1:-1].argmax(-1).tolist()
    return sum(int(p == t) for p, t in zip(preds, continuation))


@pytest.fixture(scope="module")
def f64_pair():
    """A float64 tiny llama verifier and a perturbed copy as its draft."""
    from tiny_models import make_tiny_model

    verifier = make_tiny_model("llama", dtype=torch.float64, seed=3)
    draft = copy.deepcopy(verifier)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.03)
    return draft, verifier


def test_agreement_with_itself_is_one(f64_pair, tiny_tokenizer):
    _, verifier = f64_pair
    prompts = encode_prompts(tiny_tokenizer, SHORT_PROMPTS)
    cont = greedy_continuations(verifier, prompts, max_new_tokens=10)
    r = top1_agreement(verifier, verifier, cont, gamma=4)
    assert r.agreement == 1.0 and r.verifier_consistency == 1.0 and r.positions == 30
    assert r.agreement_teacher_forced == 1.0
    assert r.tokens_per_round == pytest.approx(30 / 6)  # 10 tokens: 4 + 1, 4 + 1 per row


def test_agreement_matches_unbatched_reference(f64_pair, tiny_tokenizer):
    draft, verifier = f64_pair
    prompts = encode_prompts(tiny_tokenizer, SHORT_PROMPTS)
    assert len({len(p) for p in prompts}) == 3  # different lengths: left padding is exercised
    n = 12
    cont = greedy_continuations(verifier, prompts, max_new_tokens=n)
    refs = [_reference_greedy(verifier, p, n) for p in prompts]
    assert cont.input_ids[:, cont.prompt_len:].tolist() == refs
    r = top1_agreement(draft, verifier, cont)
    expected = sum(_reference_matches(draft, p, c) for p, c in zip(prompts, refs))
    assert r.matches == expected and r.positions == 3 * n
    assert r.agreement_teacher_forced == r.agreement  # float64: the verifier is consistent
    assert 0.0 < r.agreement < 1.0  # the perturbation is visible but not total
    assert r.verifier_consistency == 1.0


def test_continuations_stop_at_eos(f64_pair, tiny_tokenizer):
    _, verifier = f64_pair
    prompts = encode_prompts(tiny_tokenizer, SHORT_PROMPTS)
    free = [_reference_greedy(verifier, p, 12) for p in prompts]
    eos = free[0][3]  # a token the first row emits at step 4
    cont = greedy_continuations(verifier, prompts, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    for b, row in enumerate(free):
        expected = row.index(eos) + 1 if eos in row else 12
        assert int(cont.lengths[b]) == expected
        assert cont.input_ids[b, cont.prompt_len:cont.prompt_len + expected].tolist() == row[:expected]


def test_tokens_per_round_by_hand():
    def run(rows, gamma):
        n = max(len(r) for r in rows)
        match = torch.tensor([r + [False] * (n - len(r)) for r in rows])
        return tokens_per_round(match, torch.tensor([len(r) for r in rows]), gamma)

    assert run([[True] * 10], 4) == 5.0  # 4 accepted + 1 verifier token, twice
    assert run([[False] * 3], 4) == 1.0
    assert run([[True, True, False, True, True, True, True, True]], 4) == 4.0  # rounds of 3 and 5
    assert run([[True] * 10, [False] * 2], 2) == pytest.approx(12 / 6)  # rounds 3,3,3,1 and 1,1
    with pytest.raises(ValueError, match="gamma"):
        run([[True]], 0)


# ---------------------------------------------------------------------- evaluate() end to end


def test_evaluate_transformed_tiny_model(tiny_model, tiny_tokenizer):
    from specq.transform.transform import bytes_per_mode

    plain = tiny_model("llama")
    mm = specq.transform(copy.deepcopy(plain), modes=("bf16", "mxfp4", "w4a16", "w4a4"))
    specq.set_mode(mm, "w4a4")
    report = evaluate(mm, tiny_tokenizer, texts=SHORT_TEXTS, prompts=SHORT_PROMPTS, max_new_tokens=6,
                      max_length=64, progress=False)
    assert specq.get_mode(mm) == "w4a4"  # restored
    assert list(report.modes) == ["bf16", "mxfp4", "w4a16", "w4a4"]
    windows = token_windows(tiny_tokenizer, SHORT_TEXTS, max_length=64)
    assert report.modes["bf16"]["perplexity"] == perplexity(plain, windows).perplexity  # bf16 = untouched
    for m, nbytes in bytes_per_mode(mm).items():
        assert report.modes[m]["weight_bytes"] == nbytes
    assert report.modes["mxfp4"]["weight_bytes"] < report.modes["bf16"]["weight_bytes"] / 3
    assert [(p["draft"], p["verifier"]) for p in report.pairs] == [("mxfp4", "bf16"), ("w4a4", "w4a16")]
    for p in report.pairs:
        assert 0.0 <= p["agreement"] <= 1.0 and 0 < p["positions"] <= 18  # the tiny config stops at eos 2
    json.dumps(report.to_dict())
    table = report.format_table()
    assert "mxfp4 -> bf16" in table and "w4a4 -> w4a16" in table and "perplexity" in table

    same = evaluate(mm, tiny_tokenizer, modes=("w4a16",), pairs=[("w4a16", "w4a16")], texts=SHORT_TEXTS,
                    prompts=SHORT_PROMPTS[:1], max_new_tokens=5, max_length=64, progress=False)
    assert same.pairs[0]["agreement"] == 1.0


def test_evaluate_bad_modes(tiny_model, tiny_tokenizer):
    plain = tiny_model("llama")
    with pytest.raises(ValueError, match="not a specq multi-mode model"):
        evaluate(plain, tiny_tokenizer, modes=("mxfp4",), texts=SHORT_TEXTS, progress=False)
    plain_report = evaluate(plain, tiny_tokenizer, texts=SHORT_TEXTS, prompts=SHORT_PROMPTS[:1],
                            max_new_tokens=2, max_length=64, progress=False)
    assert list(plain_report.modes) == ["bf16"] and plain_report.pairs == []
    mm = specq.transform(plain, modes=("bf16", "mxfp4"))
    with pytest.raises(ValueError, match="not available"):
        evaluate(mm, tiny_tokenizer, modes=("bf16", "w4a4"), texts=SHORT_TEXTS, progress=False)
    with pytest.raises(ValueError, match="not available"):
        ModeRunner(mm, "w4a16")


# ------------------------------------------------------------------------- the default model


@pytest.mark.slow
def test_default_model_every_mode(default_model_fp32, default_multimode_fp32, default_tokenizer):
    """Sanity bounds for the real model (float32). Kept small: on CPU every forward of a quantized
    mode dequantizes the weights, so the cost is the number of forwards (here ten)."""
    explainer = load_eval_texts()[1][1]
    texts = [default_tokenizer.decode(default_tokenizer(explainer)["input_ids"][:160])]
    windows = token_windows(default_tokenizer, texts, max_length=256)
    assert len(windows) == 1  # one forward per mode
    report = evaluate(default_multimode_fp32, default_tokenizer, texts=texts, prompts=load_eval_prompts()[:2],
                      max_new_tokens=6, max_length=256, progress=False)
    ppl = {m: r["perplexity"] for m, r in report.modes.items()}
    # bf16 mode is the untouched model: same perplexity, bit for bit.
    assert ppl["bf16"] == perplexity(default_model_fp32, windows).perplexity
    assert 3.0 < ppl["bf16"] < 40.0, ppl
    for m in ("mxfp4", "w4a16", "w4a4"):
        assert ppl["bf16"] * 0.97 < ppl[m] < ppl["bf16"] * 3.0, ppl
    agreement = {(p["draft"], p["verifier"]): p["agreement"] for p in report.pairs}
    assert set(agreement) == {("mxfp4", "bf16"), ("w4a4", "w4a16")}
    for pair, rate in agreement.items():
        assert 0.25 <= rate <= 1.0, agreement  # full runs measure ~0.67 and ~0.81 (bf16, 16 prompts)
    for p in report.pairs:
        assert p["verifier_consistency"] > 0.9 and p["positions"] >= 6


# ------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    from tiny_models import make_tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_cli_eval_json_and_table(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from specq.cli.main import main

    out = tmp_path / "report.json"
    args = ["eval", str(tiny_model_dir), "--dtype", "float32", "--prompts", "2", "--max-new-tokens", "4",
            "--max-length", "512", "--quiet"]
    res = CliRunner().invoke(main, args + ["--json", "--modes", "bf16,mxfp4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert json.loads(out.read_text()) == data
    assert set(data["modes"]) == {"bf16", "mxfp4"} and data["settings"]["prompts"] == 2
    assert data["settings"]["prompt_set"] == "shipped[:2]"
    assert [(p["draft"], p["verifier"]) for p in data["pairs"]] == [("mxfp4", "bf16")]

    res = CliRunner().invoke(main, args + ["--modes", "w4a16,w4a4", "--pairs", "w4a4:w4a16"])
    assert res.exit_code == 0, res.output
    assert "w4a4 -> w4a16" in res.output and "perplexity" in res.output


def test_cli_eval_bad_input(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from specq.cli.main import main

    res = CliRunner().invoke(main, ["eval", str(tiny_model_dir), "--modes", "bf16,fp8"])
    assert res.exit_code == 2 and "unknown mode" in res.output
    res = CliRunner().invoke(main, ["eval", str(tiny_model_dir), "--modes", "bf16,mxfp4", "--pairs", "w4a4:bf16"])
    assert res.exit_code == 2 and "not among --modes" in res.output
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "missing-model")])
    assert res.exit_code == 1 and "No such file or directory" in res.output


def test_cli_eval_specq_checkpoint(tmp_path, tiny_model, tiny_tokenizer):
    """A specq checkpoint goes through specq.from_pretrained and evaluates like the in-memory model."""
    from click.testing import CliRunner

    from specq.cli.main import main

    mm = specq.transform(tiny_model("llama"), modes=("bf16", "mxfp4"))
    specq.save_pretrained(mm, tmp_path / "ckpt")
    tiny_tokenizer.save_pretrained(tmp_path / "ckpt")
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "ckpt"), "--dtype", "float32", "--prompts", "2",
                                    "--max-new-tokens", "3", "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    direct = evaluate(mm, tiny_tokenizer, prompts=load_eval_prompts()[:2], max_new_tokens=3, progress=False)
    for m in ("bf16", "mxfp4"):
        assert data["modes"][m]["perplexity"] == pytest.approx(direct.modes[m]["perplexity"], rel=1e-6)
        assert data["modes"][m]["weight_bytes"] == direct.modes[m]["weight_bytes"]
    assert data["pairs"][0]["matches"] == direct.pairs[0]["matches"]
