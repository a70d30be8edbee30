"""Pass — route dense linears at a few rows of x to specq's GEMV op.

    route_small_linears(gm, max_rows=4) -> (gm, routed)

Why: inductor lowers a dense `F.linear` to cuBLAS, whose GEMVs at one token stream some decode shapes
well below the copy bandwidth (benchmarks/results/profile_step_8b_h100.md). `torch.ops.specq.
linear_dense` is F.linear by definition and, on CUDA, a weight-streaming Triton GEMV where that is
faster for the shape (it times both once per shape, so a shape where cuBLAS wins keeps cuBLAS). As
a custom op it is opaque to inductor, which would otherwise turn it back into its own matmul.

Which nodes: calls of F.linear (dynamo's `torch._C._nn.linear`, `F.linear`, export's `aten.linear`)
whose input's example value (node.meta, as dynamo records it) has at most `max_rows` rows
(the product of its leading dims) and a bf16/fp16 dtype. Nodes without an example value are left
alone. The rewritten call is `linear_dense(x, weight, bias_or_None)`: same numbers wherever the op
falls back, the GEMV's own fp32-accumulated rounding where it runs.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from specq.kernels import ops as _ops  # noqa: F401  (registers torch.ops.specq.linear_dense)
from specq.passes.find_weight_matmuls import LINEAR_TARGETS

_DTYPES = (torch.bfloat16, torch.float16)


def _example(node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    return val if isinstance(val, torch.Tensor) else None


def _rows(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1]) if x.dim() > 1 else 1


def route_small_linears(gm: fx.GraphModule, max_rows: int = 4) -> tuple[fx.GraphModule, int]:
    """Rewrite F.linear calls with <= max_rows rows of bf16/fp16 x to torch.ops.specq.linear_dense."""
    op = torch.ops.specq.linear_dense.default
    routed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        args = list(node.args) + [None] * (3 - len(node.args))
        x, weight, bias = args[0], args[1], node.kwargs.get("bias", args[2])
        if set(node.kwargs) - {"bias"} or len(node.args) > 3:
            continue
        ex = _example(x)
        if ex is None or ex.dtype not in _DTYPES or _rows(ex) > max_rows:
            continue
        node.target = op
        node.args = (x, weight, bias)
        node.kwargs = {}
        routed += 1
    if routed:
        gm.graph.lint()
        gm.recompile()
    return gm, routed
