"""Sampling is lossless: the distribution of continuations sampled with speculative decoding equals
the target's own sampling distribution.

A tiny-vocabulary model (8 tokens) makes the exact distribution of 2-token continuations computable
(64 outcomes, from float64 logits, with temperature / top-k / top-p implemented here independently of
the runtime). 3000 continuations are sampled in one batch (which also exercises the per-row rejection
rule and the shared advance of a batch) and compared with a chi-square goodness-of-fit test. The
threshold is the 0.999 quantile of the chi-square law, so a correct sampler fails a given check with
probability 0.001 (the false-alarm rate); seeds are fixed, so the test is deterministic. A control
check shows the test has power: sampling from the drafter alone is rejected.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from tiny_models import make_tiny_config

from specq.runtime.generate import generate

VOCAB = 8
N_SAMPLES = 3000
ALPHA = 1e-3
PROMPT = torch.tensor([[1, 5, 3, 5, 3]])


def _tiny_vocab_model(seed: int):
    import transformers

    config = make_tiny_config("llama")
    config.vocab_size = VOCAB
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)  # peaked but not degenerate next-token distributions
    return model.float().eval()


@pytest.fixture(scope="module")
def models():
    return _tiny_vocab_model(0), _tiny_vocab_model(1)


def _processed(logits: torch.Tensor, temperature, top_k, top_p) -> torch.Tensor:
    """Reference sampler in float64: temperature, top-k, then nucleus (the smallest set of most
    likely tokens whose mass reaches top_p)."""
    x = logits.double() / temperature
    order = torch.argsort(x, descending=True)
    keep = torch.zeros_like(x, dtype=torch.bool)
    probs = torch.softmax(x, -1)
    if top_k is not None:
        probs = torch.zeros_like(probs)
        probs[order[:top_k]] = torch.softmax(x[order[:top_k]], -1)
    mass = 0.0
    for t in order.tolist():
        if probs[t] == 0:
            break
        keep[t] = True
        mass += float(probs[t])
        if top_p is not None and mass >= top_p:
            break
        if top_p is None:
            keep[:] = probs > 0
            break
    out = torch.where(keep, probs, torch.zeros_like(probs))
    return out / out.sum()


@torch.no_grad()
def _exact_distribution(model, temperature, top_k=None, top_p=None, length=2) -> torch.Tensor:
    """P(x1..x_length | PROMPT) for all VOCAB^length continuations, flattened (x1 most significant).
    One batched float64 forward per depth over every prefix of that depth (no cache)."""
    m64 = copy.deepcopy(model).double()
    prefixes = PROMPT.clone()  # [VOCAB^d, T + d]
    probs = torch.ones(1, dtype=torch.float64)
    for _ in range(length):
        logits = m64(input_ids=prefixes).logits[:, -1]
        nxt = torch.stack([_processed(row, temperature, top_k, top_p) for row in logits])  # [n, VOCAB]
        probs = (probs.view(-1, 1) * nxt).flatten()
        prefixes = torch.cat([prefixes.repeat_interleave(VOCAB, 0),
                              torch.arange(VOCAB).repeat(prefixes.shape[0]).view(-1, 1)], 1)
    return probs


def _chi_square_pvalue(samples: torch.Tensor, expected_p: torch.Tensor) -> float:
    """Goodness of fit of continuations [N, L] to expected_p [VOCAB^L]; cells with expected
    count < 5 are pooled into one cell (a sample in an impossible cell gives p = 0)."""
    idx = torch.zeros(samples.shape[0], dtype=torch.long)
    for j in range(samples.shape[1]):
        idx = idx * VOCAB + samples[:, j]
    observed = torch.bincount(idx, minlength=expected_p.numel()).double()
    if bool((observed[expected_p == 0] > 0).any()):
        return 0.0
    expected = expected_p * samples.shape[0]
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    df = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(chi2 / 2.0, dtype=torch.float64)))


def _sample(model, levels, seed, length=2, n=N_SAMPLES, **kw):
    ids = PROMPT.repeat(n, 1)
    out = generate(model, ids, length, levels=levels, seed=seed, eos_token_id=[], **kw)
    return out.sequences[:, PROMPT.shape[1]:], out


CONFIGS = [
    # (name, levels builder, gamma, continuation length, sampling parameters)
    ("small", lambda small: [small, "bf16"], 3, 2, dict(temperature=1.0)),
    # 4 tokens so that every level drafts: the target asks the shallow level for 3, which asks the
    # small model for 2, which asks prompt lookup for 1
    ("ngram+small+shallow", lambda small: ["ngram", small, "shallow:1", "bf16"], [2, 2, 3], 4,
     dict(temperature=1.0)),
    ("small, T=0.7 top-k 5 top-p 0.9", lambda small: [small, "bf16"], 2, 2,
     dict(temperature=0.7, top_k=5, top_p=0.9)),
]


@pytest.mark.parametrize("name,build,gamma,length,params", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_speculative_sampling_matches_target_distribution(models, name, build, gamma, length, params):
    target, small = models
    expected = _exact_distribution(target, params["temperature"], params.get("top_k"), params.get("top_p"),
                                   length=length)
    samples, out = _sample(target, build(small), seed=1234, length=length, gamma=gamma, **params)
    assert all(lvl.drafted > 0 for lvl in out.stats.levels[:-1])  # every level really drafted
    p = _chi_square_pvalue(samples, expected)
    assert p > ALPHA, f"{name}: chi-square p-value {p:.2e}: speculative samples do not follow the target"


def test_target_only_sampling_matches_too(models):
    target, _ = models
    expected = _exact_distribution(target, 1.0)
    samples, _ = _sample(target, ["bf16"], seed=99, temperature=1.0)
    assert _chi_square_pvalue(samples, expected) > ALPHA


def test_chi_square_has_power(models):
    """The drafter's own samples are rejected as samples of the target: the test can fail."""
    target, small = models
    expected = _exact_distribution(target, 1.0)
    samples, _ = _sample(small, ["bf16"], seed=5, temperature=1.0)
    assert _chi_square_pvalue(samples, expected) < ALPHA


def test_sampling_is_seeded(models):
    target, small = models
    a, _ = _sample(target, ["ngram", small, "bf16"], seed=7, length=4, n=64, temperature=1.0)
    b, _ = _sample(target, ["ngram", small, "bf16"], seed=7, length=4, n=64, temperature=1.0)
    c, _ = _sample(target, ["ngram", small, "bf16"], seed=8, length=4, n=64, temperature=1.0)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_outcome_space_is_covered(models):
    """Sanity of the setup: the target's 2-token distribution is spread over many outcomes."""
    target, _ = models
    expected = _exact_distribution(target, 1.0)
    assert int((expected * N_SAMPLES >= 5).sum()) >= 10
    assert abs(float(expected.sum()) - 1.0) < 1e-9
    assert len(list(itertools.product(range(VOCAB), repeat=2))) == expected.numel()
