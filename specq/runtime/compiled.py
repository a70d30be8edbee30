"""Compiled decoding steps: one static-shape forward per (mode, query length), captured as a CUDA graph.

Why: at batch 1 a decoder step is a few milliseconds of weight reads split over ~1000 small kernels;
launching them from Python costs as much again. gpt-fast's recipe removes that cost: compile a small
*pure step function* with static shapes, replay it as a CUDA graph, keep the KV cache in a
preallocated buffer written by position. Here the step function is

    logits = step(input_ids [B, q], position [] int64 on device)

over one Hugging Face `StaticCache` shared by every mode of the model (the cache writes the q new
entries at `position .. position+q-1`; entries past the accepted length are masked by position and
overwritten later, so a speculative round needs no copy and no rollback). The mode is baked into
each graph: `CompiledSteps` keeps one graph per (mode, q), made on first use and replayed after.

What a caller gets (all tensors stay on the device; nothing here reads a value back to the host):

* `logits(input_ids, position)` and `greedy(input_ids, position)`: one forward of the active mode.
* `greedy_burst(token, position, n)`: n autoregressive greedy steps of the active mode in ONE graph
  (each step's argmax feeds the next step inside the graph), returning the n tokens — a whole draft
  burst with no host sync; the host reads acceptance once per verify.
* `decode_greedy(...)`: target-only greedy decoding built from bursts (one host read per burst, to
  stop at EOS), the compiled autoregressive baseline.

`compiled_generate` (reached through `specq.generate(..., compile=True)`) is the greedy multi-level
loop on these steps: a round of the two lowest model levels is one graph, the host reads the
accepted count and tokens once per verify.

Why transformers' `StaticCache` here and not the runtime's `SharedStaticCache`: the runtime seeks
its cache with a Python int (`layer.start`), which dynamo would specialise on, compiling one graph
per position. StaticCache keeps its write offset in a device tensor (`cumulative_length`), so the
position is a graph input and one graph serves every position. The sharing rule is the same: one
cache per model, every mode writes by position, a verify overwrites the draft's entries. Sliding
window layers are refused (their ring buffer cannot be rewound).

On CPU (or with `cuda_graphs=False`) the same API runs the compiled (or eager) step directly; with
inductor on the CPU the step is compiled with the recipe of compiled_cpu.py (frozen weights).
Compile counts are observable (`compile_count`) so tests can assert there are no recompiles in
steady state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


def active_mode(model: torch.nn.Module) -> str:
    """The model's active specq mode; "bf16" for a plain (untransformed) model."""
    try:
        from specq.transform.modes import find_state
    except ImportError:  # transform layer absent: only plain models exist
        return "bf16"
    try:
        return find_state(model).mode
    except ValueError:
        return "bf16"


@contextlib.contextmanager
def _mode(model: torch.nn.Module, mode: str):
    """Temporarily switch a multi-mode model; a plain model only accepts "bf16"."""
    if mode == active_mode(model):
        yield
        return
    from specq.transform.modes import mode as specq_mode

    with specq_mode(model, mode):
        yield


def make_static_cache(model: torch.nn.Module, batch_size: int, max_len: int):
    """A transformers `StaticCache` for `model`, allocated now (not lazily inside a compiled region).

    Early allocation matters: the cache tensors are marked as static addresses when allocated
    outside of tracing, which is what lets compiled graphs and CUDA graphs write them in place.
    """
    from transformers import StaticCache

    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    cache = StaticCache(config=config, max_cache_len=int(max_len))
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    p = next(model.parameters())
    cache.early_initialization(batch_size, heads, head_dim, p.dtype, p.device)
    return cache


def _check_cache(cache) -> None:
    layers = getattr(cache, "layers", None)
    if not layers:
        raise TypeError(f"compiled steps need a transformers StaticCache (got {type(cache).__name__}); "
                        "make one with specq.runtime.compiled.make_static_cache(model, batch, max_len)")
    for layer in layers:
        if getattr(layer, "is_sliding", False):
            raise NotImplementedError(
                "compiled steps rewind the cache by position, which a sliding-window cache layer "
                "cannot do (its ring buffer has already dropped the old entries); decode this model "
                "with compile=False")
        if not getattr(layer, "is_initialized", False):
            raise ValueError("the StaticCache is not allocated yet; build it with "
                             "specq.runtime.compiled.make_static_cache (early initialization)")


def set_cache_position(cache, position: torch.Tensor) -> None:
    """Make the next forward write its entries from `position` on (a device-side copy, no sync).

    transformers' StaticLayer writes at its `cumulative_length` counter; setting it is how a
    speculative round rewinds to the accepted length.
    """
    for layer in cache.layers:
        layer.cumulative_length.copy_(position)


