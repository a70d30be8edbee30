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

SwiGLU: a routed linear whose input is ``silu(a) * b`` (either order; a and b of one shape and
dtype) becomes `linear_dense_glu(a, b, weight, bias)`: the GEMV computes the activation in its x
loads, so the down projection of a llama-style MLP is one kernel instead of an activation kernel
and a GEMV. Its input is silu(a) * b in fp32 rounded once, as inductor's fused kernel computes it.
SPECQ_DENSE_GLU=0 (read per call) routes such linears to the plain dense op (for A/B measurements).
"""

from __future__ import annotations

import math
import operator
import os

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


_SILU = (torch.nn.functional.silu, torch.ops.aten.silu.default)
_MUL = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)


def _silu_arg(node) -> fx.Node | None:
    """a where node is silu(a) (not in place), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _SILU:
        return None
    if len(node.args) != 1 or node.kwargs.get("inplace", False) or set(node.kwargs) - {"inplace"}:
        return None
    return node.args[0]


def _swiglu_operands(x) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) where x is silu(a) * b or b * silu(a) with a and b of one shape and dtype, else None."""
    if not isinstance(x, fx.Node) or x.op != "call_function" or x.target not in _MUL or x.kwargs:
        return None
    if len(x.args) != 2:
        return None
    for s, other in (x.args, x.args[::-1]):
        a = _silu_arg(s)
        ea, eb = _example(a), _example(other)
        if a is not None and ea is not None and eb is not None and ea.shape == eb.shape and ea.dtype == eb.dtype:
            return a, other
    return None


def route_small_linears(gm: fx.GraphModule, max_rows: int = 4) -> tuple[fx.GraphModule, int]:
    """Rewrite F.linear calls with <= max_rows rows of bf16/fp16 x to torch.ops.specq.linear_dense
    (linear_dense_glu where x is SwiGLU's silu(a) * b)."""
    op = torch.ops.specq.linear_dense.default
    glu_op = torch.ops.specq.linear_dense_glu.default
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
        glu = _swiglu_operands(x) if os.environ.get("SPECQ_DENSE_GLU", "1") != "0" else None
        node.target = op if glu is None else glu_op
        node.args = (x, weight, bias) if glu is None else (*glu, weight, bias)
        node.kwargs = {}
        routed += 1
        if glu is not None and not x.users:  # the mul (and its silu) only fed this linear
            silu = next(s for s in x.args if _silu_arg(s) is not None)
            gm.graph.erase_node(x)
            if not silu.users:
                gm.graph.erase_node(silu)
    if routed:
        gm.graph.lint()
        gm.recompile()
    return gm, routed
