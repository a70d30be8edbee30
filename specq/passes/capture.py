"""Pass 1 — capture: an HF causal LM's forward as an FX graph.

`torch.fx.symbolic_trace` fails on current HF models, so we use `torch.export(strict=False)` with
`use_cache=False` and take the *unlifted* module (`ExportedProgram.module()`): there every parameter
is a `get_attr` node whose target is its fully qualified name, and every node carries
`meta["nn_module_stack"]` (the owning module). Nothing is rewritten here (0 rewrites).

Graph after capture (llama, one projection; names shortened)::

    %model_layers_0_self_attn_q_proj_weight = get_attr[target=model.layers.0.self_attn.q_proj.weight]
    %mul_3  = call_function[target=aten.mul.Tensor](args = (%to_1, %model_layers_0_input_layernorm_weight))
    %linear = call_function[target=aten.linear.default](args = (%mul_3, %model_layers_0_self_attn_q_proj_weight))

Dynamo graphs (what a torch.compile backend receives) are also accepted by the later passes: there
parameters are placeholders named `l_self_modules_<a>_modules_<b>_parameters_weight_`, and
`param_names_of_dynamo_graph` maps them back to `a.b.weight`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

log = logging.getLogger(__name__)


@dataclass
class CapturedGraph:
    """An FX graph of a model's forward plus what is needed to map graph nodes back to the model."""

    gm: fx.GraphModule
    # node name -> parameter FQN, for parameters that arrive as placeholders (dynamo graphs)
    param_names: dict[str, str] = field(default_factory=dict)
    # parameter FQN -> every FQN that names the same tensor (tied weights), itself included
    aliases: dict[str, list[str]] = field(default_factory=dict)
    # parameter FQN -> shape, for every parameter of the model
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def parameter_aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """FQN -> all FQNs of the same tensor (tied weights such as lm_head / embed_tokens)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {name: names for names in groups.values() for name in names}


def example_input_ids(model: torch.nn.Module, length: int = 8) -> torch.Tensor:
    """Deterministic in-vocabulary token ids on the model's device (content does not matter)."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if vocab <= 0:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = int(emb.num_embeddings) if emb is not None else 2
    device = next(model.parameters()).device
    return (torch.arange(length, device=device).unsqueeze(0) * 7 + 3) % max(vocab, 1)


def capture(model: torch.nn.Module, input_ids: torch.Tensor | None = None) -> CapturedGraph:
    """Export `model(input_ids=..., use_cache=False)` (strict=False) and return the unlifted graph."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"capture expects a torch.nn.Module, got {type(model).__name__}")
    if next(model.parameters(), None) is None:
        raise ValueError("capture: the model has no parameters, so it has no weight matmul to quantize")
    if input_ids is None:
        input_ids = example_input_ids(model)
    was_training = model.training
    model.eval()
    kwargs = {"input_ids": input_ids}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        kwargs["use_cache"] = False
    try:
        with torch.no_grad():
            ep = torch.export.export(model, (), kwargs, strict=False)
    except Exception as e:  # surface *why* with the fix, not a 200-line trace only
        raise RuntimeError(
            f"capture: torch.export(strict=False) failed on {type(model).__name__} with "
            f"input_ids of shape {tuple(input_ids.shape)}: {type(e).__name__}: {e}. "
            "The model's forward must accept input_ids= (and use_cache=False for HF models).") from e
    finally:
        model.train(was_training)
    gm = ep.module()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    log.info("capture: %s -> %d graph nodes (0 rewrites)", type(model).__name__, len(gm.graph.nodes))
    return CapturedGraph(gm=gm, param_names={}, aliases=parameter_aliases(model), shapes=shapes)


_DYNAMO_PARAM = re.compile(r"^l_(?:self|fn|model)_((?:modules_.+?_)?)parameters_(.+)_$")


def param_names_of_dynamo_graph(gm: fx.GraphModule) -> dict[str, str]:
    """Map dynamo placeholder names (`l_self_modules_a_modules_b_parameters_weight_`) to `a.b.weight`.

    Dynamo flattens the attribute path into the placeholder name; `_modules_` and `_parameters_`
    separate the components.
    """
    out = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        name = node.name.lower()
        m = _DYNAMO_PARAM.match(name)
        if not m:
            continue
        mods, pname = m.group(1), m.group(2)
        parts = []
        if mods:
            parts = [p for p in re.split(r"_modules_", "_" + mods.rstrip("_")) if p]
            parts = [p[len("modules_"):] if p.startswith("modules_") else p for p in parts]
        out[node.name] = ".".join(parts + [pname])
    return out