def forward_logits(model, cache, input_ids: torch.Tensor, position: torch.Tensor, mode: str = "bf16"):
    """The pure step function: logits [B, q, V] of `input_ids` [B, q] placed at `position`.

    `mode` is the model's active mode (the caller switches it): an argument so that compiled code is
    specialised and guarded per mode even where the model's mode holder is not guarded on (the CPU
    recipe skips the guards on the model's modules, compiled_cpu.py). Reading its value here is what
    makes dynamo install that guard; an unused argument gets none.
    """
    if not isinstance(mode, str) or not mode:
        raise ValueError(f"mode must be a mode name, got {mode!r}")
    if getattr(cache.layers[0], "row_position", None) is not None:  # one position per row: position [B]
        from specq.runtime.row_positions import forward_rows

        return forward_rows(model, cache, input_ids, position)
    set_cache_position(cache, position)
    b, q = input_ids.shape
    position_ids = (position + torch.arange(q, device=input_ids.device)).unsqueeze(0).expand(b, q)
    out = model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True)
    return out.logits


def forward_step(model, cache, input_ids: torch.Tensor, position: torch.Tensor, mode: str = "bf16"):
    """What CompiledSteps compiles: (logits [B, q, V], their argmax [B, q]). The argmax inside the
    compiled code: on the CPU eager argmax over a bf16 vocabulary costs ~0.2-0.6 ms a step, a fused
    reduction a fraction of that."""
    logits = forward_logits(model, cache, input_ids, position, mode)
    return logits, logits.argmax(-1)


# Grouped-query attention as one SDPA head per key/value head (specq.runtime.attention) in the compiled
# steps: on CUDA it drops the two copies that repeat K and V over the whole static cache for every
# query head (~2 x 3.8 us per layer on the 8B shape). SPECQ_GROUPED_SDPA=0 turns it off (A/B).
GROUPED_SDPA = os.environ.get("SPECQ_GROUPED_SDPA", "1") != "0"


# Most prompt tokens (batch x padded length) a prefill graph may hold; past this the prefill is eager.
PREFILL_GRAPH_TOKENS = 2048


def _with_grouped_sdpa(step, model):
    """`step` run with the model's "sdpa" attention switched to grouped SDPA (traced that way too)."""
    from specq.runtime.attention import grouped_sdpa, sdpa_configs

    configs = sdpa_configs(model)

    def call(*args):
        with grouped_sdpa(model, configs):
            return step(*args)

    return call


def _greedy_burst(step, model, cache, token, position, n: int, mode: str):
    """n greedy steps, each feeding its argmax to the next; returns tokens [B, n] (device only)."""
    tokens = []
    for i in range(n):
        _, a = step(model, cache, token, position + i, mode)
        token = a[:, -1:].clone()  # [B, 1] with the strides of a fresh tensor
        tokens.append(token)
    return torch.cat(tokens, dim=1)


@dataclass
class _Captured:
    """A CUDA graph with its static inputs and outputs."""

    graph: "torch.cuda.CUDAGraph"
    inputs: tuple
    outputs: tuple


@dataclass
class StepStats:
    graphs_captured: int = 0
    replays: int = 0
    eager_calls: int = 0
    keys: list = field(default_factory=list)


