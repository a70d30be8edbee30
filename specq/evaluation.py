"""Perplexity and draft agreement per mode: what `specq eval` prints.

Two measurements decide whether a mode is a good draft and a good model:

* **Perplexity** of each mode on a text set the project ships (`specq/data/eval_text.txt`: prose,
  an explainer, Python code, a story, instructions, numbers and a table; our own text). The texts
  are joined into one token stream and cut into non-overlapping windows of `max_length` tokens.
* **Greedy top-1 agreement** of a draft mode with its verifier on a prompt set the project ships
  (`specq/data/eval_prompts.json`, 16 chat prompts): the verifier generates its greedy continuation
  of each prompt (batched, left-padded, stopping at EOS), then the draft is teacher-forced on the
  same sequences and we count the continuation positions where the draft's argmax equals the
  verifier's token. This is exactly the per-token acceptance test of greedy speculative decoding
  along the verifier's own output, so from the match pattern we also simulate tokens per verify
  round for a draft length gamma. Default pairs: MXFP4 -> BF16 (ML-SpecQD's draft) and
  W4A4 -> W4A16 (QSpec's draft).

Everything works on any causal LM: a specq multi-mode model (modes switched with `specq.mode`) or a
plain model (one mode, "bf16", meaning its own weights). `ModeRunner` is the seam: one model in one
mode. Sits at the runtime level; imports transform lazily.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parent / "data"
TEXT_FILE = DATA_DIR / "eval_text.txt"
PROMPT_FILE = DATA_DIR / "eval_prompts.json"
DEFAULT_PAIRS = (("mxfp4", "bf16"), ("w4a4", "w4a16"))  # (draft, verifier)
_DOC_MARK = "=== "


# --------------------------------------------------------------------------------------- data


def load_eval_texts(path: str | Path = TEXT_FILE) -> list[tuple[str, str]]:
    """(name, text) documents of the shipped text set; a line `=== name ===` starts a document."""
    docs, name, lines = [], None, []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith(_DOC_MARK) and line.rstrip().endswith(" ==="):
            if name is not None:
                docs.append((name, "\n".join(lines).strip()))
            name, lines = line.strip()[4:-4].strip(), []
        else:
            lines.append(line)
    if name is not None:
        docs.append((name, "\n".join(lines).strip()))
    docs = [(n, t) for n, t in docs if t]
    if not docs:
        raise ValueError(f"{path}: no documents (each starts with a line '=== name ===')")
    return docs


def load_eval_prompts(path: str | Path = PROMPT_FILE) -> list[str]:
    """The shipped chat prompts (a JSON list of strings)."""
    prompts = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"{path}: expected a non-empty JSON list of prompt strings")
    return prompts


def token_windows(tokenizer, texts, max_length: int = 512) -> list[torch.Tensor]:
    """Join the texts (blank line between documents) into one token stream and cut it into
    non-overlapping windows of at most `max_length` tokens (the last may be shorter; one of a single
    token predicts nothing and is dropped)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a window predicts max_length - 1 tokens), got {max_length}")
    texts = [t[1] if isinstance(t, tuple) else t for t in texts]
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    windows = [torch.tensor(ids[i:i + max_length], dtype=torch.long) for i in range(0, len(ids), max_length)]
    return [w for w in windows if w.numel() >= 2]


def encode_prompts(tokenizer, prompts) -> list[list[int]]:
    """Token ids of each prompt: the chat template with a generation prompt when the tokenizer has
    one (chat models), else the raw text (base models)."""
    out = []
    for p in prompts:
        if getattr(tokenizer, "chat_template", None):
            enc = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                return_dict=True)
            ids = enc["input_ids"]
        else:
            ids = tokenizer(p)["input_ids"]
        ids = list(ids[0] if ids and isinstance(ids[0], list) else ids)
        if not ids:
            raise ValueError(f"prompt {p!r} encodes to no tokens")
        out.append([int(i) for i in ids])
    return out


# ------------------------------------------------------------------------------------- runner


