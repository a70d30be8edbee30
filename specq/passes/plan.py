"""Pass 3 — plan: decide, per found weight matmul, whether and how it is quantized (recipe policy).

Input: the `WeightMatmul` records of `find_weight_matmuls` and a recipe (YAML in specq/recipes/).
Output: a JSON-serialisable plan, stored later as `model.specq_plan`::

    {"version": 1, "recipe": "llama", "modes": ["bf16", "mxfp4", "w4a16", "w4a4"], "dtype": "float32",
     "matmuls": [
       {"module": "model.layers.0.self_attn.q_proj", "param": "weight", "bias": null,
        "in_features": 576, "out_features": 576, "layout": "out_in", "op": "linear",
        "action": "quantize", "reason": "recipe default",
        "mxfp4_scale_rule": "mse", "int4_group_size": 64, "int4_clip_ratio": null,
        "act_group_size": 32, "had_block": 64, "notes": ["K=576 is not a multiple of group 128: group 64"]},
       {"module": "lm_head", ..., "action": "keep", "reason": "recipe keeps /lm_head/ in the model's dtype"}]}

With `lm_head_modes: [mxfp4]` the head entry is instead quantized in those modes only::

       {"module": "lm_head", ..., "action": "quantize", "modes": ["mxfp4"], "mxfp4_scale_rule": "act_mse",
        "reason": "recipe 'default' lm_head_modes: the output head runs quantized in mxfp4 and in the
                   model's dtype in bf16, w4a16, w4a4 (...)"}

An entry without "modes" is quantized in every quantized mode of the plan (`entry_modes`).

Graph before and after: unchanged (the plan is data; 0 rewrites). Every adjustment (a smaller
dividing group size, a smaller Hadamard block) and every matmul kept in the model's dtype is logged
with its reason — never a silent half-conversion.

Recipe keys (all optional except `name`; a recipe may name a `base` recipe whose keys it overrides):
    keep: [regex, ...]            module paths (re.search) kept in the model's dtype
    keep_tied_to_embedding: bool  weights shared with an input embedding stay unquantized
    mxfp4_scale_rule: floor|mse|act_mse
    int4_group_size: int          preferred INT4 group; falls back to the largest power-of-two divisor of K
    int4_min_group_size: int      below this, the matmul is kept instead
    int4_clip_ratio: null|float|search
    act_group_size: int           W4A4 activation group (0 = per token); falls back like the INT4 group
    w4a4_scale_levels: int        0 (W4A4 uses the INT4 group scales as stored) or 1..16: W4A4 snaps each
                                  row's group scales to integer multiples 0..L of one unit, so the INT8
                                  tensor-core kernel sums all of K in int32 (int4.snap_scales; W4A16 and
                                  the stored copy are unchanged)
    had_block: int|"full"         block of the online Hadamard rotation of INT4 modes (0 = none)
    lm_head_modes: [mode, ...]    quantized modes ("mxfp4", "w4a16", "w4a4") in which the output head
                                  (a module named lm_head, embed_out or output_layer: HEAD_PATTERN) runs
                                  quantized although `keep` / keep_tied_to_embedding keep it; default []
                                  (float head in every mode). In every other mode, bf16 always included,
                                  the head stays the exact float matmul, so speculative output with a
                                  bf16 target stays lossless. A tied head gets its own packed copy; the
                                  input embedding stays float. Modes not in the plan's modes are ignored.
    overrides: [{match: regex, <any key above>}, ...]   first match wins, per module path
    model_types: [str, ...]       config.model_type values this recipe is the default for
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import logging
import os
import re

import yaml

from specq.formats import hadamard
from specq.formats.int4 import MAX_SCALE_LEVELS

log = logging.getLogger(__name__)

MODES = ("bf16", "mxfp4", "w4a16", "w4a4")
QUANTIZED_MODES = ("mxfp4", "w4a16", "w4a4")
INT4_MODES = ("w4a16", "w4a4")
# the output head, as the default recipe's `keep` list names it (llama & co., GPT-NeoX, ChatGLM)
HEAD_PATTERN = r"(^|\.)(lm_head|embed_out|output_layer)$"
MXFP4_BLOCK = 32
# floor: the OCP spec's exponent; mse: least squared weight error among e-1, e, e+1 (formats);
# act_mse: the same, weighted by calibration E[x_k^2] (specq/transform/calibration.py)
MXFP4_SCALE_RULES = ("floor", "mse", "act_mse")
PLAN_VERSION = 1

_FORMAT_KEYS = ("mxfp4_scale_rule", "int4_group_size", "int4_min_group_size", "int4_clip_ratio",
                "act_group_size", "had_block", "w4a4_scale_levels")
_RECIPE_KEYS = set(_FORMAT_KEYS) | {"name", "base", "description", "keep", "keep_tied_to_embedding",
                                    "lm_head_modes", "overrides", "model_types"}

_BUILTIN_DEFAULTS = {
    "keep": [], "keep_tied_to_embedding": True, "mxfp4_scale_rule": "floor", "int4_group_size": 128,
    "int4_min_group_size": 32, "int4_clip_ratio": None, "act_group_size": 32, "had_block": 64,
    "w4a4_scale_levels": 0, "lm_head_modes": [], "overrides": [],
}


# ----------------------------------------------------------------------------------------------
# recipes


def _recipe_dir():
    return importlib.resources.files("specq") / "recipes"


def list_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in _recipe_dir().iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, where: str) -> dict:
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {where}: expected a mapping at the top level, got {type(data).__name__}")
    unknown = set(data) - _RECIPE_KEYS
    if unknown:
        raise ValueError(f"recipe {where}: unknown keys {sorted(unknown)}; known keys: {sorted(_RECIPE_KEYS)}")
    return data


def _load_named(name: str, seen: tuple = ()) -> dict:
    if name in seen:
        raise ValueError(f"recipe {name!r}: circular 'base' chain {' -> '.join(seen + (name,))}")
    if os.path.sep in name or name.endswith((".yaml", ".yml")):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"recipe file {name!r} does not exist")
        with open(name, encoding="utf-8") as f:
            data = _read_yaml(f.read(), name)
        data.setdefault("name", os.path.splitext(os.path.basename(name))[0])
    else:
        path = _recipe_dir() / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown recipe {name!r}; built-in recipes: {', '.join(list_recipes())} "
                             "(or pass a path to a .yaml file, or a dict)")
        data = _read_yaml(path.read_text(encoding="utf-8"), name)
        data.setdefault("name", name)
    return _resolve_base(data, seen + (name,))


def _resolve_base(data: dict, seen: tuple = ()) -> dict:
    base = data.get("base")
    merged = copy.deepcopy(_BUILTIN_DEFAULTS) if base is None else _load_named(base, seen)
    for k, v in data.items():
        if k == "base":
            continue
        merged[k] = copy.deepcopy(v)
    return merged


def load_recipe(recipe=None, model_type: str | None = None) -> dict:
    """A resolved recipe dict. `recipe`: None (the family recipe for `model_type`, else 'default'),
    a built-in name, a path to a YAML file, or a dict (keys as in the module docstring)."""
    if recipe is None:
        name = "default"
        if model_type:
            for cand in list_recipes():
                r = _load_named(cand)
                if model_type in (r.get("model_types") or []):
                    name = cand
                    break
        out = _load_named(name)
    elif isinstance(recipe, str):
        out = _load_named(recipe)
    elif isinstance(recipe, dict):
        data = dict(recipe)
        unknown = set(data) - _RECIPE_KEYS
        if unknown:
            raise ValueError(f"recipe dict: unknown keys {sorted(unknown)}; known keys: {sorted(_RECIPE_KEYS)}")
        data.setdefault("name", "custom")
        out = _resolve_base(data)
    else:
        raise TypeError(f"recipe must be None, a name, a path or a dict, got {type(recipe).__name__}")
    _validate_recipe(out)
    return out


def validate_w4a4_scale_levels(value, where: str = "w4a4_scale_levels") -> int:
    """The recipe key w4a4_scale_levels, checked: an int in 0..16."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SCALE_LEVELS:
        raise ValueError(f"{where}: w4a4_scale_levels must be an int in 0..{MAX_SCALE_LEVELS} (0 = the group scales "
                         f"as stored), got {value!r}")
    return value


