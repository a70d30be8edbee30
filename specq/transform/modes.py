"""Mode switching for multi-mode models: one shared holder per model, so a switch is O(1).

Every MultiModeLinear of a model keeps a reference to the same `ModeState`; `set_mode` writes one
attribute of it. Nothing is re-quantized, copied or moved.
"""

from __future__ import annotations

import contextlib

import torch

from specq.passes.plan import MODES, validate_modes

STATE_ATTR = "_specq_mode_state"


class ModeState:
    """The active mode of one multi-mode model and the modes it was transformed for."""

    __slots__ = ("modes", "mode")

    def __init__(self, modes, mode: str | None = None):
        self.modes = validate_modes(modes)
        self.mode = mode if mode is not None else ("bf16" if "bf16" in self.modes else self.modes[0])
        self.check(self.mode)

    def check(self, mode: str) -> str:
        if mode not in self.modes:
            if mode in MODES:
                raise ValueError(f"mode {mode!r} is not available: this model was transformed for modes "
                                 f"{self.modes}. Re-run specq.transform(model, modes=(..., {mode!r})) "
                                 "on the original model to add it.")
            raise ValueError(f"unknown mode {mode!r}; specq modes are {MODES} "
                             f"(this model has {self.modes})")
        return mode

    def __repr__(self) -> str:
        return f"ModeState(mode={self.mode!r}, modes={self.modes})"


def find_state(model: torch.nn.Module) -> ModeState:
    """The model's mode holder (set by transform/apply_plan); a clear error if it has none."""
    state = getattr(model, STATE_ATTR, None)
    if isinstance(state, ModeState):
        return state
    # a wrapper (e.g. a compiled module or a parent module) around a transformed model
    for sub in model.modules() if isinstance(model, torch.nn.Module) else ():
        state = sub.__dict__.get(STATE_ATTR)
        if isinstance(state, ModeState):
            return state
    inner = getattr(model, "_orig_mod", None)
    if inner is not None:
        return find_state(inner)
    raise ValueError(f"{type(model).__name__} is not a specq multi-mode model; call "
                     "specq.transform(model, modes=...) first")


def set_mode(model: torch.nn.Module, mode: str) -> None:
    """Switch every MultiModeLinear of `model` to `mode` (one attribute write)."""
    state = find_state(model)
    state.mode = state.check(mode)


def get_mode(model: torch.nn.Module) -> str:
    return find_state(model).mode


def available_modes(model: torch.nn.Module) -> tuple[str, ...]:
    return find_state(model).modes


@contextlib.contextmanager
def mode(model: torch.nn.Module, m: str):
    """`with specq.mode(model, "w4a4"): ...` — the previous mode is restored on exit (also on error)."""
    state = find_state(model)
    previous = state.mode
    state.mode = state.check(m)
    try:
        yield model
    finally:
        state.mode = previous
