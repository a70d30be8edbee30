"""Verification of a drafted block by the level above it: greedy prefix matching and the speculative
rejection rule (Leviathan et al. / Chen et al.), batched over rows.

Both functions take the verifier's view of k drafted tokens: `draft` [B, k] and the verifier's
logits or probabilities at the k + 1 positions that predict draft[0], ..., draft[k-1] and the token
after the block. They return, per row, how many drafts were accepted (`n_acc` [B]) and the row's new
tokens `tokens` [B, k + 1]: the accepted drafts, then at index n_acc the verifier's own token (its
correction after a rejection, or the bonus token when everything was accepted). Entries after n_acc
are meaningless.
"""

from __future__ import annotations

import torch


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """Sampling distribution from logits [..., V]: temperature, then top-k, then top-p (nucleus).

    Applied identically to the verifier's p and the drafter's q: the rejection rule is lossless for the
    distribution it is given, so both sides must describe the same processed sampler.
    """
    x = logits.float() / temperature
    if top_k is not None and 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each token
        drop_sorted = before >= top_p  # keep the smallest prefix whose mass reaches top_p (always >= 1 token)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def greedy_verify(draft: torch.Tensor, target_logits: torch.Tensor):
    """Longest prefix of `draft` matching the verifier's argmax, then the verifier's own token."""
    target = target_logits.argmax(dim=-1)  # [B, k + 1]
    k = draft.shape[1]
    match = (draft == target[:, :k]).to(torch.int64)
    n_acc = match.cumprod(dim=1).sum(dim=1)  # leading matches
    return n_acc, target


def sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from probs [B, V]."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def rejection_verify(draft: torch.Tensor, q: torch.Tensor | None, p: torch.Tensor,
                     generator: torch.Generator | None):
    """Speculative rejection sampling.

    draft [B, k] drawn from q [B, k, V] (None: a deterministic drafter, q is one-hot at the draft);
    p [B, k + 1, V] the verifier's distributions. Draft j is accepted with probability
    min(1, p(x_j) / q(x_j)); at the first rejection the row's token is drawn from
    norm(max(0, p - q)); if all k are accepted the bonus token is drawn from p at position k.
    The output of every row is then distributed exactly as sampling from p token by token.
    """
    B, k = draft.shape
    p_draft = p[:, :k].gather(-1, draft.unsqueeze(-1)).squeeze(-1)  # [B, k]
    if q is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = q.gather(-1, draft.unsqueeze(-1)).squeeze(-1)
    u = torch.rand(B, k, generator=generator, dtype=p_draft.dtype, device=p_draft.device)
    accept = (u * q_draft < p_draft).to(torch.int64)  # u < p/q without dividing by a zero q
    n_acc = accept.cumprod(dim=1).sum(dim=1)
    rows = torch.arange(B, device=draft.device)
    p_next = p[rows, n_acc]  # [B, V]: p at the first rejected position (or the bonus position)
    rejected = n_acc < k
    residual = p_next.clone()
    if bool(rejected.any()):
        idx = n_acc.clamp(max=k - 1)
        if q is None:
            q_next = torch.zeros_like(p_next).scatter(-1, draft[rows, idx].unsqueeze(-1), 1.0)
        else:
            q_next = q[rows, idx]
        res = (p_next - q_next).clamp(min=0.0)
        mass = res.sum(dim=-1, keepdim=True)
        # mass == 0 only if p == q there, where rejection has probability 0; keep p as a safe fallback.
        res = torch.where(mass > 0, res / mass.clamp(min=1e-30), p_next)
        residual = torch.where(rejected.unsqueeze(-1), res, p_next)
    extra = sample_from(residual, generator)
    tokens = torch.cat([draft, draft[:, :1]], dim=1).clone()
    tokens[rows, n_acc] = extra
    return n_acc, tokens