def _validate_recipe(r: dict) -> None:
    where = f"recipe {r.get('name')!r}"
    if r["mxfp4_scale_rule"] not in MXFP4_SCALE_RULES:
        raise ValueError(f"{where}: mxfp4_scale_rule must be one of {MXFP4_SCALE_RULES}, "
                         f"got {r['mxfp4_scale_rule']!r}")
    for k in ("int4_group_size", "int4_min_group_size"):
        if not isinstance(r[k], int) or r[k] < 8 or r[k] % 8:
            raise ValueError(f"{where}: {k} must be a positive multiple of 8, got {r[k]!r}")
    if not isinstance(r["act_group_size"], int) or r["act_group_size"] < 0:
        raise ValueError(f"{where}: act_group_size must be an int >= 0 (0 = per token), got {r['act_group_size']!r}")
    validate_w4a4_scale_levels(r["w4a4_scale_levels"], where)
    hb = r["had_block"]
    if not (hb == "full" or (isinstance(hb, int) and hb >= 0)):
        raise ValueError(f"{where}: had_block must be an int >= 0 (0 = no rotation) or 'full', got {hb!r}")
    r["lm_head_modes"] = validate_lm_head_modes(r.get("lm_head_modes"), where)
    for o in r.get("overrides") or []:
        if not isinstance(o, dict) or "match" not in o:
            raise ValueError(f"{where}: each override needs a 'match' regex, got {o!r}")
        bad = set(o) - set(_FORMAT_KEYS) - {"match", "keep"}
        if bad:
            raise ValueError(f"{where}: override {o['match']!r} has unknown keys {sorted(bad)}")