class CompiledSteps:
    """Compiled step functions over one model and one static KV cache, one per (mode, query length).

    Args:
        model: an HF causal LM, plain or transformed by `specq.transform` (its active mode decides
            which graph a call uses).
        cache: a `StaticCache` allocated up front (`make_static_cache`), shared by all modes.
        compile: "inductor" (default on CUDA), any dynamo backend name, or None/False for eager
            (default on CPU: each inductor graph takes ~30-50 s to compile there, which one short
            request does not win back; with "inductor" the CPU gets the frozen-weight recipe).
        cuda_graphs: capture and replay CUDA graphs (default: True on CUDA).
        max_graph_q: longer queries (a prefill) get no graph of their own length: one per prompt
            length would cost a compile per request.
        max_prefill_graph: a prefill of max_graph_q < q <= max_prefill_graph positions is padded on the
            right to the next power of two (>= 64) and runs that bucket's graph, so a few graphs serve
            every prompt length (the pad positions come after the prompt: causal attention keeps them
            out of the prompt's logits, and their cache entries are overwritten by the decode steps
            before any query can see them). Longer prompts, or a bucket past the cache, run eagerly.
            Default: 512 with CUDA graphs (8B shape, 128-token prompt: the request took ~14 ms less,
            e2e 167.0 -> 168.5 tok/s for 256 tokens), 0 (off) without them, where each bucket would
            cost a compile for little.
        freeze: compile with the CPU recipe of compiled_cpu.py (frozen weights, decomposed specq ops,
            grouped-query SDPA, no module guards, fused sibling linears). Default: on for "inductor"
            on the CPU.
        (On CUDA the compiled steps also route dense linears at <= 4 rows of x to specq's GEMV op
        (specq.passes.dense_gemv) and attention to grouped SDPA / specq's decode-attention kernel
        (specq.runtime.attention); SPECQ_DENSE_GEMV=0, SPECQ_GROUPED_SDPA=0 and
        SPECQ_DECODE_ATTENTION=0 turn them off for A/B measurements.)
        fuse_siblings: without freezing (CUDA), re-home sibling linears' weights (q/k/v, gate/up)
            into one tensor each (specq.runtime.sibling_storage: same values, no extra memory) and
            run each group as one matmul (specq.passes.fuse_siblings). Default: on when compiling
            without freezing.
    """

    def __init__(self, model, cache, *, compile="auto", cuda_graphs: bool | None = None,
                 max_graph_q: int = 32, max_prefill_graph: int | None = None, freeze: bool | None = None,
                 fuse_siblings: bool | None = None, row_positions: bool = False):
        _check_cache(cache)
        self.model = model
        self.cache = cache
        # one write position per row (specq.runtime.row_positions): positions are [B] tensors
        self.row_positions = bool(row_positions)
        if self.row_positions:
            from specq.runtime.row_positions import enable_row_positions

            enable_row_positions(cache, cache.layers[0].keys.shape[0])
        self.device = next(model.parameters()).device
        on_cuda = self.device.type == "cuda"
        if compile == "auto":
            compile = "inductor" if on_cuda else None
        # CPU + inductor: weights frozen into the compiled code (see compiled_cpu.py)
        self.freeze = (compile == "inductor" and not on_cuda) if freeze is None else bool(freeze)
        if self.freeze and compile != "inductor":
            raise ValueError("freeze=True needs compile='inductor' (freezing is an inductor feature)")
        self.cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.max_graph_q = int(max_graph_q)
        self.max_prefill_graph = (512 if self.cuda_graphs else 0) if max_prefill_graph is None else int(max_prefill_graph)
        self.compile_count = 0  # graphs dynamo handed to the backend (one per mode and shape)
        self.stats = StepStats()
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.fuse_siblings = bool(compile) and not self.freeze if fuse_siblings is None else bool(fuse_siblings)
        self.sibling_groups = 0
        # dense linears at <= 4 rows of x -> specq's GEMV op where it is faster (CUDA; specq.passes.
        # dense_gemv); SPECQ_DENSE_GEMV=0 keeps inductor's cuBLAS calls (for A/B measurements)
        self.dense_gemv = (bool(compile) and on_cuda and not self.freeze
                           and os.environ.get("SPECQ_DENSE_GEMV", "1") != "0")
        share_storage = self.fuse_siblings and not self.freeze  # (the CPU recipe fuses in its own backend)
        if share_storage:
            from specq.runtime.sibling_storage import share_sibling_storage, sibling_groups

            one = torch.zeros((1, 1), dtype=torch.long, device=self.device)
            self.sibling_groups = share_sibling_storage(model, sibling_groups(model, one))
        if compile:
            _raise_recompile_limit(64)
            inner = compile

            def counting_backend(gm, example_inputs):
                self.compile_count += 1
                if share_storage:
                    from specq.passes.fuse_siblings import fuse_sibling_linears

                    gm, _ = fuse_sibling_linears(gm, example_inputs, allow_copies=False)
                if self.dense_gemv:
                    from specq.passes.dense_gemv import route_small_linears

                    gm, _ = route_small_linears(gm)
                backend = torch._dynamo.lookup_backend(inner) if isinstance(inner, str) else inner
                t0 = time.perf_counter()
                out = backend(gm, example_inputs)
                log.info("compiled step graph %d (%s) in %.0f s", self.compile_count,
                         inner if isinstance(inner, str) else getattr(inner, "__name__", "backend"),
                         time.perf_counter() - t0)
                return out

            if self.freeze:  # the CPU recipe: frozen weights, no per-call Python (compiled_cpu.py)
                from specq.runtime.compiled_cpu import frozen_step

                self._step = frozen_step(forward_step, model, counting_backend)
            else:
                compiled = torch.compile(forward_step, backend=counting_backend, fullgraph=True, dynamic=False)
                self._step = _with_grouped_sdpa(compiled, model) if GROUPED_SDPA else compiled
        else:
            self._step = forward_step

    def __deepcopy__(self, memo):  # a copied model gets no steps (graphs and cache are device state)
        return None

    def __reduce__(self):
        return (_none, ())

    # ------------------------------------------------------------------------------ single forwards

    @property
    def mode(self) -> str:
        return active_mode(self.model)

    def logits(self, input_ids: torch.Tensor, position, mode: str | None = None) -> torch.Tensor:
        """Logits [B, q, V] of `mode` (default: the active mode). Under CUDA graphs the result is a
        static buffer that the next call of the same (mode, q) overwrites: read or copy it first."""
        return self._forward(input_ids, position, mode)[0]

    def greedy(self, input_ids: torch.Tensor, position, mode: str | None = None):
        """(argmax tokens [B, q], logits [B, q, V]) of `mode`, both on the device."""
        logits, tokens = self._forward(input_ids, position, mode)
        return tokens, logits

    def verify(self, input_ids: torch.Tensor, position, mode: str | None = None):
        """Greedy verification of `input_ids` = [x, d_1 .. d_k] (x: the last accepted token).

        Returns (a [B, k+1], n_acc [B]): the verifier's argmax at every position and the number of
        leading drafts equal to it, computed in the same graph (one graph per (mode, k+1)).
        """
        input_ids, position = self._prepare(input_ids, position)
        mode = mode or self.mode
        step, model, cache = self._step, self.model, self.cache

        def fn(ids, pos):
            with _mode(model, mode):
                _, a = step(model, cache, ids, pos, mode)
            return a, _n_accepted(ids[:, 1:], a)

        return self._run(("verify", mode, tuple(input_ids.shape)), fn, (input_ids, position))

    def spec_round(self, token: torch.Tensor, position, draft_mode: str, gamma: int, target_mode: str):
        """One whole greedy speculative round in one graph: `gamma` draft steps of `draft_mode` after
        `token` [B, 1] at `position`, then one `target_mode` forward over [token, drafts].

        Returns (a [B, gamma+1], n_acc [B]) as `verify` does; the drafts are a[:, :n_acc]. The
        host reads n_acc once per round, nothing inside.
        """
        token, position = self._prepare(token, position)
        gamma = int(gamma)
        step, model, cache = self._step, self.model, self.cache

        def fn(tok, pos):
            with _mode(model, draft_mode):
                drafts = _greedy_burst(step, model, cache, tok, pos, gamma, draft_mode)
            ids = torch.cat([tok, drafts], dim=1)
            with _mode(model, target_mode):
                _, a = step(model, cache, ids, pos, target_mode)
            return a, _n_accepted(drafts, a)

        key = ("round", draft_mode, gamma, target_mode, tuple(token.shape))
        return self._run(key, fn, (token, position))

    def _run(self, key, fn, args):
        if not self.cuda_graphs:
            self.stats.eager_calls += 1
            with torch.no_grad():
                return fn(*args)
        return self._replay(key, fn, args)

    def _prefill_bucket(self, q: int, position, batch: int = 1) -> int | None:
        """The padded length of a q-token prefill at `position` (a host int), or None: run it eagerly.
        Eager too when batch x bucket passes PREFILL_GRAPH_TOKENS: a graph keeps its logits buffer
        ([B, bucket, vocab]) for good, gigabytes at batch 32."""
        if q <= self.max_graph_q or q > self.max_prefill_graph or isinstance(position, torch.Tensor):
            return None
        bucket = max(64, 1 << (q - 1).bit_length())
        if int(position) + bucket > self.cache.layers[0].max_cache_len or batch * bucket > PREFILL_GRAPH_TOKENS:
            return None
        return bucket

    def _forward(self, input_ids, position, mode=None):
        bucket = (self._prefill_bucket(input_ids.shape[1], position, input_ids.shape[0])
                  if input_ids.dim() == 2 else None)
        input_ids, position = self._prepare(input_ids, position)
        q = input_ids.shape[1]
        mode = mode or self.mode
        if bucket is not None:  # pad on the right (repeating the last token) to the bucket's graph
            pad = input_ids[:, -1:].expand(-1, bucket - q)
            ids = torch.cat([input_ids, pad], dim=1)
            logits, tokens = self._run(("fwd", mode, tuple(ids.shape)), self._single_fn(mode), (ids, position))
            return logits[:, :q], tokens[:, :q]
        if q > self.max_graph_q:  # prefill: eager, once per request
            self.stats.eager_calls += 1
            with torch.no_grad(), _mode(self.model, mode):
                logits = forward_logits(self.model, self.cache, input_ids, position, mode)
            return logits, logits.argmax(-1)
        return self._run(("fwd", mode, tuple(input_ids.shape)), self._single_fn(mode), (input_ids, position))

    def _single_fn(self, mode):
        step, model, cache = self._step, self.model, self.cache

        def fn(ids, pos):
            with _mode(model, mode):
                return step(model, cache, ids, pos, mode)

        return fn

    # ------------------------------------------------------------------------------ draft bursts

    def greedy_burst(self, token: torch.Tensor, position, n: int, mode: str | None = None) -> torch.Tensor:
        """n greedy tokens [B, n] of the active mode after `token` [B, 1] placed at `position`.

        Writes cache entries position .. position+n-1. One CUDA graph per (mode, n): no host sync.
        """
        token, position = self._prepare(token, position)
        if token.shape[1] != 1:
            raise ValueError(f"greedy_burst starts from one token per sequence, got shape {tuple(token.shape)}")
        n = int(n)
        if n < 1:
            raise ValueError(f"greedy_burst needs n >= 1, got {n}")
        mode = mode or self.mode
        step, model, cache = self._step, self.model, self.cache

        def fn(tok, pos):
            with _mode(model, mode):
                return (_greedy_burst(step, model, cache, tok, pos, n, mode),)

        return self._run(("burst", mode, tuple(token.shape), n), fn, (token, position))[0]

    # ------------------------------------------------------------------------------ graphs

    def _prepare(self, input_ids, position):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, q], got shape {tuple(input_ids.shape)}")
        # a fresh contiguous copy: dynamo guards on strides, and slices of a longer sequence carry
        # the parent's strides (a recompile per slice otherwise)
        input_ids = input_ids.to(self.device, torch.long).clone(memory_format=torch.contiguous_format)
        if self.row_positions:  # [B]: one position per row (an int or a 0-d tensor: every row)
            b = input_ids.shape[0]
            position = torch.as_tensor(position, dtype=torch.long).to(self.device)
            return input_ids, position.expand(b).clone() if position.dim() == 0 else position.reshape(b).clone()
        if isinstance(position, torch.Tensor):
            position = position.to(self.device, torch.long).reshape(())
        else:
            position = torch.tensor(int(position), dtype=torch.long, device=self.device)
        return input_ids, position

    def _replay(self, key, fn, args):
        cap = self._graphs.get(key)
        if cap is None:
            cap = self._capture(key, fn, args)
        for buf, a in zip(cap.inputs, args):
            buf.copy_(a, non_blocking=True)
        cap.graph.replay()
        self.stats.replays += 1
        return cap.outputs

    def _capture(self, key, fn, args) -> _Captured:
        """Warm up (compiles, autotunes) on a side stream, then capture. The warm-up runs the real
        step on the real inputs, so the cache entries it writes are the ones the replay writes."""
        inputs = tuple(a.clone() for a in args)
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(2):
                fn(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self._pool):
            outputs = fn(*inputs)
        cap = _Captured(graph=graph, inputs=inputs, outputs=tuple(outputs))
        self._graphs[key] = cap
        self.stats.graphs_captured += 1
        self.stats.keys.append(key)
        log.info("compiled steps: captured %s (%d graphs, %d compiles)", key, len(self._graphs), self.compile_count)
        return cap

    # ------------------------------------------------------------------------------ decoding

    def prefill(self, input_ids: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """Write the prompt [B, P] at positions 0..P-1; returns the greedy next token [B, 1]."""
        tokens, _ = self.greedy(input_ids, 0, mode)
        return tokens[:, -1:].clone()

    def decode_greedy(self, input_ids: torch.Tensor, max_new_tokens: int, *, burst: int = 16,
                      eos_token_id=None, mode: str | None = None) -> torch.Tensor:
        """Greedy target-only decoding with the active mode: prompt [B, P] -> sequences [B, P+new].

        Tokens come in bursts of `burst` (one graph each) and the host looks at them once per burst
        to stop at EOS; tokens after the first EOS of a sequence are replaced by EOS. The cache
        must hold P + max_new_tokens + burst positions.
        """
        mode = mode or self.mode
        prompt_len = input_ids.shape[1]
        max_new_tokens = int(max_new_tokens)
        capacity = self.cache.layers[0].max_cache_len
        if prompt_len + max_new_tokens + burst > capacity:
            raise ValueError(f"the static cache holds {capacity} positions, decoding needs "
                             f"{prompt_len + max_new_tokens + burst} (prompt {prompt_len} + "
                             f"{max_new_tokens} new + burst {burst}); make a larger cache")
        first = self.prefill(input_ids, mode)
        chunks = [first]
        produced = 1
        eos = _eos_set(eos_token_id)
        pos = prompt_len
        while produced < max_new_tokens:
            if eos and _all_finished(torch.cat(chunks, 1), eos):
                break
            toks = self.greedy_burst(chunks[-1][:, -1:], pos, burst, mode).clone()
            chunks.append(toks)
            produced += burst
            pos += burst
        new = torch.cat(chunks, 1)[:, :max_new_tokens]
        if eos:
            new = _pad_after_eos(new, eos)
        return torch.cat([input_ids.to(new.device), new], dim=1)


def _none():
    return None


def _n_accepted(drafts: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Leading drafts [B, k] equal to the verifier's argmax a [B, k+1]: n_acc [B] (int64)."""
    k = drafts.shape[1]
    return (drafts == a[:, :k]).to(torch.int64).cumprod(dim=1).sum(dim=1)


def _eos_set(eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, int):
        return (eos_token_id,)
    return tuple(int(e) for e in eos_token_id)


def _all_finished(tokens: torch.Tensor, eos: tuple[int, ...]) -> bool:
    hit = torch.zeros_like(tokens, dtype=torch.bool)
    for e in eos:
        hit |= tokens == e
    return bool(hit.any(dim=1).all())


def _pad_after_eos(tokens: torch.Tensor, eos: tuple[int, ...]) -> torch.Tensor:
    hit = torch.zeros_like(tokens, dtype=torch.bool)
    for e in eos:
        hit |= tokens == e
    after = (hit.cumsum(1) - hit.long()) > 0  # strictly after the first EOS
    return torch.where(after, torch.full_like(tokens, eos[0]), tokens)


def _raise_recompile_limit(n: int) -> None:
    """One compiled entry per (mode, shape) of the same step function: 4 modes x several query
    lengths exceed dynamo's default limit of 8 entries per code object."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < n:
            setattr(cfg, name, n)
    if hasattr(cfg, "accumulated_recompile_limit") and cfg.accumulated_recompile_limit < 4 * n:
        cfg.accumulated_recompile_limit = 4 * n


# ------------------------------------------------------------------------------------------------
# Compiled greedy multi-level speculative decoding


AR_BURST = 16  # greedy tokens per graph replay when the target decodes alone (one host read each)
# The model's CompiledSteps live in its __dict__ (not a submodule: no state_dict entry), so they go
# away with the model; CompiledSteps copies and pickles as None (a CUDA graph can be neither).
_STEPS_ATTR = "_specq_compiled_steps"


def release_steps(model) -> None:
    """Drop the model's compiled steps (graphs, static cache) now, e.g. before switching devices."""
    model.__dict__.pop(_STEPS_ATTR, None)


def get_steps(model, batch_size: int, min_len: int, *, compile="auto", cuda_graphs=None,
              round_to: int = 256, row_positions: bool = False) -> CompiledSteps:
    """The model's `CompiledSteps` for this batch size, reused across calls (graphs and compiled
    code are kept), or a new one over a new static cache of at least `min_len` positions."""
    steps = model.__dict__.get(_STEPS_ATTR)
    key = (int(batch_size), compile, cuda_graphs, bool(row_positions))
    if steps is not None and steps._key == key and steps.cache.layers[0].max_cache_len >= min_len:
        return steps
    max_len = -(-int(min_len) // round_to) * round_to
    if steps is not None:  # free the old graphs and cache before allocating new ones
        release_steps(model)
        del steps
    cache = make_static_cache(model, batch_size, max_len)
    steps = CompiledSteps(model, cache, compile=compile, cuda_graphs=cuda_graphs, row_positions=row_positions)
    steps._key = key
    model.__dict__[_STEPS_ATTR] = steps
    return steps


def compiled_generate(model, input_ids: torch.Tensor, max_new_tokens: int = 256,
                      levels=("mxfp4", "bf16"), gamma=4, *, eos_token_id=None, pad_token_id=None,
                      compile="auto", cuda_graphs=None, per_row="auto"):
    """Greedy multi-level speculative decoding on compiled steps; output equals target-only greedy.

    The fast path of `specq.generate` for its most common use: greedy, every model level a mode of
    `model` (plus an optional "ngram[:N]" first level), prompts of equal length. A round of the top
    two model levels (drafts, then the verify forward) is ONE graph when the draft level is the
    lowest model level; the host reads the accepted count and tokens once per verify. Returns the
    runtime's `GenerateOutput` (sequences, stats per level, new tokens per row).

    per_row: every row keeps all the drafts it accepted (its own cache position,
    specq.runtime.row_positions) instead of the batch advancing by its smallest accepted count.
    Two levels at most (a drafting level and the target). "auto" (the default): on for a batch of
    several rows with two levels (tiny llama, batch 8: 33 verify forwards instead of 59), off
    otherwise (one row, autoregressive decoding, three levels).
    """
    from specq.runtime.drafters import NgramDrafter
    from specq.runtime.generate import GenerateOutput, _eos_list, _pad_id
    from specq.runtime.levels import MODE_NAMES
    from specq.runtime.stats import GenerationStats, LevelStats

    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError("input_ids must be a non-empty 2-D LongTensor [batch, prompt_length]")
    if isinstance(levels, str):
        levels = [x.strip() for x in levels.split(",") if x.strip()]
    levels = list(levels)
    specs = []  # ("ngram", drafter) | ("mode", name)
    for i, lvl in enumerate(levels):
        if isinstance(lvl, str) and lvl.split(":")[0] == "ngram":
            if i != 0:
                raise ValueError(f"levels[{i}]: 'ngram' can only be the first (cheapest) level")
            n = int(lvl.split(":")[1]) if ":" in lvl else 3
            specs.append(("ngram", NgramDrafter(max_ngram=n)))
        elif isinstance(lvl, str) and lvl in MODE_NAMES:
            if lvl != "bf16" and not _is_multimode(model):
                raise ValueError(f"levels[{i}]: mode {lvl!r} needs a multi-mode model; run "
                                 f"specq.transform(model, modes=('bf16', {lvl!r})) first")
            specs.append(("mode", lvl))
        else:
            raise NotImplementedError(
                f"levels[{i}]={lvl!r}: the compiled path runs modes of the model itself and 'ngram'; "
                "decode other levels (other models, shallow copies) with compile=False")
    if not specs or specs[-1][0] != "mode":
        raise ValueError("the last level is the target and must be a mode of the model, e.g. 'bf16'")
    n_draft = len(specs) - 1
    gammas = [int(gamma)] * n_draft if isinstance(gamma, int) else [int(g) for g in gamma]
    if len(gammas) != n_draft or any(g < 1 for g in gammas):
        raise ValueError(f"gamma needs one value >= 1 per drafting level ({n_draft}), got {gamma!r}")

    device = next(model.parameters()).device
    ids = input_ids.to(device=device, dtype=torch.long)
    B, P = ids.shape
    eos = _eos_list(model, eos_token_id)
    pad = _pad_id(model, pad_token_id, eos)
    # positions written past the last kept token: a verify block per level, or one AR burst
    needed = P + int(max_new_tokens) + 2 * (sum(gammas) + len(specs)) + AR_BURST + 2
    if per_row == "auto":
        per_row = B > 1 and len(specs) == 2
    elif not isinstance(per_row, bool):
        raise ValueError(f"per_row must be True, False or 'auto', got {per_row!r}")
    if per_row and len(specs) > 2:
        raise ValueError("per_row decoding supports two levels (a drafting level and the target), "
                         f"got {len(specs)}")
    steps = get_steps(model, B, needed, compile=compile, cuda_graphs=cuda_graphs, row_positions=per_row)
    stats = [LevelStats(name if isinstance(name, str) else "ngram") for name in levels]

    seqs = [row.tolist() for row in ids.cpu()]
    finished = [False] * B
    num_new = [0] * B
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def host(*tensors):
        """One device->host transfer for several small int tensors."""
        flat = torch.cat([t.reshape(B, -1) for t in tensors], dim=1).cpu()
        out, j = [], 0
        for t in tensors:
            w = t.reshape(B, -1).shape[1]
            out.append(flat[:, j:j + w])
            j += w
        return out

    def produce(i: int, x: torch.Tensor, pos: int, g: int, ctx: list[list[int]]):
        """g tokens [B, g] (device) that level i emits greedily after token x [B, 1] at `pos`.
        ctx: the rows' tokens up to and including x (host), for n-gram lookup."""
        kind, what = specs[i]
        t0 = time.perf_counter()
        if kind == "ngram":
            draft, kk = what.propose(ctx, g, fill=x.view(-1))
            if kk < g:  # pad with the last token: a draft is only a guess
                fill = (draft[:, -1:] if kk else x).expand(B, g - kk)
                draft = torch.cat([draft, fill], dim=1)
            stats[i].time_s += time.perf_counter() - t0
            return draft
        if i == 0:
            out = steps.greedy_burst(x, pos, g, mode=what)
            stats[i].forwards += g
            stats[i].time_s += time.perf_counter() - t0
            return out.clone()
        out = []
        got = 0
        ctx = [list(r) for r in ctx]
        while got < g:
            gi = gammas[i - 1]
            d = produce(i - 1, x, pos, gi, ctx)
            t1 = time.perf_counter()
            a, n_acc = steps.verify(torch.cat([x, d], dim=1), pos, mode=what)
            stats[i].forwards += 1
            a_h, n_h = host(a, n_acc)
            n = int(n_h.min())
            m = n + 1
            stats[i - 1].add_round(gi, int(n_h.clamp(max=m).sum()), B)
            new = a[:, :m].clone()
            out.append(new)
            for b in range(B):
                ctx[b].extend(a_h[b, :m].tolist())
            x = a[:, n:n + 1].clone()
            pos += m
            got += m
            stats[i].time_s += time.perf_counter() - t1
        return torch.cat(out, dim=1)[:, :g]

    top = len(specs) - 1
    target = specs[top][1]
    t_start = time.perf_counter()
    with torch.inference_mode():
        x = steps.prefill(ids, mode=target)  # target KV for [0, P)
        stats[top].forwards += 1
        x_h = x.cpu()
        new_rows = [[int(x_h[b, 0])] for b in range(B)]
        _commit(new_rows, seqs, finished, num_new, eos)
        pos = P
        produced = 1
        if per_row:
            _per_row_rounds(steps, specs, gammas, stats, x, P, B, int(max_new_tokens), seqs, finished, num_new,
                            eos, host, produce)
        while not per_row and produced < max_new_tokens and not all(finished):
            want = max_new_tokens - produced
            t0 = time.perf_counter()
            if top == 0:  # target only: bursts of autoregressive steps, one host read each
                g = min(AR_BURST, want)
                toks = steps.greedy_burst(x, pos, AR_BURST, mode=target)
                stats[top].forwards += AR_BURST
                (t_h,) = host(toks)
                kept = t_h[:, :g]
                x = toks[:, g - 1:g].clone()
                m = g
            else:
                g = gammas[top - 1]
                lower_kind, lower_mode = specs[top - 1]
                if top - 1 == 0 and lower_kind == "mode":
                    a, n_acc = steps.spec_round(x, pos, lower_mode, g, target)
                    stats[top - 1].forwards += g
                else:
                    ctx = [s + [] for s in seqs]
                    d = produce(top - 1, x, pos, g, ctx)
                    t0 = time.perf_counter()
                    a, n_acc = steps.verify(torch.cat([x, d], dim=1), pos, mode=target)
                stats[top].forwards += 1
                a_h, n_h = host(a, n_acc)
                n = int(n_h.min())
                m = n + 1
                stats[top - 1].add_round(g, int(n_h.clamp(max=m).sum()), B)
                kept = a_h[:, :m]
                x = a[:, n:n + 1].clone()
            kept = kept[:, :want]
            _commit([kept[b].tolist() for b in range(B)], seqs, finished, num_new, eos)
            pos += m
            produced += kept.shape[1]
            stats[top].time_s += time.perf_counter() - t0
        sync()
    elapsed = time.perf_counter() - t_start
    width = max(len(s) for s in seqs)
    out = torch.full((B, width), pad, dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, :len(s)] = torch.tensor(s, dtype=torch.long)
    out = _pad_rows_after_eos(out, P, finished, num_new, pad)
    gstats = GenerationStats(levels=stats, batch_size=B, prompt_tokens=P, new_tokens=sum(num_new),
                             time_s=elapsed,
                             kv_caches=[dict(model=type(model).__name__, layers=len(steps.cache.layers),
                                             allocations=len(steps.cache.layers),
                                             bytes=sum(l.keys.nbytes + l.values.nbytes for l in steps.cache.layers),
                                             max_len=steps.cache.layers[0].max_cache_len,
                                             graphs=len(steps._graphs), compiles=steps.compile_count)])
    return GenerateOutput(sequences=out.to(device), stats=gstats, num_new_tokens=num_new)


def _is_multimode(model) -> bool:
    try:
        from specq.transform.modes import find_state
        find_state(model)
        return True
    except (ImportError, ValueError):
        return False


def _per_row_rounds(steps, specs, gammas, stats, x, prompt_len: int, B: int, max_new: int, seqs, finished,
                    num_new, eos, host, produce) -> None:
    """compiled_generate's loop with one cache position per row: after each verify, row b keeps its
    own n_b accepted drafts plus the verifier's token (lossless per row, as the shared-position loop)."""
    top = len(specs) - 1
    target = specs[top][1]
    pos = torch.full((B,), prompt_len, dtype=torch.long, device=x.device)  # device: no host sync
    def decoding() -> list[int]:
        return [b for b in range(B) if not finished[b] and num_new[b] < max_new]

    while active := decoding():  # (rows that are done are not counted in the stats)
        t0 = time.perf_counter()
        if top == 0:
            toks = steps.greedy_burst(x, pos, AR_BURST, mode=target)
            stats[top].forwards += AR_BURST
            (kept,) = host(toks)
            rows = [kept[b].tolist() for b in range(B)]
            step, nxt = torch.full_like(pos, AR_BURST), toks[:, -1:]
        else:
            g = gammas[0]
            lower_kind, lower_mode = specs[0]
            if lower_kind == "mode":
                a, n_acc = steps.spec_round(x, pos, lower_mode, g, target)
                stats[0].forwards += g
            else:
                d = produce(0, x, None, g, [s + [] for s in seqs])
                a, n_acc = steps.verify(torch.cat([x, d], dim=1), pos, mode=target)
            stats[top].forwards += 1
            a_h, n_h = host(a, n_acc)
            rows = [a_h[b, :int(n_h[b]) + 1].tolist() for b in range(B)]
            stats[0].add_round(g, sum(int(n_h[b]) for b in active), len(active))
            step, nxt = n_acc + 1, a.gather(1, n_acc[:, None])
        _commit([r[:max(0, max_new - num_new[b])] for b, r in enumerate(rows)], seqs, finished, num_new, eos)
        # rows that are done stay where they are (they are still computed with the batch, rewriting
        # the same cache entries), so no row runs past prompt + max_new + one block of the cache
        still = decoding()
        live = torch.tensor([b in still for b in range(B)], device=pos.device)
        pos = torch.where(live, pos + step, pos)
        x = torch.where(live[:, None], nxt, x).clone()
        stats[top].time_s += time.perf_counter() - t0


def _commit(rows: list[list[int]], seqs, finished, num_new, eos) -> None:
    """Append each row's new tokens; a finished row takes none; a row stops after its EOS."""
    for b, new in enumerate(rows):
        if finished[b]:
            continue
        for t in new:
            seqs[b].append(t)
            num_new[b] += 1
            if t in eos:
                finished[b] = True
                break


def _pad_rows_after_eos(out, prompt_len, finished, num_new, pad):
    for b in range(out.shape[0]):
        out[b, prompt_len + num_new[b]:] = pad
    return out
