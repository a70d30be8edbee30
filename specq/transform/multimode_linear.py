"""MultiModeLinear: one weight matmul that runs as bf16, mxfp4, w4a16 or w4a4, chosen per forward.

It holds only what its modes need:

| attribute                      | dtype / shape                        | modes          |
|--------------------------------|--------------------------------------|----------------|
| `weight` (the model's own Parameter object) | model dtype, [out, in] (or Conv1D [in, out]) | bf16 |
| `mxfp4_packed`, `mxfp4_scales` | uint8 [out, in/2], uint8 [out, in/32] | mxfp4         |
| `int4_packed`, `int4_scales`   | int32 [out, in/8], model dtype [out, in/group] | w4a16 AND w4a4 (one copy) |
| `bias` (the model's own Parameter or None) | model dtype [out]      | all            |

A module may be quantized in only some of the model's modes (`quant_modes`, e.g. the output head under
the recipe key `lm_head_modes`): in every other mode it runs `F.linear` with its float `weight`, exactly
as in bf16 mode, and it holds that weight whenever such a mode exists.

The INT4 copy is quantized from the rotated weight `W @ H` (H block-diagonal Hadamard with blocks of
`had_block` along K, or no rotation when had_block == 0); both INT4 ops rotate `x` the same way, so
`(x @ H) @ (W @ H).T == x @ W.T`. The active mode is read from a `ModeState` shared by every
MultiModeLinear of the model (see modes.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specq.transform.modes import ModeState

_OPS_LOADED = False


def _ensure_ops() -> None:
    """Import specq.kernels.ops once: it registers torch.ops.specq.* (reference + triton + fake)."""
    global _OPS_LOADED
    if not _OPS_LOADED:
        import specq.kernels.ops  # noqa: F401

        _OPS_LOADED = True


class MultiModeLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, state: ModeState, *, weight=None, bias=None,
                 layout: str = "out_in", int4_group_size: int | None = None, act_group_size: int | None = None,
                 had_block: int | None = None, dtype: torch.dtype = torch.float32, device=None,
                 quant_modes=None, w4a4_scale_levels: int | None = None):
        super().__init__()
        if layout not in ("out_in", "in_out"):
            raise ValueError(f"layout must be 'out_in' (nn.Linear) or 'in_out' (Conv1D), got {layout!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.layout = layout
        self.int4_group_size = int(int4_group_size or 0)
        self.act_group_size = int(act_group_size or 0)
        self.had_block = int(had_block or 0)
        # W4A4's group scales snapped to integer multiples 0..L of a per-row unit (0: as stored; see int4.snap_scales)
        self.w4a4_scale_levels = int(w4a4_scale_levels or 0)
        self.dtype = dtype
        # a plain attribute, not a submodule: shared by all MultiModeLinears of the model
        self.__dict__["_mode_state"] = state
        all_modes = state.modes
        if quant_modes is None:  # quantized in every mode but bf16
            quant_modes = tuple(m for m in all_modes if m != "bf16")
        bad = [m for m in quant_modes if m == "bf16" or m not in all_modes]
        if bad:
            raise ValueError(f"quant_modes {tuple(quant_modes)} must be quantized modes among the model's modes "
                             f"{all_modes}")
        self.quant_modes = tuple(m for m in all_modes if m in quant_modes)
        # modes that run F.linear with the float weight: bf16, and any mode this module is not quantized in
        self.float_modes = tuple(m for m in all_modes if m not in self.quant_modes)
        modes = self.quant_modes
        if self.float_modes:
            if weight is None:
                raise ValueError(f"mode(s) {self.float_modes} need the model's own weight")
            self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        else:
            self.bias = None
        n, k = self.out_features, self.in_features
        if "mxfp4" in modes:
            self.register_buffer("mxfp4_packed", torch.empty(n, k // 2, dtype=torch.uint8, device=device))
            self.register_buffer("mxfp4_scales", torch.empty(n, k // 32, dtype=torch.uint8, device=device))
        if "w4a16" in modes or "w4a4" in modes:
            if not self.int4_group_size:
                raise ValueError("INT4 modes need int4_group_size")
            self.register_buffer("int4_packed", torch.empty(n, k // 8, dtype=torch.int32, device=device))
            self.register_buffer("int4_scales", torch.empty(n, k // self.int4_group_size, dtype=dtype, device=device))
        if modes:
            _ensure_ops()

    @property
    def mode_state(self) -> ModeState:
        return self.__dict__["_mode_state"]

    @property
    def modes(self) -> tuple[str, ...]:
        return self.mode_state.modes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.__dict__["_mode_state"].mode
        if mode in self.float_modes:  # bf16, and the modes this module is not quantized in
            if self.layout == "out_in":
                return F.linear(x, self.weight, self.bias)
            # exactly what transformers' Conv1D does, so bf16 mode stays bit-identical
            size_out = x.size()[:-1] + (self.out_features,)
            if self.bias is None:
                return torch.mm(x.view(-1, x.size(-1)), self.weight).view(size_out)
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)
        if mode == "mxfp4":
            return torch.ops.specq.linear_mxfp4(x, self.mxfp4_packed, self.mxfp4_scales, self.bias)
        if mode == "w4a16":
            return torch.ops.specq.linear_w4a16(x, self.int4_packed, self.int4_scales, self.bias,
                                                self.int4_group_size, self.had_block)
        if mode == "w4a4":
            return torch.ops.specq.linear_w4a4(x, self.int4_packed, self.int4_scales, self.bias,
                                               self.int4_group_size, self.act_group_size, self.had_block,
                                               self.w4a4_scale_levels)
        raise ValueError(f"MultiModeLinear: unknown mode {mode!r}")

    def weight_bytes(self, mode: str) -> int:
        """Bytes of weight (and bias) tensors that one forward in `mode` reads."""
        if mode in self.float_modes:
            ts = [self.weight]
        elif mode == "mxfp4":
            ts = [self.mxfp4_packed, self.mxfp4_scales]
        elif mode in ("w4a16", "w4a4"):
            ts = [self.int4_packed, self.int4_scales]
        else:
            raise ValueError(f"unknown mode {mode!r}")
        if self.bias is not None:
            ts.append(self.bias)
        return sum(t.numel() * t.element_size() for t in ts)

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
             f"modes={self.modes}")
        if any(m != "bf16" for m in self.float_modes):  # float in a quantized mode too
            s += f", quant_modes={self.quant_modes}"
        if self.layout != "out_in":
            s += f", layout={self.layout}"
        if self.int4_group_size:
            s += f", int4_group_size={self.int4_group_size}, act_group_size={self.act_group_size}, had_block={self.had_block}"
            if self.w4a4_scale_levels:
                s += f", w4a4_scale_levels={self.w4a4_scale_levels}"
        return s