def validate_lm_head_modes(value, where: str = "lm_head_modes") -> list[str]:
    """`lm_head_modes` as a list of quantized mode names (None -> []); a clear error for anything else.
    A comma-separated string ("mxfp4,w4a16") is accepted too."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: lm_head_modes must be a list of mode names from {QUANTIZED_MODES}, "
                         f"got {value!r}")
    if "bf16" in value:
        raise ValueError(f"{where}: lm_head_modes cannot contain 'bf16': the bf16 (target) mode always runs the "
                         f"exact float head; allowed values are {QUANTIZED_MODES}")
    bad = [v for v in value if v not in QUANTIZED_MODES]
    if bad:
        raise ValueError(f"{where}: unknown lm_head_modes value(s) {bad}; allowed values are {QUANTIZED_MODES}")
    return list(dict.fromkeys(value))


def is_head(module: str) -> bool:
    """Whether a module path names the model's output head (HEAD_PATTERN)."""
    return re.search(HEAD_PATTERN, module) is not None


def entry_modes(entry: dict, modes) -> tuple[str, ...]:
    """The modes (of `modes`) in which plan `entry` runs quantized: () for a kept entry; the entry's own
    "modes" where it has them (the output head under `lm_head_modes`); else every mode but bf16."""
    if entry.get("action") != "quantize":
        return ()
    own = entry.get("modes")
    return tuple(m for m in modes if m != "bf16" and (own is None or m in own))


# ----------------------------------------------------------------------------------------------
# per-matmul decisions


def _pow2_divisor(k: int, at_most: int, at_least: int) -> int:
    """Largest power of two g with at_least <= g <= at_most and k % g == 0 (0 if none)."""
    g = 1
    while g * 2 <= at_most:
        g *= 2
    while g >= max(at_least, 1):
        if k % g == 0:
            return g
        g //= 2
    return 0


