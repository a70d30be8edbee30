"""The torch.compile backend "specq": specq's graph passes on the dynamo graph, then inductor.

    fast = torch.compile(model, backend="specq")                                # transformed model
    fast = torch.compile(hf_model, backend="specq", options={"mode": "mxfp4"})  # plain HF model

Registered under the `torch_dynamo_backends` entry point (pyproject.toml) and, so that it works
without reinstalling, also by importing this module (`import specq.backend`).

What it does with the graph dynamo hands it:

* **a transformed model** (`specq.transform`): dynamo has already traced every MultiModeLinear in
  the model's active mode, so the graph holds `torch.ops.specq.linear_<mode>` calls; dynamo guards
  on the mode, so `specq.set_mode` makes the next call compile (once) a graph of the new mode. The
  backend passes the graph on unchanged (an `options` mode is refused: switch with set_mode).
* **a plain model**: parameters arrive as graph placeholders whose tensors are the example inputs.
  The backend finds the weight matmuls (`find_weight_matmuls`), plans them with a recipe
  (`options["recipe"]`, default the "default" recipe; its calibrated "act_mse" MXFP4 rule becomes
  the data-free "mse" here, as in transform without calibration), quantizes each planned weight ONCE into the
  packed format of `options["mode"]` (cached per weight tensor, so a recompile does not quantize
  again) and rewrites the matmul nodes into specq op calls (`rewrite_weight_matmuls`), the packed
  tensors becoming graph constants. Mode "bf16" (the default) rewrites nothing.

On CUDA (`options["dense_gemv"]`: "auto", the default; True forces it, False turns it off), dense
linears with <= 4 rows of bf16/fp16 x become `torch.ops.specq.linear_dense` calls
(specq.passes.dense_gemv): specq's weight-streaming GEMV where it times faster than cuBLAS.

Then the graph goes to inductor (`compile_fx`); `torch.compile(..., mode="reduce-overhead")` and
`options["inductor"]` (a dict of inductor config patches) are forwarded. `options["inner"]` picks
another dynamo backend instead ("eager", "aot_eager": for debugging and cheap CPU tests).

The packed tensors are made from the weights as they are at compile time: a plain model whose
weights are changed in place afterwards must be compiled again (`torch._dynamo.reset()`).
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.fx as fx

log = logging.getLogger(__name__)

BACKEND_NAME = "specq"
OPTION_KEYS = ("mode", "recipe", "model_type", "inner", "inductor", "dense_gemv")

# id(weight) -> (weakref to the weight, {(mode, format settings): packed tensors}). Keyed by id with a
# finalizer (not a WeakKeyDictionary, whose lookups compare tensors with ==): dropping the model
# frees its packed copies.
_PACKED_CACHE: dict[int, tuple] = {}


def _packed_for(weight: torch.Tensor) -> dict:
    entry = _PACKED_CACHE.get(id(weight))
    if entry is not None and entry[0]() is weight:
        return entry[1]
    per_weight: dict = {}
    _PACKED_CACHE[id(weight)] = (weakref.ref(weight), per_weight)
    weakref.finalize(weight, _PACKED_CACHE.pop, id(weight), None)
    return per_weight


class SpecqBackendStats:
    """Counters for tests and logs: graphs compiled and matmul nodes rewritten, per mode."""

    def __init__(self):
        self.graphs = 0
        self.rewrites = 0
        self.quantized = 0  # weights quantized (cache misses)
        self.dense_routed = 0  # dense linears routed to specq's GEMV op (specq.passes.dense_gemv)
        self.by_mode: dict[str, int] = {}

    def reset(self):
        self.__init__()


stats = SpecqBackendStats()


def _specq_op_modes(gm: fx.GraphModule) -> set[str]:
    """Modes of the specq ops already in the graph (a transformed model traced by dynamo)."""
    out = set()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            name = str(node.target)
            if name.startswith("specq.linear_") or ".specq.linear_" in name or "specq::linear_" in name:
                out.add(name.split("linear_")[1].split(".")[0])
    out.discard("dense")  # specq.linear_dense is F.linear (this backend's own routing), not a mode
    return out


def _check_options(options: dict | None) -> dict:
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"specq backend: unknown option(s) {unknown}; known options are {OPTION_KEYS}")
    if options.get("dense_gemv", "auto") not in ("auto", True, False):
        raise ValueError(f"specq backend: options['dense_gemv'] must be 'auto', True or False, got "
                         f"{options['dense_gemv']!r}")
    mode = options.get("mode")
    if mode is not None:
        from specq.passes.plan import MODES

        if mode not in MODES:
            raise ValueError(f"specq backend: unknown mode {mode!r}; modes are {MODES}")
    return options


def _param_tensors(gm: fx.GraphModule, example_inputs) -> dict[str, torch.Tensor]:
    """placeholder name -> its example tensor (parameters are placeholders in dynamo graphs)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {n.name: t for n, t in zip(placeholders, example_inputs) if isinstance(t, torch.Tensor)}


