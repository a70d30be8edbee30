"""Independent references for the runtime tests: target-only greedy decoding with no KV cache at all
(the full sequence is recomputed every step), one prompt at a time, no padding."""

from __future__ import annotations

import torch


@torch.no_grad()
def naive_greedy(model, prompt: torch.Tensor, max_new_tokens: int, eos: list[int] | None = None) -> torch.Tensor:
    """prompt [T] -> the new tokens [n] (n <= max_new_tokens; stops after an EOS)."""
    ids = prompt.view(1, -1)
    out = []
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=ids).logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        if eos and nxt in eos:
            break
    return torch.tensor(out, dtype=torch.long)


def repetitive_prompt(seed: int, length: int = 10, vocab: int = 256) -> torch.Tensor:
    """A random prompt that repeats itself once, so prompt lookup has something to find."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(3, vocab, (length,), generator=g)
    return torch.cat([p, p[: length // 2]])