def _choose_had_block(k: int, want) -> tuple[int, str | None]:
    if want == 0:
        return 0, None
    if want == "full":
        if hadamard.supported(k):
            return k, None
        want = 64
        b = _pow2_divisor(k, want, 8)
        return b, (f"no Hadamard matrix of order K={k}: rotation blocks of {b}" if b else
                   f"no Hadamard matrix of order K={k} and no power-of-two block >= 8 divides it")
    if k % want == 0 and hadamard.supported(want):
        return want, None
    b = _pow2_divisor(k, want, 8)
    return b, (f"K={k} is not a multiple of had_block {want}: rotation blocks of {b}" if b else
               f"no Hadamard block >= 8 divides K={k}")


def decide(m: dict, recipe: dict, modes: tuple[str, ...]) -> dict:
    """Fill the action/reason/format fields of one plan entry `m` (module, in/out features, ...)."""
    cfg = {k: recipe[k] for k in _FORMAT_KEYS}
    keep_by_recipe = None
    for pat in recipe.get("keep") or []:
        if re.search(pat, m["module"]):
            keep_by_recipe = pat
            break
    for o in recipe.get("overrides") or []:
        if re.search(o["match"], m["module"]):
            cfg.update({k: v for k, v in o.items() if k in _FORMAT_KEYS})
            if o.get("keep"):
                keep_by_recipe = o["match"]
            break
    k = m["in_features"]
    entry = dict(m)
    entry.update(action="quantize", reason="recipe " + recipe["name"], notes=[],
                 mxfp4_scale_rule=None, int4_group_size=None, int4_clip_ratio=None,
                 act_group_size=None, had_block=None)

    # the output head, quantized only in the recipe's lm_head_modes (float in the others, bf16 included)
    head_modes = None
    if recipe.get("lm_head_modes") and is_head(m["module"]):
        head_modes = [x for x in modes if x in recipe["lm_head_modes"]] or None

    def keep(reason):
        if entry.pop("modes", None) is not None:
            entry["notes"].append(f"lm_head_modes {head_modes} not applied: {reason}")
        entry.update(action="keep", reason=reason, mxfp4_scale_rule=None, int4_group_size=None,
                     int4_clip_ratio=None, act_group_size=None, had_block=None)
        return entry

    if head_modes is None:
        if keep_by_recipe is not None:
            return keep(f"recipe {recipe['name']!r} keeps /{keep_by_recipe}/ in the model's dtype")
        if m.get("tied_to_embedding") and recipe.get("keep_tied_to_embedding", True):
            return keep("weight is tied to an input embedding (kept in the model's dtype)")
    else:
        entry["modes"] = list(head_modes)  # from here on, a keep() records that lm_head_modes did not apply
    if not m.get("whole_module"):
        return keep(f"the matmul is not the whole forward of module {m['module']!r} (other ops run inside "
                    "it), so the module cannot be swapped in eager mode; kept in the model's dtype")
    if not m.get("param"):
        return keep("the weight is not an attribute of the module that multiplies by it")
    quantized = [x for x in modes if x != "bf16"]
    if head_modes is not None:
        quantized = head_modes
        float_modes = [x for x in modes if x not in head_modes]
        entry["reason"] = (f"recipe {recipe['name']!r} lm_head_modes: the output head runs quantized in "
                           f"{', '.join(head_modes)}"
                           + (f" and in the model's dtype in {', '.join(float_modes)}" if float_modes else "")
                           + (" (the input embedding it is tied to stays in the model's dtype)"
                              if m.get("tied_to_embedding") else ""))
    if "mxfp4" in quantized:
        if k % MXFP4_BLOCK:
            return keep(f"K={k} is not a multiple of the MXFP4 block {MXFP4_BLOCK}")
        entry["mxfp4_scale_rule"] = cfg["mxfp4_scale_rule"]
    if any(x in INT4_MODES for x in quantized):
        want = cfg["int4_group_size"]
        g = want if k % want == 0 else _pow2_divisor(k, want, cfg["int4_min_group_size"])
        if not g:
            return keep(f"no INT4 group size between {cfg['int4_min_group_size']} and {want} divides K={k}")
        if g != want:
            entry["notes"].append(f"K={k} is not a multiple of INT4 group {want}: group {g}")
        entry["int4_group_size"] = g
        entry["int4_clip_ratio"] = cfg["int4_clip_ratio"]
        hb, note = _choose_had_block(k, cfg["had_block"])
        if note:
            entry["notes"].append(note)
        if cfg["had_block"] != 0 and hb == 0:
            return keep(f"recipe asks for a Hadamard rotation but {note}")
        entry["had_block"] = hb
    if "w4a4" in quantized:
        a = cfg["act_group_size"]
        if a and k % a:
            a2 = _pow2_divisor(k, a, 8)
            entry["notes"].append(f"K={k} is not a multiple of activation group {a}: "
                                  + (f"group {a2}" if a2 else "per-token scales"))
            a = a2
        entry["act_group_size"] = a
        if cfg["w4a4_scale_levels"]:  # absent (0) keeps plans written before the key existed unchanged
            entry["w4a4_scale_levels"] = cfg["w4a4_scale_levels"]
    return entry


