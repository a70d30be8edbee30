"""Model-free drafters. `NgramDrafter`: prompt lookup decoding.

The last n tokens of a row (n from `max_ngram` down to `min_ngram`) are searched for earlier in the
same row (prompt and generated text); the tokens that followed the most recent earlier occurrence
are the draft. It costs no forward pass, so on a CPU, where a 135M model's step is dominated by
per-forward overhead, every accepted token is nearly free.
"""

from __future__ import annotations

import torch


class NgramDrafter:
    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"ngram sizes must satisfy 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose_row(self, seq: list[int], k: int) -> list[int]:
        """Up to k tokens continuing `seq` (a plain list of ints), or [] when nothing matches."""
        n_tok = len(seq)
        for n in range(min(self.max_ngram, n_tok - 1), self.min_ngram - 1, -1):
            tail = seq[n_tok - n:]
            # most recent earlier occurrence whose continuation is non-empty
            for start in range(n_tok - n - 1, -1, -1):
                if seq[start:start + n] == tail:
                    cont = seq[start + n:start + n + k]
                    if cont:
                        return cont
        return []

    def propose(self, rows: list[list[int]], k: int, fill: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Drafts for every row, as one [B, kk] tensor with kk <= k the longest proposal.

        Rows with a shorter (or no) proposal are padded with `fill` [B] (their last token): a draft is
        only a guess, so padding never affects correctness. kk == 0 means no row found a match.
        """
        props = [self.propose_row(r, k) for r in rows]
        kk = max((len(p) for p in props), default=0)
        if kk == 0:
            return torch.empty(len(rows), 0, dtype=torch.long, device=fill.device), 0
        out = fill.view(-1, 1).repeat(1, kk).clone()
        for b, p in enumerate(props):
            if p:
                out[b, :len(p)] = torch.tensor(p, dtype=torch.long, device=fill.device)
        return out, kk
