"""Levels of a speculative chain, from the cheapest drafter to the target (last).

A level is either model-free (`NgramLevel`) or a `ModelLevel`: "call this module, with this model
switched to this mode, using that model's shared KV cache for its first `depth` layers". So a mode of
the multi-mode model, a separate smaller model and a shallow copy of the target are all the same
thing to the decoding loop:

- mode level        "mxfp4"          -> ModelLevel(module=model, root=model, mode="mxfp4")
- separate model    small or (small, "mxfp4") -> ModelLevel(module=small, root=small, mode=...)
- shallow copy      "shallow:8[:mode]" -> ModelLevel(module=<first 8 layers + norm + head of model>,
                                          root=model, depth=8): it shares the target's weights AND
                                          the target's KV cache entries of those 8 layers.
- "ngram[:N]"        prompt lookup with n-grams up to N (default 3).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from specq.runtime.drafters import NgramDrafter
from specq.runtime.kv_cache import num_cache_layers

MODE_NAMES = ("bf16", "mxfp4", "w4a16", "w4a4")


@dataclass
class NgramLevel:
    drafter: NgramDrafter
    name: str = "ngram"

    is_model = False


@dataclass
class ModelLevel:
    module: nn.Module  # what is called
    root: nn.Module  # whose weights, modes and KV cache are used
    mode: str | None  # None: the root is not a multi-mode model; run it as it is
    depth: int  # decoder layers used (== all layers of root unless a shallow copy)
    name: str
    accepts_logits_to_keep: bool = field(default=True)

    is_model = True

    @property
    def writer_key(self):
        return (id(self.root), self.mode, self.depth)


def is_multimode(model: nn.Module) -> bool:
    """A model that went through specq.transform (it carries a shared mode holder)."""
    try:
        from specq.transform.modes import find_state
    except ImportError:  # transform layer absent: only plain models exist
        return False
    try:
        find_state(model)
    except ValueError:
        return False
    return True


def _accepts_logits_to_keep(module: nn.Module) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _find_layer_list(model: nn.Module, num_layers: int) -> str:
    """Dotted path of the ModuleList holding the decoder layers (found by length, not by family)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == num_layers:
            if best is None or name.count(".") < best.count("."):
                best = name
    if best is None:
        raise ValueError(f"cannot find the decoder layer list of {type(model).__name__} "
                         f"(no ModuleList of {num_layers} modules); a shallow level needs one")
    return best


def shallow_copy(model: nn.Module, num_layers: int) -> nn.Module:
    """The model with only its first `num_layers` decoder layers (plus its final norm and head).

    Nothing is copied but the few container objects on the path to the layer list: every parameter,
    buffer and submodule is the target's own, so modes switched on the target apply here too, and the
    layers keep their `layer_idx`, so they read and write the target's KV cache entries.
    """
    total = num_cache_layers(model)
    if not 1 <= num_layers < total:
        raise ValueError(f"a shallow level needs 1 <= layers < {total} (the target's depth), got {num_layers}")
    path = _find_layer_list(model, total).split(".")
    root = copy.copy(model)
    root._modules = dict(model._modules)
    parent, orig_parent = root, model
    for part in path[:-1]:
        orig_child = orig_parent._modules[part]
        child = copy.copy(orig_child)
        child._modules = dict(orig_child._modules)
        parent._modules[part] = child
        parent, orig_parent = child, orig_child
    parent._modules[path[-1]] = nn.ModuleList(list(orig_parent._modules[path[-1]])[:num_layers])
    return root


def _vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def _check_mode(root: nn.Module, mode: str, where: str) -> str | None:
    """The mode to switch to before calling (None: run the model as it is)."""
    if mode not in MODE_NAMES:
        raise ValueError(f"{where}: unknown mode {mode!r}; modes are {', '.join(MODE_NAMES)}")
    if is_multimode(root):
        from specq.transform.modes import available_modes

        if mode not in available_modes(root):
            raise ValueError(f"{where}: the model was transformed for modes {available_modes(root)}, not "
                             f"{mode!r}; transform it with that mode: specq.transform(model, modes=(..., {mode!r}))")
        return mode
    if mode == "bf16":  # the model's own weights: what an untransformed model computes
        return None
    raise ValueError(f"{where}: mode {mode!r} needs a multi-mode model; "
                     f"run specq.transform(model, modes=('bf16', {mode!r})) first")