def _aliases(names: dict[str, str], tensors: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """FQN -> every FQN of the same tensor (tied lm_head / embedding), from tensor identity."""
    groups: dict[int, list[str]] = {}
    for node_name, fqn in names.items():
        t = tensors.get(node_name)
        if t is not None:
            groups.setdefault(id(t), []).append(fqn)
    return {fqn: group for group in groups.values() for fqn in group}


def _pack(weight: torch.Tensor, entry: dict, mode: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Packed tensors of `weight` for `mode`, exactly as specq.transform makes them (cached)."""
    from specq.transform.modes import ModeState
    from specq.transform.multimode_linear import MultiModeLinear
    from specq.transform.transform import _quantize_into

    per_weight = _packed_for(weight)
    key = (mode, weight._version, entry["layout"], entry.get("int4_group_size"), entry.get("had_block"),
           entry.get("mxfp4_scale_rule"), entry.get("int4_clip_ratio"))
    hit = per_weight.get(key)
    if hit is not None:
        return hit
    state = ModeState((mode,))
    mml = MultiModeLinear(entry["in_features"], entry["out_features"], state, weight=None, bias=None,
                          layout=entry["layout"], int4_group_size=entry.get("int4_group_size"),
                          act_group_size=entry.get("act_group_size"), had_block=entry.get("had_block"),
                          w4a4_scale_levels=entry.get("w4a4_scale_levels"),
                          dtype=dtype, device=weight.device)
    _quantize_into(mml, weight, entry, (mode,), dtype)
    packed = {name: buf for name, buf in mml.named_buffers(recurse=False)}
    per_weight[key] = packed
    stats.quantized += 1
    return packed


def quantize_graph(gm: fx.GraphModule, example_inputs, mode: str, recipe=None,
                   model_type: str | None = None) -> tuple[fx.GraphModule, int]:
    """Rewrite the weight matmuls of a dynamo graph of a PLAIN model into specq ops of `mode`.

    Returns (gm, number of rewritten nodes). The planned weights are quantized from the example
    inputs (the model's parameters).
    """
    from specq.passes.capture import param_names_of_dynamo_graph
    from specq.passes.find_weight_matmuls import find_weight_matmuls
    from specq.passes.plan import load_recipe, make_plan
    from specq.passes.rewrite import rewrite_weight_matmuls

    if mode == "bf16":
        return gm, 0
    names = param_names_of_dynamo_graph(gm)
    tensors = _param_tensors(gm, example_inputs)
    aliases = _aliases(names, tensors)
    shapes = {fqn: tuple(tensors[n].shape) for n, fqn in names.items() if n in tensors}
    matmuls = find_weight_matmuls(gm, param_names=names, aliases=aliases, shapes=shapes)
    if not matmuls:
        raise ValueError("specq backend: no weight matmul found in the captured graph (no linear/addmm/"
                         f"matmul with a 2-D parameter operand), so there is nothing to run in mode {mode!r}")
    weights = {names[n]: t for n, t in tensors.items() if n in names}
    dtype = next((t.dtype for t in weights.values() if t.is_floating_point()), torch.float32)
    plan = make_plan(matmuls, load_recipe(recipe, model_type), (mode,), dtype=dtype, model_type=model_type)
    if mode == "mxfp4":
        _without_calibration(plan)
    packed = {}
    for e in plan["matmuls"]:
        if e["action"] != "quantize":
            continue
        fqn = e.get("weight_fqn") or (f"{e['module']}.{e['param']}" if e["module"] else e["param"])
        w = weights.get(fqn)
        if w is None:
            raise ValueError(f"specq backend: the weight {fqn!r} of a planned matmul is not a graph input")
        packed[e["module"]] = _pack(w, e, mode, dtype)
    gm, count = rewrite_weight_matmuls(gm, plan, packed, mode, param_names=names, aliases=aliases)
    _give_sources(gm)
    return gm, count


def _without_calibration(plan: dict) -> None:
    """The "act_mse" MXFP4 rule weighs each block's error by calibration statistics that transform
    gathers by running the model on text; a backend sees one graph and its example inputs, not a
    model it can sample from. Use the data-free "mse" rule instead, as transform itself does when it
    has no calibration ids (recorded in the plan's notes). For act_mse, transform first and compile
    the transformed model."""
    changed = 0
    for e in plan["matmuls"]:
        if e.get("mxfp4_scale_rule") == "act_mse":
            e["mxfp4_scale_rule"] = "mse"
            e.setdefault("notes", []).append("specq backend: act_mse needs calibration; used mse")
            changed += 1
    if changed:
        log.warning("specq backend: mxfp4_scale_rule act_mse needs calibration text; %d matmuls use 'mse' "
                    "(transform the model with specq.transform for act_mse)", changed)


def _give_sources(gm: fx.GraphModule) -> None:
    """AOTAutograd maps every parameter/buffer of a dynamo graph to the source dynamo found it at
    (`_param_name_to_source`); the packed tensors the rewrite added have none, so give each one a
    unique constant source (they are constants of this graph, nothing to guard on)."""
    table = getattr(gm, "_param_name_to_source", None)
    if table is None:
        return
    from torch._dynamo.source import ConstantSource

    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in table:
            table[name] = ConstantSource(f"__specq_{name}")


def _on_cuda(example_inputs) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)


def _inner_compiler(options: dict, torch_mode: str | None):
    inner = options.get("inner", "inductor")
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        patches = {}
        if torch_mode and torch_mode != "default":
            patches.update(torch._inductor.list_mode_options(torch_mode))
        patches.update(options.get("inductor") or {})

        def run(gm, example_inputs):
            return compile_fx(gm, example_inputs, config_patches=patches or None)

        return run
    if options.get("inductor"):
        raise ValueError("specq backend: options['inductor'] applies only to inner='inductor'")
    if callable(inner):
        return inner
    return torch._dynamo.lookup_backend(inner)


def specq_backend(gm: fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
    """Dynamo backend: specq passes (weight matmuls -> specq ops in the chosen mode), then inductor.

    `mode` is torch.compile's own mode ("reduce-overhead", "max-autotune", ...), forwarded to
    inductor; the specq quantization mode of a plain model is `options["mode"]`.
    """
    options = _check_options(options)
    qmode = options.get("mode")
    present = _specq_op_modes(gm)
    if present:  # a transformed model: the graph already is its active mode
        if qmode is not None and qmode not in present:
            raise ValueError(f"specq backend: this is a specq multi-mode model traced in mode "
                             f"{'/'.join(sorted(present))}; options['mode']={qmode!r} is for plain models. "
                             "Switch a multi-mode model with specq.set_mode(model, mode) instead.")
        effective, count = "/".join(sorted(present)), 0
    else:
        qmode = qmode or "bf16"
        gm, count = quantize_graph(gm, example_inputs, qmode, options.get("recipe"), options.get("model_type"))
        effective = qmode
    dense = options.get("dense_gemv", "auto")
    if dense is True or (dense == "auto" and _on_cuda(example_inputs)):
        from specq.passes.dense_gemv import route_small_linears

        gm, routed = route_small_linears(gm)
        stats.dense_routed += routed
    stats.graphs += 1
    stats.rewrites += count
    stats.by_mode[effective] = stats.by_mode.get(effective, 0) + 1
    log.info("specq backend: graph %d, mode %s, %d matmul nodes rewritten", stats.graphs, effective, count)
    return _inner_compiler(options, mode)(gm, example_inputs)


def register() -> None:
    """Register "specq" with dynamo (idempotent; the entry point does the same when installed)."""
    from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS, register_backend

    if BACKEND_NAME in _COMPILER_FNS:
        return
    if _BACKENDS.get(BACKEND_NAME) is not None:
        # dynamo found our entry point and is importing this module right now to load it: it
        # registers the function itself once the import returns (registering here too would make
        # it fail with "duplicate name")
        return
    register_backend(compiler_fn=specq_backend, name=BACKEND_NAME)


register()
