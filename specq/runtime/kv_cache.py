"""One preallocated static KV cache per distinct model, written by position and shared by all its modes.

transformers' own `StaticCache` (5.x) writes each update at a running `cumulative_length` and has no
way to go back, and its sliding-window layers roll their buffers. Speculative decoding needs the
opposite: a verify forward must overwrite the positions a draft forward wrote, and positions past the
accepted length must simply be ignored until they are overwritten. So every layer here is a
gpt-fast-style buffer `[batch, kv_heads, max_len, head_dim]` whose write offset is set by the runtime
(`seek(pos)`) before each forward. The query offset the mask code reads (`get_seq_length`) is that same
write offset, and the keys a forward sees are the slots up to its last query, so stale entries past the
accepted length are never attended to and need no rollback. Sliding-window layers are kept at
full length too; the window is then applied by the mask (distances in slots equal distances in
positions because left padding shifts a row uniformly).

Validity bookkeeping (which positions hold entries computed from the current tokens, and by whom)
lives on the cache too (`CacheTracker`), because several levels — modes of one model, or a shallow copy
that uses the first layers — read and write the same buffers.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, StaticLayer


class PositionedStaticLayer(StaticLayer):
    """A full-length static layer whose writes land at the offset chosen by `SharedStaticCache.seek`."""

    is_sliding = False

    def __init__(self, max_cache_len: int, owner: "SharedStaticCache"):
        super().__init__(max_cache_len=max_cache_len)
        self._owner = owner
        self.start = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Allocated once, on the first forward, with the model's own kv-head count, head dim and dtype.
        super().lazy_initialization(key_states, value_states)
        self._owner.allocations += 1

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.start + n > self.max_cache_len:
            raise RuntimeError(
                f"KV cache overflow: writing {n} entries at position {self.start} into a cache of "
                f"{self.max_cache_len}; this is a specq runtime bug (inputs are checked up front)")
        end = self.start + n
        self.keys[:, :, self.start:end].copy_(key_states)
        self.values[:, :, self.start:end].copy_(value_states)
        # Only the slots up to the last query exist for this forward: attention (and transformers'
        # GQA repeat_kv, which copies what it is given) costs the current length, not the capacity.
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        # Read by the mask code as the query offset: the slot of the first query of this forward.
        return self.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.start + query_length, 0

    def reset(self) -> None:
        self.start = 0
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()


class CacheTracker:
    """Which leading positions of a shared cache hold entries computed from the current tokens.

    `valid[l]`: positions [0, valid[l]) of layer l were computed (by any writer) from the tokens now in
    the sequence. `owned[key]`: positions [0, owned[key]) of every layer the writer uses were computed
    by that writer (one (model, mode, depth)) itself. A drafter may read entries any writer made (QSpec
    reads the verifier's); the target must read only its own, or it would not be exact.
    """

    def __init__(self, num_layers: int):
        self.valid = [0] * num_layers
        self.owned: dict = {}

    def resume(self, key, depth: int, exact: bool) -> int:
        """First position a writer `key` using layers [0, depth) must recompute."""
        if exact:
            return self.owned.get(key, 0)
        return min(self.valid[:depth])

    def wrote(self, key, depth: int, start: int, end: int) -> None:
        for layer in range(depth):
            if start <= self.valid[layer]:
                self.valid[layer] = max(self.valid[layer], end)
        for other in self.owned:
            if other != key:
                self.owned[other] = min(self.owned[other], start)
        if start <= self.owned.get(key, 0):
            self.owned[key] = end

    def rollback(self, length: int) -> None:
        """Tokens from `length` on changed: entries there are stale for everyone."""
        self.valid = [min(v, length) for v in self.valid]
        for key in self.owned:
            self.owned[key] = min(self.owned[key], length)


class SharedStaticCache(Cache):
    """The static cache of one model (all its modes and its shallow copies use it)."""

    def __init__(self, num_layers: int, max_cache_len: int):
        self.allocations = 0  # layer buffers allocated; asserted == num_layers by tests (no re-allocation)
        layers = [PositionedStaticLayer(max_cache_len, self) for _ in range(num_layers)]
        super().__init__(layers=layers)
        self.capacity = max_cache_len
        self.tracker = CacheTracker(num_layers)

    @property
    def is_compileable(self) -> bool:
        # Key length varies per forward (views up to the last query), so this is an eager cache; it
        # also lets transformers drop the mask of an unpadded one-token step (sdpa then uses GQA
        # natively instead of materialising repeated K/V).
        return False

    def seek(self, pos: int) -> None:
        """Make the next forward write its entries at positions [pos, pos + n)."""
        for layer in self.layers:
            layer.start = pos

    def nbytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized)

    def buffer_ptrs(self) -> list[int]:
        return [layer.keys.data_ptr() for layer in self.layers if layer.is_initialized]


def num_cache_layers(model) -> int:
    """Number of decoder layers the model's forward will call `cache.update` for."""
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    if n is None:
        raise ValueError(f"cannot find the number of layers of {type(model).__name__} (no num_hidden_layers)")
    return int(n)