def resolve_levels(model: nn.Module, levels) -> list:
    """Turn the user's level specs into NgramLevel / ModelLevel objects (validated, no work done)."""
    if isinstance(levels, str):
        levels = [s.strip() for s in levels.split(",") if s.strip()]
    levels = list(levels)
    if not levels:
        raise ValueError("levels is empty; give at least the target, e.g. levels=['bf16']")
    total = num_cache_layers(model)
    vocab = _vocab_size(model)
    out = []
    for i, spec in enumerate(levels):
        where = f"levels[{i}]"
        last = i == len(levels) - 1
        if isinstance(spec, (NgramLevel, ModelLevel)):
            lvl = spec
        elif isinstance(spec, str) and spec.split(":")[0] == "ngram":
            parts = spec.split(":")
            try:
                n = int(parts[1]) if len(parts) > 1 else 3
            except ValueError:
                raise ValueError(f"{where}: bad ngram spec {spec!r}; use 'ngram' or 'ngram:N'") from None
            lvl = NgramLevel(NgramDrafter(max_ngram=n), name=spec)
        elif isinstance(spec, str) and spec.split(":")[0] == "shallow":
            parts = spec.split(":")
            try:
                depth = int(parts[1])
            except (IndexError, ValueError):
                raise ValueError(f"{where}: bad shallow spec {spec!r}; use 'shallow:LAYERS' or "
                                 f"'shallow:LAYERS:MODE'") from None
            mode = parts[2] if len(parts) > 2 else None
            if mode is None:  # the target's mode (bf16 unless told)
                tgt = levels[-1] if isinstance(levels[-1], str) and levels[-1] in MODE_NAMES else "bf16"
                mode = tgt
            lvl = ModelLevel(shallow_copy(model, depth), model, _check_mode(model, mode, where), depth, spec)
        elif isinstance(spec, str):
            if spec not in MODE_NAMES:
                raise ValueError(f"{where}: unknown level {spec!r}; a level is one of the modes "
                                 f"{', '.join(MODE_NAMES)}, 'ngram[:N]', 'shallow:LAYERS[:MODE]', "
                                 f"a model, or a (model, mode) pair")
            lvl = ModelLevel(model, model, _check_mode(model, spec, where), total, spec)
        elif isinstance(spec, nn.Module) or (isinstance(spec, (tuple, list)) and len(spec) == 2
                                             and isinstance(spec[0], nn.Module)):
            other, mode = (spec, None) if isinstance(spec, nn.Module) else spec
            if mode is not None:
                mode = _check_mode(other, mode, where)
            name = f"{type(other).__name__}" + (f":{mode}" if mode else "")
            if other is model:
                lvl = ModelLevel(model, model, mode, total, name)
            else:
                lvl = ModelLevel(other, other, mode, num_cache_layers(other), name)
        else:
            raise TypeError(f"{where}: a level is a str, an nn.Module or a (module, mode) pair, got {type(spec).__name__}")
        if lvl.is_model:
            if _vocab_size(lvl.module) != vocab:
                raise ValueError(f"{where}: level {lvl.name!r} has a vocabulary of {_vocab_size(lvl.module)} "
                                 f"tokens but the target has {vocab}; levels must share the target's "
                                 f"tokenizer (use a model of the same family, or 'ngram')")
            lvl.accepts_logits_to_keep = _accepts_logits_to_keep(lvl.module)
        elif i > 0:
            raise ValueError(f"{where}: 'ngram' proposes tokens but cannot verify them; it can only be "
                             f"the first (cheapest) level")
        if last:
            if not lvl.is_model or lvl.root is not model or lvl.depth != total:
                raise ValueError(f"the last level is the target and must be a mode of the model itself "
                                 f"(e.g. 'bf16'), got {lvl.name!r}")
        out.append(lvl)
    return out


def first_param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())
