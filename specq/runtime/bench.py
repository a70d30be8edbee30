"""End-to-end decoding speed: every strategy against Hugging Face's baselines, on the same prompt.

Used by `specq bench` and `benchmarks/e2e.py`. Rows (greedy, same prompt, same count of new tokens,
EOS ignored so every row makes exactly `new_tokens`; batch 1 unless the prompt has more rows):

    hf_eager            HF generate, dynamic cache, eager
    hf_static_compile   HF generate, static cache (transformers compiles the decode step itself)
    ar_bf16 / ar_mxfp4 / ar_w4a16    specq autoregressive in one mode (compiled steps)
    ngram_bf16          levels ngram -> bf16          (prompt lookup, lossless)
    mlspecqd2           levels mxfp4 -> bf16          (ML-SpecQD, 2 levels)
    mlspecqd3           levels ngram -> mxfp4 -> bf16 (ML-SpecQD, 3 levels)
    qspec               levels w4a4 -> w4a16          (QSpec)

A specq row name may end in "@inductor" or "@none" to pick how its steps are compiled (default: the
`compile` argument; "none" still captures CUDA graphs on CUDA). Lossless rows are checked against their target's own autoregressive tokens (bf16 target: the HF
eager row, or the ar_bf16 row when HF eager was not run; w4a16 target: the ar_w4a16 row). In float32 they must be identical (`strict=True`
raises otherwise); in bf16 a multi-token verify rounds differently from one-token decoding, so the
table reports how many leading tokens agree instead.

At batch B > 1, `run_rows(per_row=True)` runs the two-level speculative rows with per-row acceptance
(`compiled_generate(per_row=True)`: every row keeps its own cache position and all the drafts it
accepted) instead of advancing the whole batch by its smallest accepted count; autoregressive and
three-level rows run as before. tok/s counts the tokens of all B rows.

`step_costs` times single compiled forwards (one CUDA graph replay each) per (mode, batch, query
length): on a model with random weights, acceptance means nothing, so what transfers to the real
model is the cost of each step; `implied_speed` combines them with the forwards-per-token a real
model's run measured (step costs at the batch of that run).
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field

import torch

LLAMA3_8B_SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)

ROWS = ("hf_eager", "hf_static_compile", "ar_bf16", "ar_mxfp4", "ar_w4a16", "ngram_bf16", "mlspecqd2",
        "mlspecqd3", "qspec")
# row -> (levels, reference row for token equality)
SPECQ_ROWS = {
    "ar_bf16": (["bf16"], "hf_eager"),
    "ar_mxfp4": (["mxfp4"], None),
    "ar_w4a16": (["w4a16"], None),
    "ngram_bf16": (["ngram", "bf16"], "hf_eager"),
    "mlspecqd2": (["mxfp4", "bf16"], "hf_eager"),
    "mlspecqd3": (["ngram", "mxfp4", "bf16"], "hf_eager"),
    "qspec": (["w4a4", "w4a16"], "ar_w4a16"),
}
NEEDED_MODES = {"ar_bf16": ("bf16",), "ngram_bf16": ("bf16",), "ar_mxfp4": ("mxfp4",), "ar_w4a16": ("w4a16",),
                "mlspecqd2": ("mxfp4", "bf16"), "mlspecqd3": ("mxfp4", "bf16"), "qspec": ("w4a4", "w4a16")}

DEFAULT_PROMPT = (
    "You are a helpful assistant. Explain, step by step and with a worked example, how a hash table "
    "stores and finds values, what happens on a collision, and how the table grows when it fills up. "
    "Then write a short Python class that implements a hash table with separate chaining, with methods "
    "put, get and delete, and explain the time complexity of each method.")


def random_model(config_kwargs: dict, dtype=torch.bfloat16, device="cuda", seed: int = 0, family="llama"):
    """An HF causal LM with random weights built directly on `device` in `dtype` (no CPU copy)."""
    import transformers

    cfg_cls = {"llama": transformers.LlamaConfig}[family]
    config = cfg_cls(**config_kwargs)
    torch.manual_seed(seed)
    with torch.device(device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = transformers.LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(prev)
    return model.to(dtype).eval()


def make_prompt(model, tokenizer=None, length: int = 128, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """[batch, length] prompt ids, a different row per batch entry (identical rows would accept the
    same drafts and hide per-row behaviour).

    With a tokenizer: the default text, repeated and cut to `length`; row 0 starts at the text's
    start (the batch-1 prompt), row b `b * n // batch` tokens into the repeated text (n: the text's
    token count; its first token is kept at the row's start when it is the BOS). Past n rows the
    rows repeat (batch > n; n = 75 for the default model and text). Without one: random ids."""
    device = next(model.parameters()).device
    if tokenizer is not None:
        ids = tokenizer(DEFAULT_PROMPT, return_tensors="pt").input_ids[0]
        n = ids.numel()
        stream = ids.repeat(-(-(length + n) // n))  # >= length tokens from any offset < n
        bos = getattr(tokenizer, "bos_token_id", None)
        rows = []
        for b in range(batch):
            off = (b * n) // batch if batch <= n else b % n
            row = stream[off:off + length].clone()
            if off and bos is not None and int(ids[0]) == bos:
                row[0] = bos
            rows.append(row)
        return torch.stack(rows).to(device)
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    return torch.randint(3, vocab, (batch, length), generator=g).to(device)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Row:
    name: str
    tokens_per_s: float | None = None
    seconds: float | None = None
    new_tokens: int = 0
    warmup_s: float | None = None  # first call (compiles, captures graphs)
    same_as: str | None = None
    agree: int | None = None  # leading new tokens equal to the reference row's
    acceptance: dict = field(default_factory=dict)  # level -> acceptance rate
    mean_accepted: dict = field(default_factory=dict)  # level -> accepted drafts per round, per row
    forwards: dict = field(default_factory=dict)
    per_row: bool = False  # compiled_generate(per_row=True): each row kept all it accepted
    error: str | None = None
    sequences: torch.Tensor | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("sequences")
        return d


def _hf_generate(model, ids, new_tokens: int, static: bool):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=None, do_sample=False, num_beams=1,
                  eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
    gc_ = model.generation_config
    saved = (gc_.eos_token_id, getattr(gc_, "temperature", None), getattr(gc_, "top_p", None), getattr(gc_, "top_k", None))
    gc_.eos_token_id = None
    gc_.temperature, gc_.top_p, gc_.top_k = None, None, None
    try:
        if static:
            kwargs["cache_implementation"] = "static"
        with torch.inference_mode():
            return model.generate(ids, **kwargs)
    finally:
        gc_.eos_token_id, gc_.temperature, gc_.top_p, gc_.top_k = saved


def run_rows(model, ids: torch.Tensor, new_tokens: int = 256, rows=ROWS, gamma=None,
             compile="auto", repeats: int = 1, strict: bool = False, log=print, per_row: bool = False) -> list[Row]:
    """Time every row on the same prompt [B, P]; `model` must be transformed for the modes the rows
    need (rows whose modes are missing are skipped with a note).

    per_row: at B > 1, the two-level rows (qspec, mlspecqd2, ngram_bf16) decode with per-row
    acceptance (`compiled_generate(per_row=True)`; Row.per_row says which rows did); one-level and
    three-level rows run with one cache position for the batch either way."""
    from specq.runtime.compiled import compiled_generate
    from specq.transform.modes import available_modes, set_mode

    device = next(model.parameters()).device
    batch = int(ids.shape[0])
    gamma = dict(gamma or {})
    try:
        modes = available_modes(model)
    except ValueError:
        modes = ("bf16",)
    out: dict[str, Row] = {}
    for name in rows:
        row = Row(name)
        out[name] = row
        base, _, how = name.partition("@")
        row_compile = compile if not how else (None if how == "none" else how)
        try:
            if base in ("hf_eager", "hf_static_compile"):
                static = base == "hf_static_compile"
                if modes != ("bf16",):
                    set_mode(model, "bf16")  # HF's rows run the model's own weights
                t0 = time.perf_counter()
                seq = _hf_generate(model, ids, new_tokens, static)
                _sync(device)
                row.warmup_s = time.perf_counter() - t0
                best = None
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    seq = _hf_generate(model, ids, new_tokens, static)
                    _sync(device)
                    dt = time.perf_counter() - t0
                    best = dt if best is None else min(best, dt)
                row.seconds = best
                row.sequences = seq[:, ids.shape[1]:].cpu()
            else:
                levels, _ = SPECQ_ROWS[base]
                missing = [m for m in NEEDED_MODES[base] if m not in modes]
                if missing:
                    row.error = f"skipped: model not transformed for {missing}"
                    continue
                g = gamma.get(base, 4 if len(levels) == 2 else [4, 4])
                if len(levels) == 1:
                    g = 1
                row.per_row = bool(per_row and len(levels) == 2 and batch > 1)
                kw = dict(levels=levels, gamma=g, eos_token_id=[], compile=row_compile, per_row=row.per_row)
                t0 = time.perf_counter()
                res = compiled_generate(model, ids, new_tokens, **kw)
                _sync(device)
                row.warmup_s = time.perf_counter() - t0
                best = None
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    res = compiled_generate(model, ids, new_tokens, **kw)
                    _sync(device)
                    dt = time.perf_counter() - t0
                    if best is None or dt < best:
                        best, best_res = dt, res
                res = best_res
                row.seconds = best
                row.sequences = res.sequences[:, ids.shape[1]:].cpu()
                for lvl in res.stats.levels:
                    row.forwards[lvl.name] = lvl.forwards
                    if lvl.acceptance_rate is not None:
                        row.acceptance[lvl.name] = round(lvl.acceptance_rate, 4)
                        row.mean_accepted[lvl.name] = round(lvl.mean_accepted_length, 3)
            row.new_tokens = int(row.sequences.shape[1]) * int(row.sequences.shape[0])
            row.tokens_per_s = row.new_tokens / row.seconds
            _compare(row, out)  # now, so a run cut short still logged it
            log(f"[bench] {name}: {row.tokens_per_s:.1f} tok/s ({row.seconds:.3f} s, first call "
                f"{row.warmup_s:.1f} s{', per-row' if row.per_row else ''}) acceptance {row.acceptance}"
                + (f"; leading tokens equal to {row.same_as}: {row.agree}/{row.sequences.shape[1]}"
                   if row.same_as else ""))
        except Exception as e:  # a row that fails is reported, the others still run
            row.error = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"[bench] {name}: FAILED {row.error}")
        finally:
            gc.collect()
    failures = []
    for name, row in out.items():
        _compare(row, out)  # references that ran after the row
        if row.same_as and (row.agree != row.sequences.shape[1]
                            or row.sequences.shape != out[row.same_as].sequences.shape):
            failures.append(f"row {name} differs from its reference {row.same_as} at new token {row.agree}")
    if strict and failures:
        raise LosslessError(failures, list(out.values()))
    return list(out.values())


# Where a bf16-target row's reference (HF eager) was not run, specq's own autoregressive bf16 decoding
# is the target-only decoding it must equal.
FALLBACK_REFERENCE = {"hf_eager": "ar_bf16"}


def _compare(row: Row, rows: dict) -> None:
    """Set row.same_as / row.agree against the first finished row of its reference kind (or of the
    fallback reference's kind, when no row of the reference kind ran)."""
    ref = SPECQ_ROWS.get(row.name.partition("@")[0], (None, None))[1]
    if not ref or row.sequences is None:
        return
    rr = None
    for kind in (ref, FALLBACK_REFERENCE.get(ref)):
        rr = next((r for r in rows.values() if r.name.partition("@")[0] == kind and r.sequences is not None
                   and r is not row), None)
        if rr is not None or kind is None:
            break
    if rr is None:
        return
    a, b = row.sequences, rr.sequences
    n = min(a.shape[1], b.shape[1])
    row.same_as = rr.name
    row.agree = int((a[:, :n] == b[:, :n]).all(dim=0).to(torch.int64).cumprod(0).sum())


class LosslessError(AssertionError):
    """Lossless rows whose tokens differ from their target's (raised by run_rows(strict=True) after
    every row ran; `.rows` holds the results so they can still be written out)."""

    def __init__(self, failures: list[str], rows: list):
        super().__init__("; ".join(failures) + " (lossless decoding must give the same tokens in float32)")
        self.rows = rows


# ---------------------------------------------------------------------------------------------- steps


def step_costs(model, batch: int = 1, shapes=(("bf16", 1),), iters: int = 50, compile="auto",
               position: int = 128, log=print, row_positions: bool = False) -> list[dict]:
    """Milliseconds per compiled forward (one CUDA graph replay) for each (mode, q) in `shapes`.

    Also the graph of one ML-SpecQD/QSpec round ("round:<draft>><target>:<gamma>") when listed as
    ("round", draft, target, gamma). Runs on a fresh static cache at `position`.
    row_positions: the steps of per-row decoding (`compiled_generate(per_row=True)`: one cache
    position per row, scatter writes, a [B, 1, q, L] mask); labels end in " per-row" and each entry
    has per_row=True.
    """
    from specq.runtime.compiled import CompiledSteps, make_static_cache

    device = next(model.parameters()).device
    if device.type != "cuda":
        raise RuntimeError("step_costs times CUDA graphs; it needs the model on a CUDA device")
    cache = make_static_cache(model, batch, position + 64)
    steps = CompiledSteps(model, cache, compile=compile, cuda_graphs=True, row_positions=row_positions)
    suffix = " per-row" if row_positions else ""
    vocab = int(model.config.vocab_size)
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for shape in shapes:
        t0 = time.perf_counter()
        try:
            if shape[0] == "round":
                _, draft, target, gamma = shape
                tok = torch.randint(3, vocab, (batch, 1), device=device, generator=g)
                fn = lambda: steps.spec_round(tok, position, draft, gamma, target)  # noqa: E731
                label = f"round {draft}x{gamma}>{target}{suffix}"
            else:
                mode, q = shape
                ids = torch.randint(3, vocab, (batch, q), device=device, generator=g)
                fn = lambda: steps.logits(ids, position, mode=mode)  # noqa: E731
                label = f"{mode} q={q}{suffix}"
            fn()
            torch.cuda.synchronize()
            setup = time.perf_counter() - t0
            for _ in range(3):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(iters):
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            times.sort()
            ms = times[len(times) // 2]
            out.append(dict(step=label, batch=batch, ms=round(ms, 4), setup_s=round(setup, 1), per_row=row_positions))
            log(f"[steps] batch {batch} {label}: {ms:.3f} ms (setup {setup:.1f} s)")
        except Exception as e:
            out.append(dict(step=str(shape) + suffix, batch=batch, ms=None, per_row=row_positions,
                            error=f"{type(e).__name__}: {str(e)[:300]}"))
            log(f"[steps] {shape}: FAILED {type(e).__name__}: {e}")
    del steps, cache
    gc.collect()
    torch.cuda.empty_cache()
    return out


def implied_speed(real_rows: list[dict], costs: dict[str, float], new_tokens: int,
                  batch: int = 1) -> dict[str, float]:
    """Tokens/s a model with these step costs (ms per forward, by level name and query length) would
    reach with the forwards that the real model's rows measured (its acceptance).

    real_rows: Row.as_dict() of a real-model run at batch `batch`, `new_tokens` new tokens per row.
    costs: ms per forward of the whole batch, measured at that batch: {"bf16": ms_q1,
    "bf16@verify": ms_qk, ...}; a row that ran per-row (per_row=True) takes "<key>@rows" where
    present (the steps of per-row decoding), else "<key>". Tokens/s counts every row's tokens:
    new_tokens x batch over the summed forwards x ms.
    """
    out = {}
    for r in real_rows:
        if not r.get("forwards") or r.get("tokens_per_s") is None:
            continue
        levels = list(r["forwards"])
        total = 0.0
        ok = True
        for i, lvl in enumerate(levels):
            if lvl.startswith("ngram"):
                continue
            key = lvl if (i == 0 or len(levels) == 1) else f"{lvl}@verify"
            ms = costs.get(f"{key}@rows") if r.get("per_row") else None
            if ms is None:
                ms = costs.get(key)
            if ms is None:
                ok = False
                break
            total += r["forwards"][lvl] * ms
        if ok and total > 0:
            out[r["name"]] = new_tokens * int(batch) / (total / 1e3)
    return out


# ---------------------------------------------------------------------------------------------- report


def markdown_table(rows: list[Row], baseline: str = "hf_static_compile") -> str:
    """One line per row. A last column "per-row" (yes/no) only when some row ran per-row, so that
    batch-1 tables keep their columns."""
    base = next((r for r in rows if r.name == baseline and r.tokens_per_s), None)
    head = ("row", "tok/s", f"x {baseline}", "first call s", "same tokens as", "leading tokens equal",
            "acceptance (level: rate, mean accepted/round)")
    per_row_col = any(r.per_row for r in rows)
    if per_row_col:
        head += ("per-row",)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        tail = (" yes |" if r.per_row else " no |") if per_row_col else ""
        if r.error and r.tokens_per_s is None:
            lines.append(f"| {r.name} | - | - | - | - | - | {r.error} |{tail}")
            continue
        ratio = f"{r.tokens_per_s / base.tokens_per_s:.2f}" if base else "-"
        acc = ", ".join(f"{k}: {v:.3f}, {r.mean_accepted.get(k, 0):.2f}" for k, v in r.acceptance.items()) or "-"
        agree = f"{r.agree}/{r.new_tokens // max(1, (r.sequences.shape[0] if r.sequences is not None else 1))}" \
            if r.agree is not None else "-"
        lines.append(f"| {r.name} | {r.tokens_per_s:.1f} | {ratio} | {r.warmup_s:.1f} | {r.same_as or '-'} | "
                     f"{agree} | {acc} |{tail}")
    return "\n".join(lines)


def dump_json(path, payload: dict) -> None:
    import os
    import tempfile

    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)
