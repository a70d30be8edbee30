"""transform(): any HF causal LM -> a multi-mode model, in place.

    capture (torch.export graph) -> find_weight_matmuls (graph patterns) -> make_plan (recipe)
      -> apply_plan (swap each planned module for a MultiModeLinear, quantize its weight)

`apply_plan(model, plan, quantize=False)` rebuilds the same modules EMPTY (right shapes and dtypes)
from a saved plan, so a checkpoint loader fills the packed tensors without re-quantizing.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from specq.formats import hadamard, int4, mxfp4
from specq.passes.capture import capture
from specq.passes.find_weight_matmuls import find_weight_matmuls
from specq.passes.plan import (INT4_MODES, MODES, entry_modes, load_recipe, make_plan, validate_lm_head_modes,
                               validate_w4a4_scale_levels,
                               validate_modes)
from specq.transform import calibration
from specq.transform.modes import STATE_ATTR, ModeState
from specq.transform.multimode_linear import MultiModeLinear

log = logging.getLogger(__name__)

PLAN_ATTR = "specq_plan"


def _model_type(model) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def transform(model: nn.Module, modes=MODES, recipe=None, input_ids: torch.Tensor | None = None,
              calibration_ids: torch.Tensor | None = None, lm_head_modes=None,
              w4a4_scale_levels: int | None = None) -> nn.Module:
    """Make every planned weight matmul of `model` a MultiModeLinear (in place) and return `model`.

    modes: which of ("bf16", "mxfp4", "w4a16", "w4a4") to keep; only their tensors are stored
    (without "bf16" the float weights of quantized matmuls are dropped). recipe: None (the family
    recipe for config.model_type, else "default"), a recipe name, a YAML path or a dict.
    The plan is stored as `model.specq_plan`; the initial mode is "bf16" if kept, else modes[0].
    input_ids: example ids for graph capture (default: a few in-vocabulary ids).
    calibration_ids: token ids for the `act_mse` MXFP4 scale rule (default: the model samples its
    own, see calibration.py); unused by the other rules.
    lm_head_modes: None (the recipe's `lm_head_modes`, [] by default) or quantized modes of `modes`
    (e.g. ["mxfp4"]) in which the output head runs quantized; it stays the exact float matmul in every
    other mode (bf16 always). Overrides the recipe's key. A tied head gets its own packed copy.
    w4a4_scale_levels: None (the recipe's key, 16 in the default recipe) or 0..16: W4A4 snaps its weight and activation
    group scales to integer multiples of one unit per row / token (docs/formats.md). Overrides the recipe's key.
    """
    modes = validate_modes(modes)
    if not isinstance(model, nn.Module):
        raise TypeError(f"specq.transform expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(getattr(model, STATE_ATTR, None), ModeState):
        raise ValueError("this model is already a specq multi-mode model (transform was applied); "
                         "transform the original model instead")
    rec = load_recipe(recipe, _model_type(model))
    if lm_head_modes is not None:
        rec["lm_head_modes"] = validate_lm_head_modes(lm_head_modes)
        absent = [m for m in rec["lm_head_modes"] if m not in modes]
        if absent:
            raise ValueError(f"lm_head_modes {rec['lm_head_modes']}: mode(s) {absent} are not among the modes being "
                             f"built {modes}; add them to modes or drop them from lm_head_modes")
    if w4a4_scale_levels is not None:
        rec["w4a4_scale_levels"] = validate_w4a4_scale_levels(w4a4_scale_levels, "specq.transform")
    captured = capture(model, input_ids)
    matmuls = find_weight_matmuls(captured.gm, captured.param_names, captured.aliases, captured.shapes)
    if not matmuls:
        raise ValueError(f"specq.transform: no weight matmul found in the graph of {type(model).__name__} "
                         "(no linear/addmm/matmul with a 2-D parameter operand), so there is nothing to quantize")
    plan = make_plan(matmuls, rec, modes, dtype=_model_dtype(model), model_type=_model_type(model))
    if modes != ("bf16",) and not any(e["action"] == "quantize" for e in plan["matmuls"]):
        reasons = "; ".join(f"{e['module']}: {e['reason']}" for e in plan["matmuls"])
        raise ValueError(f"specq.transform: all {len(plan['matmuls'])} weight matmuls would stay unquantized "
                         f"({reasons}). Use a recipe that quantizes some of them.")
    importance = None
    act = [e["module"] for e in plan["matmuls"]
           if e["action"] == "quantize" and e.get("mxfp4_scale_rule") == "act_mse"]
    if act and calibration_ids is None:
        try:
            calibration_ids = calibration.self_generated_ids(model)
        except ValueError as err:  # no generate()/BOS: the data-free rule instead, recorded in the plan
            log.warning("transform: act_mse needs calibration ids (%s); using mxfp4_scale_rule 'mse'", err)
            for e in plan["matmuls"]:
                if e.get("mxfp4_scale_rule") == "act_mse":
                    e["mxfp4_scale_rule"] = "mse"
                    e["notes"].append("act_mse without calibration ids: fell back to mse")
            act = []
    if act:
        importance = calibration.input_second_moments(model, act, calibration_ids)
        log.info("transform: act_mse calibration on %d x %d tokens for %d matmuls", *calibration_ids.shape, len(act))
    return apply_plan(model, plan, quantize=True, importance=importance)


def _check_plan(plan: dict) -> None:
    if not isinstance(plan, dict) or "matmuls" not in plan or "modes" not in plan:
        raise ValueError("apply_plan: plan must be a dict with 'modes' and 'matmuls' (as in model.specq_plan)")
    if plan.get("version", 1) != 1:
        raise ValueError(f"apply_plan: plan version {plan.get('version')} is not supported by this specq (1)")


def _rotated_int4(w_nk: torch.Tensor, entry: dict, dtype: torch.dtype):
    """INT4 of W @ H (H block-diagonal Hadamard along K, blocks of had_block) in the model's dtype."""
    w = w_nk.detach()
    hb = entry.get("had_block") or 0
    if hb:
        w = hadamard.hadamard_transform(w.to(torch.float64 if dtype == torch.float64 else torch.float32), hb)
    return int4.quantize(w.to(dtype), entry["int4_group_size"], clip_ratio=entry.get("int4_clip_ratio"))


def apply_plan(model: nn.Module, plan: dict, quantize: bool = True, modes=None,
               importance: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Swap each planned module of `model` for a MultiModeLinear (in place).

    quantize=True: quantize the module's current weight into the planned formats.
    quantize=False: allocate EMPTY packed buffers (right shapes/dtypes) for a checkpoint loader to
    fill (`model.load_state_dict(...)`); the bf16 weight (if kept) is the skeleton's own parameter.
    modes: a subset of plan["modes"] to materialise (default: all of them).
    importance: module path -> E[x_k^2], needed to quantize entries with mxfp4_scale_rule act_mse.
    """
    _check_plan(plan)
    plan_modes = validate_modes(plan["modes"])
    modes = plan_modes if modes is None else validate_modes(modes)
    missing = [m for m in modes if m not in plan_modes]
    if missing:
        raise ValueError(f"apply_plan: modes {missing} are not in the plan (it has {plan_modes})")
    if isinstance(getattr(model, STATE_ATTR, None), ModeState):
        raise ValueError("apply_plan: this model already has MultiModeLinears; start from an untransformed model")
    state = ModeState(modes)
    dtype = getattr(torch, plan["dtype"]) if plan.get("dtype") else _model_dtype(model)
    swapped = 0
    for e in plan["matmuls"]:
        quant_modes = entry_modes(e, modes)
        if e["action"] != "quantize" or (e.get("modes") is not None and not quant_modes):
            continue  # kept, or (a partially quantized head) float in every mode being materialised
        try:
            old = model.get_submodule(e["module"])
        except AttributeError:
            raise ValueError(f"apply_plan: the model has no module {e['module']!r} named in the plan "
                             "(is this the same architecture the plan was made for?)") from None
        weight = getattr(old, e["param"], None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"apply_plan: module {e['module']!r} has no tensor attribute {e['param']!r}")
        expect = ((e["out_features"], e["in_features"]) if e["layout"] == "out_in"
                  else (e["in_features"], e["out_features"]))
        if tuple(weight.shape) != expect:
            raise ValueError(f"apply_plan: {e['module']}.{e['param']} has shape {tuple(weight.shape)}, the plan "
                             f"expects {expect}")
        bias = getattr(old, e["bias"]) if e.get("bias") else None
        needs_float = any(m not in quant_modes for m in modes)  # bf16, or a mode the entry is float in
        new = MultiModeLinear(
            e["in_features"], e["out_features"], state, weight=weight if needs_float else None, bias=bias,
            layout=e["layout"], int4_group_size=e.get("int4_group_size"), act_group_size=e.get("act_group_size"),
            had_block=e.get("had_block"), dtype=dtype, device=weight.device, quant_modes=quant_modes,
            w4a4_scale_levels=e.get("w4a4_scale_levels"))
        if quantize:
            _quantize_into(new, weight, e, quant_modes, dtype, (importance or {}).get(e["module"]))
        parent_name, _, child = e["module"].rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, new)
        swapped += 1
    model.__dict__[STATE_ATTR] = state
    model.__dict__[PLAN_ATTR] = {**plan, "modes": list(modes)}
    log.info("apply_plan: %d modules swapped for MultiModeLinear (%s), modes %s", swapped,
             "quantized" if quantize else "empty", ",".join(modes))
    return model


def _quantize_into(new: MultiModeLinear, weight: torch.Tensor, e: dict, modes, dtype, importance=None) -> None:
    with torch.no_grad():
        w_nk = weight if e["layout"] == "out_in" else weight.t()
        if "mxfp4" in modes:
            rule = e.get("mxfp4_scale_rule") or "floor"
            if rule == "act_mse":
                if importance is None:
                    raise ValueError(f"apply_plan: {e['module']} uses mxfp4_scale_rule act_mse but no calibration "
                                     "statistics were given (use specq.transform, or pass importance=)")
                p, s = calibration.quantize_mxfp4_weighted(w_nk, importance)
            else:
                p, s = mxfp4.quantize(w_nk.detach().contiguous(), scale_rule=rule)
            new.mxfp4_packed.copy_(p)
            new.mxfp4_scales.copy_(s)
        if any(m in INT4_MODES for m in modes):
            p, s = _rotated_int4(w_nk, e, dtype)
            new.int4_packed.copy_(p)
            new.int4_scales.copy_(s.to(dtype))


def multimode_linears(model: nn.Module):
    """(path, MultiModeLinear) pairs of `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MultiModeLinear)]


def bytes_per_mode(model: nn.Module) -> dict[str, int]:
    """Bytes of matmul weights (and biases) one forward reads in each mode of a transformed model.

    Counts every weight matmul of the plan: quantized ones by the tensors their mode reads, kept ones
    (lm_head, ...) by their float weight in every mode (a head quantized only in `lm_head_modes` by its
    packed tensors in those modes and its float weight in the others). Embedding tables are not counted (a forward
    reads one row per token).
    """
    plan = getattr(model, PLAN_ATTR, None)
    state = getattr(model, STATE_ATTR, None)
    if plan is None or state is None:
        raise ValueError(f"{type(model).__name__} is not a specq multi-mode model; call specq.transform first")
    out = {m: 0 for m in state.modes}
    for e in plan["matmuls"]:
        mod = model.get_submodule(e["module"])
        if isinstance(mod, MultiModeLinear):
            for m in state.modes:
                out[m] += mod.weight_bytes(m)
        else:
            w = getattr(mod, e["param"])
            b = getattr(mod, e["bias"]) if e.get("bias") else None
            n = w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
            for m in state.modes:
                out[m] += n
    return out


def packed_tensors(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """module path -> {"weight"?, "bias"?, "mxfp4_packed", ...} of every MultiModeLinear (no copies).

    This is what the graph rewrite pass needs to replace matmul nodes with specq op calls.
    """
    out = {}
    for path, m in multimode_linears(model):
        out[path] = dict(list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)))
    return out
