"""Per-row positions in one static KV cache: every sequence of a batch at its own length.

Used by `CompiledSteps(row_positions=True)` and `compiled_generate(..., per_row=True)`. Tiny llama,
batch 8, 64 new tokens, gamma 4 (float32, CPU): mxfp4 -> bf16 took 33 verify forwards instead of 59,
n-gram -> bf16 46 instead of 62, same tokens (tests/test_row_positions.py checks losslessness).

Why: the compiled speculative loop (specq.runtime.compiled) keeps ONE write position for the whole
batch (transformers' `StaticLayer` writes at a single `cumulative_length`), so after a verify every
row advances by the smallest accepted count of the batch. With a position per row, each row keeps all
it accepted (issue 7, build item 4: no padding waste beyond one verify block).

What changes for a step of q tokens per row at positions pos [B] (a device tensor, no host sync):

- cache writes: each layer scatters row b's q new keys/values to pos[b] .. pos[b] + q - 1
  (`enable_row_positions` swaps the layers' `update` for `_row_update`; the buffer `row_position`
  it reads is the one `set_row_positions` copies into, so a captured graph replays with new positions);
- rotary positions: `position_ids = pos[:, None] + arange(q)`;
- the attention mask: a prepared 4D mask (key l visible to query t of row b iff l <= pos[b] + t),
  which transformers' masking utilities pass through as-is. Entries past a row's length are masked,
  so a rejected draft's cache entries need no cleanup: the next write at that position replaces them.
"""

from __future__ import annotations

import types

import torch


def _row_update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
    """StaticLayer.update with one write position per row (self.row_position [B])."""
    if not self.is_initialized:
        self.lazy_initialization(key_states, value_states)
    b, h, q, d = key_states.shape
    idx = self.row_position[:, None] + torch.arange(q, device=key_states.device)  # [B, q]
    index = idx[:, None, :, None].expand(b, h, q, d)
    self.keys.scatter_(2, index, key_states)
    self.values.scatter_(2, index, value_states)
    return self.keys, self.values


def enable_row_positions(cache, batch_size: int) -> torch.Tensor:
    """Make every layer of an allocated `StaticCache` write each row at its own position.

    Returns the [batch_size] int64 position buffer the layers read (zeros); set it with
    `set_row_positions`. The cache is changed in place and keeps working for these forwards only:
    transformers' own single-position bookkeeping (`cumulative_length`) is no longer updated."""
    layers = list(cache.layers)
    if not layers or not all(getattr(layer, "is_initialized", False) for layer in layers):
        raise ValueError("enable_row_positions needs an allocated StaticCache "
                         "(specq.runtime.compiled.make_static_cache)")
    device = layers[0].keys.device
    if layers[0].keys.shape[0] != batch_size:
        raise ValueError(f"the cache holds {layers[0].keys.shape[0]} rows, not {batch_size}")
    pos = torch.zeros(batch_size, dtype=torch.long, device=device)
    for layer in layers:
        layer.row_position = pos
        layer.update = types.MethodType(_row_update, layer)
    return pos


def set_row_positions(cache, positions: torch.Tensor) -> None:
    """Copy `positions` [B] into the layers' position buffer (a device write, no sync)."""
    cache.layers[0].row_position.copy_(positions)


def row_mask(positions: torch.Tensor, q: int, max_len: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, 1, q, max_len]: key l visible to query t of row b iff l <= positions[b] + t.

    bool (True = attend) when `dtype` is None (SDPA-style implementations); else additive, in
    `dtype` (0 where visible, the dtype's minimum elsewhere) for implementations that add the mask."""
    qpos = positions[:, None] + torch.arange(q, device=positions.device)  # [B, q]
    visible = (torch.arange(max_len, device=positions.device)[None, None, :] <= qpos[:, :, None])[:, None]
    if dtype is None:
        return visible
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)


def forward_rows(model, cache, input_ids: torch.Tensor, positions: torch.Tensor):
    """Logits [B, q, V] of `input_ids` [B, q], row b placed at positions[b] (a [B] device tensor)."""
    b, q = input_ids.shape
    positions = positions.to(device=input_ids.device, dtype=torch.long).reshape(b)
    set_row_positions(cache, positions)
    position_ids = positions[:, None] + torch.arange(q, device=input_ids.device)
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    dtype = None if impl != "eager" else next(model.parameters()).dtype
    mask = row_mask(positions, q, cache.layers[0].max_cache_len, dtype)
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, past_key_values=cache,
                use_cache=True)
    return out.logits
