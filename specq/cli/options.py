"""Option parsing shared by the commands (kept free of torch imports so `--help` stays fast)."""

from __future__ import annotations

import click

ALL_MODES = ("bf16", "mxfp4", "w4a16", "w4a4")


def parse_modes(text: str) -> tuple[str, ...]:
    """'bf16,mxfp4' -> ('bf16', 'mxfp4'); unknown or no modes -> a usage error naming --modes."""
    modes = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in modes if m not in ALL_MODES]
    if bad or not modes:
        raise click.BadParameter(f"unknown mode(s) {bad or text!r}; choose from {','.join(ALL_MODES)}",
                                 param_hint="--modes")
    return modes


QUANTIZED_MODES = ("mxfp4", "w4a16", "w4a4")


def parse_lm_head_modes(text: str | None, modes=None) -> list[str] | None:
    """'--lm-head-modes mxfp4' -> ['mxfp4'] (None when not given); values outside the quantized modes,
    or outside --modes, are a usage error naming the allowed values."""
    if text is None:
        return None
    values = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in values if m not in QUANTIZED_MODES]
    if bad or not values:
        why = " (bf16 always runs the exact float head)" if "bf16" in bad else ""
        raise click.BadParameter(f"invalid value(s) {bad or text!r}{why}; allowed values: {','.join(QUANTIZED_MODES)}",
                                 param_hint="--lm-head-modes")
    if modes is not None:
        absent = [m for m in values if m not in modes]
        if absent:
            raise click.BadParameter(f"{','.join(absent)} is not among --modes {','.join(modes)}",
                                     param_hint="--lm-head-modes")
    return values