class ModeRunner:
    """One model run in one mode: `mode=None` runs it as it is (a plain model, or a multi-mode model
    in its current mode). Forwards run under `torch.no_grad()` and, for a mode, `specq.mode`."""

    def __init__(self, model: torch.nn.Module, mode: str | None = None):
        self.model = model
        self.mode = mode
        if mode is not None:
            from specq.transform.modes import find_state

            find_state(model).check(mode)  # a clear error for a mode the model was not transformed for
        params = inspect.signature(model.forward).parameters
        self._takes_position_ids = "position_ids" in params
        self._takes_logits_to_keep = "logits_to_keep" in params

    @property
    def name(self) -> str:
        return self.mode or "model"

    @contextlib.contextmanager
    def context(self):
        with torch.no_grad():
            if self.mode is None:
                yield
            else:
                from specq.transform.modes import mode as mode_ctx

                with mode_ctx(self.model, self.mode):
                    yield

    def logits(self, input_ids, attention_mask=None, keep: int | None = None) -> torch.Tensor:
        """Logits [B, T or keep, V] of a teacher-forced forward (no KV cache)."""
        kwargs = {"use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
            if self._takes_position_ids:
                kwargs["position_ids"] = _position_ids(attention_mask)
        if keep is not None and self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        with self.context():
            logits = self.model(input_ids, **kwargs).logits
        return logits if keep is None else logits[:, -keep:]

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, on_step=None):
        """Greedy continuation with HF generate (KV cache), a fresh config so the model's own sampling
        defaults (temperature, repetition penalty, ...) cannot change the greedy choice."""
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        class _Step(StoppingCriteria):  # never stops; reports each decoding step for progress bars
            def __call__(self, ids, scores, **kw):
                if on_step is not None:
                    on_step()
                return torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)

        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                  eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        with self.context():
            return self.model.generate(input_ids, attention_mask=attention_mask, generation_config=config,
                                       stopping_criteria=StoppingCriteriaList([_Step()]))


def _as_runner(x) -> ModeRunner:
    return x if isinstance(x, ModeRunner) else ModeRunner(x)


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (left padding), as HF generate computes them."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def _device(model) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------------- perplexity


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens


def perplexity(model, windows, batch_size: int = 4, on_step=None) -> PerplexityResult:
    """exp(mean NLL) over every predicted token of the windows; log-softmax in float32 (at least)."""
    runner = _as_runner(model)
    device = _device(runner.model)
    total_nll, total_tokens = 0.0, 0
    by_length: dict[int, list[torch.Tensor]] = {}
    for w in windows:
        by_length.setdefault(int(w.numel()), []).append(w)
    for _, group in sorted(by_length.items()):
        for i in range(0, len(group), batch_size):
            ids = torch.stack(group[i:i + batch_size]).to(device)
            logits = runner.logits(ids)
            logp = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            total_nll += float(nll.double().sum())
            total_tokens += nll.numel()
            if on_step is not None:
                on_step()
    if total_tokens == 0:
        raise ValueError("perplexity: no tokens to predict (empty text set?)")
    mean = total_nll / total_tokens
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens=total_tokens)


def _perplexity_steps(windows, batch_size: int) -> int:
    counts: dict[int, int] = {}
    for w in windows:
        counts[int(w.numel())] = counts.get(int(w.numel()), 0) + 1
    return sum(math.ceil(c / batch_size) for c in counts.values())


# ---------------------------------------------------------------------------------- agreement


