"""One storage per sibling group: q/k/v (and gate/up) weights re-homed into one tensor, same values.

Why: `specq.passes.fuse_siblings` turns linears that read the same input into one matmul over the
concatenated weights. On the CPU the concatenation is folded into a constant (inductor freezing); on
CUDA nothing folds it, and a copy of every weight per step would cost more than the fusion saves.
So on CUDA the weights are concatenated once, in the model: each sibling's tensors become row slices
of one tensor per attribute (bf16 weight, bias, the MXFP4 and INT4 packed tensors and scales), and
the pass reads the group as one `as_strided` view of that storage — no copy, no extra memory. At one
token this replaces cuBLAS GEMVs of [1024, 4096] (k, v: ~50% of copy bandwidth on the H100) by one
[6144, 4096] GEMV, and three 4-bit GEMV launches by one.

Siblings are found by one eager forward on a single token: `nn.Linear` / `MultiModeLinear` modules
whose forward receives the very same input tensor, and whose settings (sizes, dtypes, group sizes,
rotation, bias presence) agree. Weights shared with other modules (tied) are left alone.

The values and the module objects stay as they were; only where the tensors live changes. Anything
that keeps references to the old tensors (an optimiser, a DequantCache entry) sees the old copies.
"""

from __future__ import annotations

import torch
from torch import nn

from specq.passes.fuse_siblings import shared_block

TENSOR_NAMES = ("weight", "bias", "mxfp4_packed", "mxfp4_scales", "int4_packed", "int4_scales")


def _is_linear(module: nn.Module) -> bool:
    from specq.transform.multimode_linear import MultiModeLinear

    if isinstance(module, MultiModeLinear):
        return module.layout == "out_in"
    return type(module) is nn.Linear


def _settings(module: nn.Module) -> tuple:
    tensors = tuple((name, t.dtype, tuple(t.shape[1:]), t.device) for name in TENSOR_NAMES
                    if isinstance(t := getattr(module, name, None), torch.Tensor))
    return (type(module), module.in_features, getattr(module, "int4_group_size", None),
            getattr(module, "act_group_size", None), getattr(module, "had_block", None),
            getattr(module, "w4a4_scale_levels", None),
            getattr(module, "bias", None) is None, tensors)


def sibling_groups(model: nn.Module, input_ids: torch.Tensor) -> list[list[str]]:
    """Module paths of the sibling groups (two or more linears fed the same tensor, equal settings),
    found by one eager forward of `input_ids` in the model's active mode."""
    seen: list[tuple[str, torch.Tensor, tuple]] = []  # the inputs are kept alive: ids stay unique
    hooks = []
    for name, module in model.named_modules():
        if _is_linear(module):
            def record(mod, args, name=name):
                seen.append((name, args[0], _settings(mod)))
            hooks.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for h in hooks:
            h.remove()
    groups: dict[tuple, list[str]] = {}
    for name, x, settings in seen:
        members = groups.setdefault((id(x), settings), [])
        if name not in members:
            members.append(name)
    return [g for g in groups.values() if len(g) > 1]


def _shared_elsewhere(model: nn.Module) -> set[int]:
    """ids of tensors that more than one module attribute holds (tied weights)."""
    count: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            if t is not None:
                count[id(t)] = count.get(id(t), 0) + 1
    return {i for i, c in count.items() if c > 1}


def share_sibling_storage(model: nn.Module, groups: list[list[str]]) -> int:
    """Re-home each group's tensors into one tensor per attribute (row slices, in group order).
    Returns the number of groups re-homed (groups with a tied tensor are skipped)."""
    tied = _shared_elsewhere(model)
    done = 0
    for group in groups:
        modules = [model.get_submodule(p) for p in group]
        names = [n for n in TENSOR_NAMES if isinstance(getattr(modules[0], n, None), torch.Tensor)]
        tensors = {n: [getattr(m, n) for m in modules] for n in names}
        if any(id(t) in tied for ts in tensors.values() for t in ts):
            continue
        if all(shared_block(ts) is not None for ts in tensors.values()):  # re-homed before
            done += 1
            continue
        for n, ts in tensors.items():
            fused = torch.cat([t.detach() for t in ts], dim=0)
            start = 0
            for m, t in zip(modules, ts):
                view = fused[start:start + t.shape[0]]
                start += t.shape[0]
                if n in m._parameters:
                    m._parameters[n].data = view
                else:
                    m._buffers[n] = view
        done += 1
    return done
