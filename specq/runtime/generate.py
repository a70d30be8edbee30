"""`specq.generate`: lossless multi-level speculative decoding (QSpec, ML-SpecQD and combinations).

The loop, level by level (levels[0] cheapest ... levels[-1] the target):

    produce(i, want):              # append `want` tokens of level i to the sequence
        while fewer than `want`:
            k = produce(i - 1, min(gamma[i-1], remaining - 1))   # level i-1 drafts (recursively)
            one forward of level i over the drafted block (+ any tokens it has not seen yet)
            accept per row: greedy prefix match / rejection rule; the row's own token after it
            keep m = the fewest new tokens of any unfinished row; truncate the rest

Keeping the same count m for every row keeps all rows at one position, so one static cache serves
the batch. It is lossless: every kept token of a row is one its verifier accepted or produced, and a
token dropped because another row stopped earlier is simply produced again in the next round (for
sampling: each kept token is distributed as the verifier's p given the prefix, whichever round it
came from). For sampling, each level reports its own distribution (its verify probabilities) for the
tokens it produced, which is exactly the q the level above needs: nesting composes.

KV caches: one `SharedStaticCache` per distinct model (modes and shallow copies share it). Nothing is
copied or rolled back: each forward writes by position; `CacheTracker` decides where each level must
start recomputing (the target only trusts entries it wrote itself; drafters reuse anything valid).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from specq.runtime.kv_cache import SharedStaticCache, num_cache_layers
from specq.runtime.levels import ModelLevel, first_param, resolve_levels
from specq.runtime.stats import GenerationStats, LevelStats
from specq.runtime.verify import greedy_verify, logits_to_probs, rejection_verify, sample_from


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, prompt + new]; left padding kept; rows that ended early padded
    stats: GenerationStats
    num_new_tokens: list[int]  # per row, up to and including its EOS


def _eos_list(model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        gc = getattr(model, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None) if gc is not None else None
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(e) for e in eos_token_id]


def _pad_id(model, pad_token_id, eos: list[int]) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    gc = getattr(model, "generation_config", None)
    pad = getattr(gc, "pad_token_id", None) if gc is not None else None
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    return int(pad)


def _left_pad_counts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[int]:
    B, T = input_ids.shape
    if attention_mask is None:
        return [0] * B
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                         f"{tuple(input_ids.shape)}")
    am = attention_mask.to(torch.int64).cpu()
    pads = []
    for b in range(B):
        row = am[b]
        n_pad = int((row.cumsum(0) == 0).sum())
        if n_pad == T:
            raise ValueError(f"row {b} of attention_mask is all padding; every prompt needs at least one token")
        if not bool((row[n_pad:] == 1).all()):
            raise ValueError(f"row {b} of attention_mask is not left-padded (zeros, then ones); "
                             f"tokenize with tokenizer.padding_side = 'left'")
        pads.append(n_pad)
    return pads


class _Decoder:
    def __init__(self, levels, gammas, input_ids, pads, cap, temperature, top_k, top_p, generator,
                 eos, pad_id, streamer, device):
        self.levels = levels
        self.gammas = gammas
        self.top = len(levels) - 1
        self.greedy = temperature == 0.0
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = generator
        self.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        self.pad_id = pad_id
        self.streamer = streamer
        B, T = input_ids.shape
        self.B, self.prompt_len = B, T
        self.pads = pads
        self.buf = torch.full((B, cap), pad_id, dtype=torch.long, device=device)
        self.buf[:, :T] = input_ids
        self.cur = T
        pad_t = torch.tensor(pads, dtype=torch.long, device=device).view(B, 1)
        positions = torch.arange(cap, device=device).view(1, cap)
        self.pos_ids = (positions - pad_t).clamp(min=0)
        self.attn = (positions >= pad_t).to(torch.long) if any(pads) else None
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        self.num_new = [0] * B
        self.stats = [LevelStats(lvl.name) for lvl in levels]
        self.caches: dict[int, SharedStaticCache] = {}
        for lvl in levels:
            if lvl.is_model and id(lvl.root) not in self.caches:
                self.caches[id(lvl.root)] = SharedStaticCache(num_cache_layers(lvl.root), cap)
        self._set_mode = None
        self._modes_set: dict[int, str] = {}  # the mode each root was last switched to (switch only on change)
        if any(lvl.is_model and lvl.mode is not None for lvl in levels):
            from specq.transform.modes import set_mode

            self._set_mode = set_mode

    # -- one forward of a model level -------------------------------------------------------------
    def forward(self, i: int, upto: int, n_logits: int) -> torch.Tensor:
        """Run level i on the tokens it has not yet seen, up to position `upto`; logits of the last
        `n_logits` positions [B, n_logits, V]."""
        lvl: ModelLevel = self.levels[i]
        cache = self.caches[id(lvl.root)]
        start = cache.tracker.resume(lvl.writer_key, lvl.depth, exact=(i == self.top))
        start = min(start, upto - n_logits)
        if lvl.mode is not None and self._modes_set.get(id(lvl.root)) != lvl.mode:
            self._set_mode(lvl.root, lvl.mode)
            self._modes_set[id(lvl.root)] = lvl.mode
        cache.seek(start)
        kwargs = dict(input_ids=self.buf[:, start:upto], position_ids=self.pos_ids[:, start:upto],
                      past_key_values=cache, use_cache=True)
        if self.attn is not None:
            kwargs["attention_mask"] = self.attn[:, :upto]
        if lvl.accepts_logits_to_keep:
            kwargs["logits_to_keep"] = n_logits
        logits = lvl.module(**kwargs).logits[:, -n_logits:]
        cache.tracker.wrote(lvl.writer_key, lvl.depth, start, upto)
        self.stats[i].forwards += 1
        return logits

    def rollback(self, length: int) -> None:
        for cache in self.caches.values():
            cache.tracker.rollback(length)

    # -- the recursive producer ---------------------------------------------------------------------
    def produce(self, i: int, want: int):
        """Append up to `want` tokens of level i at self.cur. Returns (count, q) where q [B, count, V]
        is level i's sampling distribution at those positions (None when greedy, or one-hot drafts)."""
        lvl = self.levels[i]
        if not lvl.is_model:
            return self._produce_ngram(i, want)
        produced = 0
        qs = []
        while produced < want and not (i == self.top and bool(self.finished.all())):
            remaining = want - produced
            base = self.cur
            k, q_low = 0, None
            if i > 0 and remaining > 1:
                k, q_low = self.produce(i - 1, min(self.gammas[i - 1], remaining - 1))
            t0 = time.perf_counter()
            logits = self.forward(i, base + k, k + 1).float()
            draft = self.buf[:, base:base + k]
            if self.greedy:
                p = None
                if k:
                    n_acc, tokens = greedy_verify(draft, logits)
                else:
                    n_acc, tokens = torch.zeros(self.B, dtype=torch.long, device=logits.device), logits.argmax(-1)
            else:
                p = logits_to_probs(logits, self.temperature, self.top_k, self.top_p)
                if k:
                    n_acc, tokens = rejection_verify(draft, q_low, p, self.generator)
                else:
                    n_acc = torch.zeros(self.B, dtype=torch.long, device=logits.device)
                    tokens = sample_from(p[:, 0], self.generator).view(self.B, 1)
            active = ~self.finished
            n_new = n_acc + 1
            m = int(n_new[active].min()) if bool(active.any()) else int(n_new.min())
            m = min(m, remaining)
            new = tokens[:, :m]
            # first position whose token differs from what the levels below were fed
            same = (new[:, :min(m, k)] == draft[:, :min(m, k)]).all(dim=0)
            changed = int(same.to(torch.int64).cumprod(0).sum())
            self.buf[:, base:base + m] = new
            self.cur = base + m
            self.rollback(base + changed)
            if k:
                s = self.stats[i - 1]
                s.add_round(k, int(torch.minimum(n_acc, torch.full_like(n_acc, m))[active].sum()), int(active.sum()))
            if p is not None:
                qs.append(p[:, :m])
            produced += m
            if i == self.top:
                self._commit(base, m)
            self.stats[i].time_s += time.perf_counter() - t0
        q = torch.cat(qs, dim=1) if qs else None
        return produced, q

    def _produce_ngram(self, i: int, want: int):
        t0 = time.perf_counter()
        lvl = self.levels[i]
        rows = [self.buf[b, self.pads[b]:self.cur].tolist() for b in range(self.B)]
        draft, kk = lvl.drafter.propose(rows, want, fill=self.buf[:, self.cur - 1])
        if kk:
            self.buf[:, self.cur:self.cur + kk] = draft
            self.rollback(self.cur)
            self.cur += kk
        self.stats[i].time_s += time.perf_counter() - t0
        return kk, None

    def _commit(self, base: int, m: int) -> None:
        """Target-level bookkeeping for m new tokens at [base, base + m): EOS, counts, streaming."""
        new = self.buf[:, base:base + m]
        for b in range(self.B):
            if self.finished[b]:
                new[b] = self.pad_id
                continue
            n = m
            if self.eos is not None:
                hits = torch.isin(new[b], self.eos).nonzero()
                if len(hits):
                    n = int(hits[0]) + 1
                    new[b, n:] = self.pad_id
                    self.finished[b] = True
            self.num_new[b] += n
        if self.streamer is not None:
            self.streamer(new.clone())