@dataclass
class Continuations:
    """Verifier's greedy continuations of a batch of prompts, left-padded to one prompt length.

    input_ids [B, P + N]: prompt (left padding) then N generated columns; attention_mask covers the
    real prompt tokens and every generated column; lengths[b] = generated tokens that count (up to
    and including the first EOS)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    lengths: torch.Tensor

    @property
    def new_tokens(self) -> int:
        return self.input_ids.shape[1] - self.prompt_len

    def valid(self) -> torch.Tensor:
        """[B, N] bool: which generated positions count."""
        return torch.arange(self.new_tokens)[None, :] < self.lengths[:, None]


def greedy_continuations(verifier, prompt_ids: list[list[int]], max_new_tokens: int = 64,
                         eos_token_id: int | None = None, pad_token_id: int = 0,
                         on_step=None) -> Continuations:
    """The verifier's greedy continuation of every prompt, generated as one left-padded batch."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    runner = _as_runner(verifier)
    device = _device(runner.model)
    plen = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), plen), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), plen), dtype=torch.long)
    for b, p in enumerate(prompt_ids):
        ids[b, plen - len(p):] = torch.tensor(p)
        mask[b, plen - len(p):] = 1
    out = runner.generate(ids.to(device), mask.to(device), max_new_tokens, eos_token_id, pad_token_id,
                          on_step=on_step).cpu()
    gen = out[:, plen:]
    n = gen.shape[1]
    lengths = torch.full((len(prompt_ids),), n, dtype=torch.long)
    if eos_token_id is not None:
        eos_ids = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        is_eos = torch.isin(gen, torch.tensor(eos_ids))
        has = is_eos.any(dim=1)
        first = is_eos.int().argmax(dim=1)
        lengths = torch.where(has, first + 1, lengths)
    full_mask = torch.cat([mask, torch.ones_like(gen)], dim=1)
    return Continuations(input_ids=out, attention_mask=full_mask, prompt_len=plen, lengths=lengths)


def teacher_forced_argmax(model, cont: Continuations, batch_size: int = 8, on_step=None) -> torch.Tensor:
    """[B, N] argmax of `model` at the positions that predict each generated token of `cont`."""
    runner = _as_runner(model)
    device = _device(runner.model)
    n = cont.new_tokens
    preds = []
    for i in range(0, cont.input_ids.shape[0], batch_size):
        ids = cont.input_ids[i:i + batch_size].to(device)
        mask = cont.attention_mask[i:i + batch_size].to(device)
        logits = runner.logits(ids, mask, keep=n + 1)  # positions P-1 .. P+N-1
        preds.append(logits[:, :n].argmax(dim=-1).cpu())
        if on_step is not None:
            on_step()
    return torch.cat(preds)


def tokens_per_round(match: torch.Tensor, lengths: torch.Tensor, gamma: int) -> float:
    """Mean tokens emitted per verify round of greedy speculative decoding with `gamma` draft tokens,
    simulated along the verifier's sequence: each round accepts the drafts while they match (at most
    gamma), then the verifier adds its own token. Exact for greedy decoding when the draft sees the
    same prefix; an estimate where a shared KV cache holds verifier-written entries."""
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    tokens = rounds = 0
    for row, n in zip(match.tolist(), lengths.tolist()):
        pos = 0
        while pos < n:
            k = 0
            while k < gamma and pos + k < n and row[pos + k]:
                k += 1
            pos += k + 1
            rounds += 1
        tokens += n
    return tokens / rounds if rounds else float("nan")


@dataclass
class AgreementResult:
    draft: str
    verifier: str
    agreement: float  # fraction of continuation positions where the draft's argmax is the verifier's token
    matches: int
    positions: int
    verifier_consistency: float  # teacher-forced verifier argmax == its generated token (1.0 up to rounding)
    tokens_per_round: float
    gamma: int
    # draft argmax == the verifier's teacher-forced argmax: what a multi-token verify forward checks;
    # differs from `agreement` only where the verifier's rounding differs between the two forwards.
    agreement_teacher_forced: float = float("nan")


