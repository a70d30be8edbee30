"""Pass 4 — rewrite: replace planned weight-matmul nodes with specq op calls for one mode.

    rewrite_weight_matmuls(gm, plan, packed, mode, param_names=None) -> (gm, count)

`gm` is a graph of the *untransformed* model (the unlifted torch.export graph from `capture`, or a
dynamo graph whose parameters are placeholders: pass `param_names`). `plan` is `model.specq_plan`;
`packed` maps a module path to its packed tensors (`specq.transform.transform.packed_tensors` of a
transformed copy, or tensors loaded from a checkpoint). The packed tensors are registered on `gm` as
buffers (`specq_packed_<n>_<name>`) and read with `get_attr`, so the graph stays self-contained and
inductor sees them as constants. bf16 mode rewrites nothing (the graph already is bf16 mode).

Graph before (llama q_proj, export graph)::

    %w      = get_attr[target=model.layers.0.self_attn.q_proj.weight]
    %linear = call_function[target=aten.linear.default](args = (%mul_3, %w))

after, mode="w4a4"::

    %p      = get_attr[target=specq_packed_0_int4_packed]
    %s      = get_attr[target=specq_packed_0_int4_scales]
    %linear = call_function[target=specq.linear_w4a4.default](args = (%mul_3, %p, %s, None, 64, 32, 64, 0))

GPT-2's `addmm(b, x2d, W[in,out])` becomes `linear_<mode>(x2d, packed, scales, b, ...)` (the packed
weight is always [out, in]); `matmul(x, W)` / `matmul(x, W.T)` become the op with bias None.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from specq.passes.find_weight_matmuls import find_weight_matmuls
from specq.passes.plan import MODES, entry_modes

log = logging.getLogger(__name__)

_TENSORS = {"mxfp4": ("mxfp4_packed", "mxfp4_scales"), "w4a16": ("int4_packed", "int4_scales"),
            "w4a4": ("int4_packed", "int4_scales")}


def _op(mode: str):
    import specq.kernels.ops  # noqa: F401  (registers torch.ops.specq.*)

    return {"mxfp4": torch.ops.specq.linear_mxfp4.default, "w4a16": torch.ops.specq.linear_w4a16.default,
            "w4a4": torch.ops.specq.linear_w4a4.default}[mode]


def rewrite_weight_matmuls(gm: fx.GraphModule, plan: dict, packed: dict[str, dict[str, torch.Tensor]], mode: str,
                           param_names: dict[str, str] | None = None,
                           aliases: dict[str, list[str]] | None = None) -> tuple[fx.GraphModule, int]:
    """Replace every weight matmul that `plan` quantizes in `mode` with `torch.ops.specq.linear_<mode>`.

    Returns (gm, number of rewritten nodes). Raises if a planned matmul is missing from the graph or
    its packed tensors are missing from `packed` (never a silent half-conversion).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; specq modes are {MODES}")
    if mode not in plan.get("modes", ()):
        raise ValueError(f"mode {mode!r} is not in the plan's modes {plan.get('modes')}")
    if mode == "bf16":
        log.info("rewrite_weight_matmuls: mode bf16, 0 rewrites")
        return gm, 0
    # a matmul quantized only in some modes (the head under lm_head_modes) stays float in the others
    entries = {(e["module"], e["param"]): e for e in plan["matmuls"] if mode in entry_modes(e, plan["modes"])}
    found = find_weight_matmuls(gm, param_names=param_names, aliases=aliases)
    nodes = {n.name: n for n in gm.graph.nodes}
    op = _op(mode)
    done: set[tuple[str, str]] = set()
    count = 0
    for i, m in enumerate(found):
        e = entries.get((m.module, m.param))
        if e is None:
            continue
        tensors = packed.get(e["module"])
        names = _TENSORS[mode]
        if tensors is None or any(n not in tensors for n in names):
            raise ValueError(f"rewrite_weight_matmuls: no {'/'.join(names)} for module {e['module']!r} in `packed` "
                             f"(was the model transformed with mode {mode!r}?)")
        node = nodes[m.node]
        if node.target in (torch.ops.aten.linear.default, torch._C._nn.linear, torch.nn.functional.linear):
            x = node.args[0]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        elif "addmm" in str(node.target):
            x, bias = node.args[1], node.args[0]
        else:
            x, bias = node.args[0], None
        prefix = f"specq_packed_{i}"
        with gm.graph.inserting_before(node):
            attrs = []
            for name in names:
                target = f"{prefix}_{name}"
                if not hasattr(gm, target):
                    gm.register_buffer(target, tensors[name], persistent=False)
                attrs.append(gm.graph.get_attr(target))
            if mode == "mxfp4":
                args = (x, *attrs, bias)
            elif mode == "w4a16":
                args = (x, *attrs, bias, int(e["int4_group_size"]), int(e["had_block"] or 0))
            else:
                args = (x, *attrs, bias, int(e["int4_group_size"]), int(e["act_group_size"] or 0),
                        int(e["had_block"] or 0), int(e.get("w4a4_scale_levels") or 0))
            new = gm.graph.call_function(op, args)
        new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "val", "example_value",
                                                                        "stack_trace", "source_fn_stack")})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        done.add((m.module, m.param))
        count += 1
    missing = sorted(set(entries) - done)
    if missing:
        raise ValueError(f"rewrite_weight_matmuls: planned matmuls not found in the graph: "
                         f"{[f'{a}.{b}' for a, b in missing][:5]} (graph of a different model?)")
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    log.info("rewrite_weight_matmuls: %d matmul nodes -> specq.linear_%s", count, mode)
    return gm, count
