"""convert(): load a model, transform it to the requested modes, measure it, write it, push it.

This is what `specq convert` runs; the command itself only parses options and prints. Stages report
through `on_stage(name)` so the CLI can show progress (the stages' own tqdm bars go to stderr).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded default model is


@dataclass
class ConvertResult:
    model: str
    modes: list
    out: str | None
    bytes_per_mode: dict
    files: int
    eval_results: dict | None = None
    repo_id: str | None = None
    commit_sha: str | None = None
    commit_url: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "extra"} | self.extra


def convert(model: str | None = None, *, modes=("bf16", "mxfp4", "w4a16", "w4a4"), recipe=None,
            lm_head_modes=None, w4a4_scale_levels: int | None = None, out: str | os.PathLike | None = None,
            push_to_hub: str | None = None,
            private: bool = False, token: str | None = None, endpoint: str | None = None, dtype="bfloat16",
            evaluate: bool = True, eval_kwargs: dict | None = None, progress: bool = True,
            on_stage=None) -> ConvertResult:
    """Convert MODEL (Hub id, local dir, .gguf; None = the embedded default model) to a specq checkpoint.

    out: where to write it (None with push_to_hub: a temporary folder, removed after the push).
    evaluate: measure perplexity and draft agreement per mode with specq.evaluation for the card.
    lm_head_modes: quantized modes in which the output head runs quantized (specq.transform's argument).
    w4a4_scale_levels: W4A4's integer scale levels (specq.transform's argument; None: the recipe's).
    """
    import specq
    from specq.hub.checkpoint import bytes_per_mode, read_checkpoint_meta, save_pretrained

    stage = on_stage or (lambda name: None)
    if out is None and push_to_hub is None:
        raise ValueError("give --out DIR, --push-to-hub REPO, or both")
    if out is not None:
        from specq.hub.checkpoint import _check_target

        _check_target(Path(out), overwrite=True)  # fail before minutes of work, not after
    stage("loading")
    base, tokenizer = specq.load(model, dtype=dtype)
    stage("quantizing")
    mm = specq.transform(base, modes=tuple(modes), recipe=recipe, lm_head_modes=lm_head_modes,
                         w4a4_scale_levels=w4a4_scale_levels)
    eval_results = None
    if evaluate:
        stage("evaluating")
        eval_results = measure(mm, tokenizer, progress=progress, **(eval_kwargs or {}))
    stage("writing")
    tmp_root = None
    if out is None:
        tmp_root = Path(tempfile.mkdtemp(prefix="specq-convert-"))
        target = tmp_root / "checkpoint"
    else:
        target = Path(out)
    base_model = model if model and _looks_like_hub_id(model) else (DEFAULT_BASE_MODEL if model is None else None)
    try:
        save_pretrained(mm, target, tokenizer=tokenizer, base_model=base_model, eval_results=eval_results,
                        progress=progress)
        config, index = read_checkpoint_meta(target)
        result = ConvertResult(model=model or DEFAULT_BASE_MODEL, modes=list(mm.specq_plan["modes"]),
                               out=str(target) if tmp_root is None else None,
                               bytes_per_mode=bytes_per_mode(index, mm.specq_plan["modes"]),
                               files=len(list(target.iterdir())), eval_results=eval_results)
        if push_to_hub:
            stage("uploading")
            from specq.hub.push import push_to_hub as push

            pushed = push(target, push_to_hub, private=private, token=token, endpoint=endpoint, progress=progress)
            result.repo_id, result.commit_sha, result.commit_url = pushed.repo_id, pushed.commit_sha, \
                pushed.commit_url
    finally:
        if tmp_root is not None:
            shutil.rmtree(tmp_root, ignore_errors=True)
    return result


def measure(model, tokenizer, *, progress: bool = True, **kwargs) -> dict | None:
    """{mode: {"perplexity": float, "agreement": float, "verifier": mode}} from specq.evaluation."""
    try:
        from specq.evaluation import evaluate
    except ImportError:  # evaluation is optional for conversion
        logger.warning("specq.evaluation is not available; the model card will have no measurements")
        return None
    report = evaluate(model, tokenizer, progress=progress, **kwargs)
    out = {m: {"perplexity": r.get("perplexity")} for m, r in report.modes.items()}
    for p in report.pairs:
        out.setdefault(p["draft"], {}).update(agreement=p["agreement"], verifier=p["verifier"])
    s = report.settings
    out["_note"] = (f"Measured by `specq eval` at conversion: perplexity on {s.get('text_tokens')} tokens of "
                    f"specq's evaluation text (windows of {s.get('max_length')}); draft agreement = rate at which "
                    f"the draft mode's greedy token equals its verifier's along the verifier's greedy output "
                    f"({s.get('prompts')} prompts x up to {s.get('max_new_tokens')} tokens).")
    return out


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/", "~"))