def top1_agreement(draft, verifier, cont: Continuations, gamma: int = 4, batch_size: int = 8,
                   verifier_argmax: torch.Tensor | None = None, on_step=None) -> AgreementResult:
    """Greedy top-1 agreement of `draft` with the verifier's continuations `cont`."""
    d, v = _as_runner(draft), _as_runner(verifier)
    valid = cont.valid()
    target = cont.input_ids[:, cont.prompt_len:]
    draft_pred = teacher_forced_argmax(d, cont, batch_size, on_step)
    if verifier_argmax is None:
        verifier_argmax = teacher_forced_argmax(v, cont, batch_size, on_step)
    match = (draft_pred == target) & valid
    positions = int(valid.sum())
    if positions == 0:
        raise ValueError("top1_agreement: the continuations have no generated tokens to compare")
    return AgreementResult(
        draft=d.name, verifier=v.name, agreement=int(match.sum()) / positions, matches=int(match.sum()),
        positions=positions,
        verifier_consistency=int(((verifier_argmax == target) & valid).sum()) / positions,
        tokens_per_round=tokens_per_round(match, cont.lengths, gamma), gamma=gamma,
        agreement_teacher_forced=int(((draft_pred == verifier_argmax) & valid).sum()) / positions,
    )


# ------------------------------------------------------------------------------- weight bytes


def weight_bytes(model) -> dict[str, int]:
    """Bytes of matmul weights one forward reads, per mode.

    A specq multi-mode model: `bytes_per_mode` of the transform layer (every planned matmul,
    quantized or kept; embedding tables are not counted). A plain model: {"bf16": bytes of the
    weights and biases of its Linear and GPT-2 Conv1D modules, shared tensors counted once}."""
    modes = _model_modes(model)
    if modes is not None:
        from specq.transform.transform import bytes_per_mode

        return bytes_per_mode(model)
    seen, total = set(), 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D":
            for t in (getattr(mod, "weight", None), getattr(mod, "bias", None)):
                if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return {"bf16": total}


def _model_modes(model) -> tuple[str, ...] | None:
    """The modes of a specq multi-mode model, None for a plain model."""
    try:
        from specq.transform.modes import find_state
    except ImportError:
        return None
    try:
        return tuple(find_state(model).modes)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------- the report


@dataclass
class EvalReport:
    model: str
    dtype: str
    modes: dict = field(default_factory=dict)  # mode -> {"perplexity", "nll", "tokens", "weight_bytes"}
    pairs: list = field(default_factory=list)  # AgreementResult dicts
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def format_table(self) -> str:
        s = self.settings
        lines = [f"specq eval: {self.model} ({self.dtype}); text: {s.get('text_tokens')} tokens in "
                 f"windows of {s.get('max_length')}; prompts: {s.get('prompts')} x up to "
                 f"{s.get('max_new_tokens')} new tokens; {self.seconds:.0f} s"]
        base = next((r["weight_bytes"] for m, r in self.modes.items() if m == "bf16"), None)
        lines.append("")
        lines.append(f"{'mode':<8} {'perplexity':>11} {'weight MB':>10} {'vs bf16':>8}")
        for m, r in self.modes.items():
            ratio = f"{r['weight_bytes'] / base:.2f}x" if base else "-"
            ppl = f"{r['perplexity']:.3f}" if r.get("perplexity") is not None else "-"
            lines.append(f"{m:<8} {ppl:>11} {r['weight_bytes'] / 1e6:>10.2f} {ratio:>8}")
        if self.pairs:
            g = self.pairs[0]["gamma"]
            lines.append("")
            lines.append(f"{'draft -> verifier':<18} {'top-1 agreement':>15} {'positions':>9} "
                         f"{f'tokens/round (gamma={g})':>23} {'verifier self-check':>19}")
            for p in self.pairs:
                lines.append(f"{p['draft'] + ' -> ' + p['verifier']:<18} {p['agreement']:>15.4f} "
                             f"{p['positions']:>9} {p['tokens_per_round']:>23.2f} "
                             f"{p['verifier_consistency']:>19.4f}")
        return "\n".join(lines)