def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 256, levels=("ngram", "mxfp4", "bf16"),
             gamma=4, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             attention_mask: torch.Tensor | None = None, eos_token_id=None, seed: int | None = None,
             pad_token_id: int | None = None, max_cache_len: int | None = None,
             streamer: Callable[[torch.Tensor], None] | None = None, compile=False) -> GenerateOutput:
    """Decode `max_new_tokens` tokens with a chain of speculative levels; lossless.

    levels: cheapest drafter ... target (last). Each entry is a mode of `model` ("w4a4", "mxfp4",
        "w4a16", "bf16"), "ngram[:N]" (prompt lookup, first level only), "shallow:L[:mode]" (the first
        L layers of `model` plus its norm and head, sharing its weights and KV cache), another model
        with the same vocabulary, or a (model, mode) pair. QSpec: ["w4a4", "w4a16"]; ML-SpecQD:
        ["mxfp4", "bf16"] or ["ngram", "mxfp4", "bf16"]. ["bf16"] alone is plain decoding.
    gamma: tokens level i drafts per round for level i + 1: an int, or one per drafting level.
    temperature 0: greedy (the target's argmax, exactly); > 0: sampling with the rejection rule, with
        top_k / top_p applied identically at every level, seeded by `seed`.
    attention_mask: for a batch of unequal prompts, left-padded (zeros first).
    eos_token_id: int or list; None takes the model's generation config; [] never stops early.
    streamer: called with the new tokens [B, m] of each round, as they are accepted.
    compile: True (or a dynamo backend name) runs greedy chains of modes (and "ngram") on compiled steps
        with CUDA graphs on GPU (specq.runtime.compiled.compiled_generate): same tokens, fewer launches.

    Returns `.sequences` [B, prompt + new] and `.stats` (per level and overall; `.stats.table()`).
    """
    # ---- validate everything before any work -------------------------------------------------------
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a 2-D LongTensor [batch, prompt_length] "
                         "(use tokenizer(..., return_tensors='pt').input_ids)")
    if input_ids.shape[1] < 1:
        raise ValueError("the prompt is empty; give at least one token (e.g. the BOS token)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if temperature is None or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    lvls = resolve_levels(model, levels)
    n_draft = len(lvls) - 1
    if isinstance(gamma, int):
        gammas = [gamma] * n_draft
    else:
        gammas = list(gamma)
        if len(gammas) != n_draft:
            raise ValueError(f"gamma has {len(gammas)} entries but there are {n_draft} drafting levels "
                             f"(one per level but the target)")
    for g in gammas:
        if not isinstance(g, int) or g < 1:
            raise ValueError(f"gamma must be >= 1 (tokens drafted per round), got {gamma!r}")
    device = first_param(model).device
    for lvl in lvls:
        if lvl.is_model and first_param(lvl.module).device != device:
            raise ValueError(f"level {lvl.name!r} is on {first_param(lvl.module).device} but the target is on {device}")
    B, T = input_ids.shape
    pads = _left_pad_counts(input_ids, attention_mask)
    needed = T + max_new_tokens
    cap = needed if max_cache_len is None else int(max_cache_len)
    if needed > cap:
        raise ValueError(f"the prompt ({T} tokens) plus max_new_tokens ({max_new_tokens}) needs a KV cache of "
                         f"{needed} positions but max_cache_len is {cap}; raise max_cache_len or shorten "
                         f"the prompt / max_new_tokens")
    for lvl in lvls:
        if lvl.is_model:
            limit = getattr(lvl.module.config, "max_position_embeddings", None)
            if limit is not None and needed - min(pads) > limit:
                raise ValueError(f"the prompt ({T - min(pads)} tokens) plus max_new_tokens ({max_new_tokens}) "
                                 f"exceeds the {limit} positions level {lvl.name!r} supports; "
                                 f"shorten the prompt or max_new_tokens")
    eos = _eos_list(model, eos_token_id)
    pad_id = _pad_id(model, pad_token_id, eos)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed) if seed is not None else int(torch.randint(2**62, (1,))))

    if compile:  # compiled steps / CUDA graphs (specq/runtime/compiled.py): greedy, equal-length prompts
        if temperature != 0 or any(pads) or streamer is not None or max_cache_len is not None:
            raise ValueError("compile=True runs greedy decoding (temperature 0) of equal-length prompts without "
                             "a streamer or max_cache_len; use compile=False for the rest")
        from specq.runtime.compiled import compiled_generate

        return compiled_generate(model, input_ids, max_new_tokens, levels=levels, gamma=gamma, eos_token_id=eos,
                                 pad_token_id=pad_id, compile="auto" if compile is True else compile)

    # ---- decode ------------------------------------------------------------------------------------
    dec = _Decoder(lvls, gammas, input_ids.to(device=device, dtype=torch.long), pads, cap, float(temperature),
                   top_k, top_p, generator, eos, pad_id, streamer, device)
    roots = {id(l.root): l.root for l in lvls if l.is_model}
    modes_before = {}
    if dec._set_mode is not None:
        from specq.transform.modes import get_mode

        modes_before = {k: get_mode(r) for k, r in roots.items() if any(
            l.is_model and l.root is r and l.mode is not None for l in lvls)}
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            if max_new_tokens > 0:
                dec.produce(dec.top, max_new_tokens)
    finally:
        for k, m in modes_before.items():
            dec._set_mode(roots[k], m)
    elapsed = time.perf_counter() - t0

    stats = GenerationStats(levels=dec.stats, batch_size=B, prompt_tokens=T, new_tokens=sum(dec.num_new),
                            time_s=elapsed,
                            kv_caches=[dict(model=type(roots[k]).__name__, layers=len(c.layers),
                                            allocations=c.allocations, bytes=c.nbytes(), max_len=cap)
                                       for k, c in dec.caches.items()])
    # Like HF generate(): the sequences end with the longest row's last token (its EOS); the rest of a
    # drafted block past every row's EOS is not output.
    end = min(dec.cur, T + max(dec.num_new, default=0))
    return GenerateOutput(sequences=dec.buf[:, :end].clone(), stats=stats, num_new_tokens=dec.num_new)
