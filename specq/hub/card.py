"""The README.md model card of a specq checkpoint: Hub metadata (YAML front matter) and a short body.

The front matter is what the Hub indexes: base_model + base_model_relation "quantized" link the
checkpoint to its source model; library_name "specq" and the tags make it findable. The body says
how to load it and shows, when the converter measured them with `specq eval`, perplexity and draft
agreement per mode next to the bytes each mode reads.
"""

from __future__ import annotations

import json

from specq.hub.layout import MODE_GROUPS

MODE_TAGS = {"mxfp4": "mxfp4", "w4a16": "int4", "w4a4": "w4a4"}


def render_card(config: dict, index: dict, *, base_model: str | None = None, eval_results: dict | None = None,
                repo_id: str | None = None) -> str:
    q = config["quantization_config"]
    modes = q["modes"]
    tags = ["specq", "speculative-decoding", "quantized"] + sorted({MODE_TAGS[m] for m in modes if m in MODE_TAGS})
    front = {"library_name": "specq", "tags": tags, "pipeline_tag": "text-generation"}
    if base_model:
        front["base_model"] = base_model
        front["base_model_relation"] = "quantized"
    lines = ["---"] + [f"{k}: {json.dumps(v)}" for k, v in front.items()] + ["---", ""]
    title = repo_id or (f"{base_model.split('/')[-1]} (specq multi-mode)" if base_model else "specq multi-mode model")
    lines += [f"# {title}", ""]
    src = f"[{base_model}](https://huggingface.co/{base_model})" if base_model and "/" in base_model else base_model
    lines += [f"A multi-mode checkpoint{f' of {src}' if src else ''} written by "
              "[specq](https://github.com/specq/specq): one model whose matmuls run in any of the modes "
              f"**{', '.join(modes)}**, switchable per forward and sharing one KV cache, for lossless "
              "multi-level speculative decoding with quantized self-drafts (QSpec, ML-SpecQD).", ""]
    lines += ["## Load", "", "```python", "import specq", "",
              f'model = specq.from_pretrained("{repo_id or "path/to/this/checkpoint"}")'
              f'              # all modes; modes=("{modes[-1]}",) downloads only what that mode needs',
              'specq.set_mode(model, "' + modes[0] + '")',
              "# or: import specq; transformers.AutoModelForCausalLM.from_pretrained(...)", "```", ""]
    lines += ["## Modes", "", "| mode | checkpoint bytes | perplexity | draft agreement |", "|---|---:|---:|---:|"]
    gb = index.get("metadata", {}).get("group_bytes", {})
    for m in modes:
        nbytes = gb.get("common", 0) + sum(gb.get(g, 0) for g in MODE_GROUPS[m])
        r = (eval_results or {}).get(m, {})
        agree = _num(r.get("agreement")) + (f" (vs {r['verifier']})" if r.get("verifier") else "")
        lines.append(f"| {m} | {_human(nbytes)} | {_num(r.get('perplexity'))} | {agree} |")
    lines.append("")
    if eval_results:
        note = eval_results.get("_note") if isinstance(eval_results.get("_note"), str) else None
        lines += [note or "Measured by `specq eval` on the converted model: perplexity on the evaluation text, "
                          "and the rate at which each mode's greedy token equals the bf16 target's.", ""]
    else:
        lines += ["Perplexity and agreement were not measured at conversion; run `specq eval` on this checkpoint.", ""]
    rot = q.get("rotation", {})
    lines += ["## Format", "",
              f"- specq checkpoint format version {q['format_version']}, recipe `{q.get('recipe')}`",
              f"- INT4 group sizes: {q.get('group_sizes', {}).get('int4') or '-'}; MXFP4 blocks of 32 (E2M1, E8M0 scales)",
              f"- rotation: {rot.get('type', 'none')}"
              + (f" (online, blocks {rot.get('block_sizes')}, INT4 modes)" if rot.get("type") == "hadamard" else ""),
              "- shards are grouped by mode, so loading some modes downloads only their files", ""]
    return "\n".join(lines)


def _num(v) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)