def evaluate(model, tokenizer, modes=None, pairs=None, *, texts=None, prompts=None,
             max_new_tokens: int = 64, max_length: int = 512, gamma: int = 4, batch_size: int = 8,
             progress: bool = True, name: str | None = None) -> EvalReport:
    """Perplexity and weight bytes per mode, and greedy top-1 agreement per (draft, verifier) pair.

    model: a specq multi-mode model (modes: a subset of its modes, default all) or a plain causal LM
    (one mode, "bf16"). pairs: (draft, verifier) mode pairs; default MXFP4 -> BF16 and
    W4A4 -> W4A16, those whose modes are both evaluated. texts / prompts: default the shipped sets.
    The model's current mode is restored afterwards.
    """
    t0 = time.perf_counter()
    available = _model_modes(model)
    if available is None:
        if modes not in (None, ("bf16",), ["bf16"]):
            raise ValueError(f"this model is not a specq multi-mode model, so it has only its own weights "
                             f"(mode 'bf16'); got modes={modes}. Call specq.transform(model, modes=...) first.")
        modes, runners = ("bf16",), {"bf16": ModeRunner(model)}
    else:
        modes = tuple(available if modes is None else modes)
        for m in modes:
            if m not in available:
                raise ValueError(f"mode {m!r} is not available: the model was transformed for {available}")
        runners = {m: ModeRunner(model, m) for m in modes}
    if pairs is None:
        pairs = [p for p in DEFAULT_PAIRS if p[0] in modes and p[1] in modes]
    pairs = [tuple(p) for p in pairs]
    for d, v in pairs:
        for m in (d, v):
            if m not in runners:
                raise ValueError(f"pair {d}->{v}: mode {m!r} is not among the evaluated modes {modes}")

    windows = token_windows(tokenizer, load_eval_texts() if texts is None else texts, max_length)
    prompt_list = load_eval_prompts() if prompts is None else list(prompts)
    prompt_ids = encode_prompts(tokenizer, prompt_list) if pairs else []
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos if isinstance(eos, int) else 0)

    verifiers = list(dict.fromkeys(v for _, v in pairs))
    n_tf_batches = math.ceil(len(prompt_ids) / batch_size) if prompt_ids else 0
    total = (len(modes) * _perplexity_steps(windows, 4) + len(verifiers) * max_new_tokens
             + n_tf_batches * (len(verifiers) + len(pairs)))
    bar = _progress(total, progress)
    report = EvalReport(model=name or _model_name(model), dtype=str(next(model.parameters()).dtype).replace("torch.", ""))
    try:
        bytes_by_mode = weight_bytes(model)
        for m in modes:
            bar.set_description(f"perplexity {m}")
            r = perplexity(runners[m], windows, on_step=lambda: bar.update(1))
            report.modes[m] = {"perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens,
                               "weight_bytes": int(bytes_by_mode[m])}
        for v in verifiers:
            bar.set_description(f"generate {v}")
            before = bar.n
            cont = greedy_continuations(runners[v], prompt_ids, max_new_tokens, eos, pad,
                                        on_step=lambda: bar.update(1))
            bar.update(max(0, before + max_new_tokens - bar.n))  # stopped early: all prompts ended
            bar.set_description(f"teacher-force {v}")
            v_argmax = teacher_forced_argmax(runners[v], cont, batch_size, on_step=lambda: bar.update(1))
            for d, vv in pairs:
                if vv != v:
                    continue
                bar.set_description(f"teacher-force {d}")
                res = top1_agreement(runners[d], runners[v], cont, gamma, batch_size, verifier_argmax=v_argmax,
                                     on_step=lambda: bar.update(1))
                report.pairs.append(asdict(res))
    finally:
        bar.close()
    report.settings = {"text_tokens": sum(int(w.numel()) for w in windows), "max_length": max_length,
                       "prompts": len(prompt_ids), "max_new_tokens": max_new_tokens, "gamma": gamma,
                       "text_set": "shipped" if texts is None else "custom",
                       "prompt_set": "shipped" if prompts is None else "custom"}
    report.seconds = time.perf_counter() - t0
    return report


def _model_name(model) -> str:
    cfg = getattr(model, "config", None)
    for attr in ("name_or_path", "_name_or_path"):
        v = getattr(cfg, attr, None)
        if v:
            return Path(str(v)).name if "/" in str(v) and Path(str(v)).exists() else str(v)
    return type(model).__name__


def _progress(total: int, enabled: bool):
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="step", leave=False, dynamic_ncols=True)