def make_plan(matmuls, recipe: dict, modes, dtype=None, model_type: str | None = None) -> dict:
    """The plan for `matmuls` (WeightMatmul records or dicts) under a resolved `recipe`."""
    modes = validate_modes(modes)
    entries = []
    seen = set()
    for mm in matmuls:
        d = mm.as_dict() if hasattr(mm, "as_dict") else dict(mm)
        key = (d["module"], d.get("param"))
        if key in seen:  # a module called twice gives two nodes; one plan entry
            continue
        seen.add(key)
        base = {
            "module": d["module"], "param": d.get("param"), "bias": d.get("bias_param"),
            "in_features": int(d["in_features"]), "out_features": int(d["out_features"]),
            "layout": d["layout"], "op": d["op"], "weight_fqn": d.get("weight_fqn"),
            "tied_to_embedding": bool(d.get("tied_to_embedding")), "whole_module": bool(d.get("whole_module")),
        }
        e = decide(base, recipe, modes)
        if e["action"] == "keep":
            log.info("plan: keep %s in the model's dtype: %s", e["module"], e["reason"])
        for note in e["notes"]:
            log.info("plan: %s: %s", e["module"], note)
        entries.append(e)
    n_q = sum(e["action"] == "quantize" for e in entries)
    log.info("plan: %d of %d weight matmuls quantized (recipe %s, modes %s)", n_q, len(entries),
             recipe["name"], ",".join(modes))
    head_modes = [x for x in modes if x in (recipe.get("lm_head_modes") or [])]
    if head_modes:
        heads = [e for e in entries if is_head(e["module"])]
        if not heads:
            raise ValueError(f"lm_head_modes {head_modes}: no output head among the {len(entries)} weight matmuls "
                             f"(no module path matches {HEAD_PATTERN!r}); drop lm_head_modes for this model")
        for e in heads:
            if e.get("modes"):
                log.info("plan: output head %s quantized in %s only", e["module"], ",".join(e["modes"]))
            else:
                log.warning("plan: lm_head_modes %s: the output head %s stays in the model's dtype: %s",
                            head_modes, e["module"], e["reason"])
    plan = {"version": PLAN_VERSION, "recipe": recipe["name"], "modes": list(modes),
            "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
            "model_type": model_type, "matmuls": entries}
    if head_modes:
        plan["lm_head_modes"] = head_modes
    json.dumps(plan)  # fail here, not at save time, if anything is not JSON-serialisable
    return plan


def validate_modes(modes) -> tuple[str, ...]:
    if isinstance(modes, str):
        modes = (modes,)
    try:
        modes = tuple(modes)
    except TypeError:
        raise TypeError(f"modes must be a sequence of mode names from {MODES}, got {modes!r}") from None
    if not modes:
        raise ValueError(f"modes is empty; pick from {MODES}")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; specq modes are {MODES}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"modes has duplicates: {modes}")
    return modes
