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
