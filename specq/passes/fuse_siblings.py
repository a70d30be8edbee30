"""Pass — fuse sibling matmuls: linears that read the same input become one linear and a split.

    fuse_sibling_linears(gm, example_inputs=None, allow_copies=True) -> (gm, groups_fused)

Why: a decoder layer multiplies one normalised hidden state by q, k and v (and another by gate and
up). At one token each of those is a small matmul whose fixed costs (a kernel call, its threads'
start-up, for the INT4 ops the rotation of x) weigh as much as its bytes; one matmul over the
concatenated weights pays them once and streams the weights in one pass. On the 2-core CPU
(default model, one token) this took the steps from 7 to 4 weight matmuls per layer
(benchmarks/results/cpu_e2e.md has the measured effect).

Which nodes: calls of `F.linear` (dynamo's `torch._C._nn.linear`, export's `aten.linear`) and of the
specq ops (`linear_mxfp4`, `linear_w4a16`, `linear_w4a4`) with all arguments positional, that share
their input node `x`, their op and every non-tensor argument (group size, activation group,
Hadamard block), and whose weight tensors are graph inputs or attributes (parameters, buffers) of
equal dtype and equal trailing shape. Biases: all present or all absent.

What it builds: `torch.cat` of each weight argument along dim 0 (every format stores the output
channels as rows: bf16 [N, K], INT4 packed [N, K/8] and scales [N, K/g], MXFP4 [N, K/2] and
[N, K/32]), one call of the op, and `torch.split` of the result along the last dim. Every output
element is the same dot product over K as before (same weights, same x, same rotation).

Where a group's tensors already are consecutive row slices of one storage (the runtime re-homes them
so on CUDA: specq.runtime.sibling_storage), the group is read as one `as_strided` view of it: no copy.
Otherwise the concatenation is computed in the graph, which pays only where it is folded into a
constant before running — inductor with freezing (`torch._inductor.config.freezing`), as the CPU step
recipe (specq.runtime.compiled_cpu) compiles. Elsewhere it would copy every weight on every call:
pass `allow_copies=False` there, and only groups with shared storage are fused. The real tensors
come from `example_inputs` (for placeholders, as a dynamo backend receives them) or from `gm`'s
attributes (get_attr).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from specq.passes.find_weight_matmuls import LINEAR_TARGETS

# target -> (positions of the weight tensors, position of the bias, number of positional args)
_LINEAR = ((1,), 2, 3)
_MXFP4 = ((1, 2), 3, 4)
_W4A16 = ((1, 2), 3, 6)
_W4A4 = ((1, 2), 3, 8)


def _layouts() -> dict:
    table = {target: _LINEAR for target in LINEAR_TARGETS}
    specq_ops = getattr(torch.ops, "specq", None)
    for name, layout in (("linear_mxfp4", _MXFP4), ("linear_w4a16", _W4A16), ("linear_w4a4", _W4A4)):
        try:
            packet = getattr(specq_ops, name)
        except (AttributeError, RuntimeError):  # specq ops not registered (specq.kernels not imported)
            continue
        table[packet] = layout
        table[packet.default] = layout
    return table


def _tensor_meta(node):
    """(dtype, shape) of a graph input / attribute node, or None where unknown."""
    if not isinstance(node, fx.Node) or node.op not in ("placeholder", "get_attr"):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    if val is None and node.op == "get_attr":
        val = _attribute(node.graph.owning_module, node.target)
    if not isinstance(val, torch.Tensor):
        return None
    return val.dtype, tuple(val.shape)


def _group_key(node: fx.Node, layout):
    """Nodes with equal keys can be fused; None: this node cannot be."""
    weights, bias_at, nargs = layout
    if node.kwargs or len(node.args) != nargs:
        return None
    args = node.args
    tensor_at = set(weights) | {bias_at}
    metas = []
    for i in weights:
        meta = _tensor_meta(args[i])
        if meta is None or not meta[1]:
            return None
        metas.append((meta[0], meta[1][1:]))
    bias = args[bias_at]
    if bias is not None:
        meta = _tensor_meta(bias)
        if meta is None:
            return None
        metas.append((meta[0], ()))
    scalars = tuple(a for i, a in enumerate(args) if i > 0 and i not in tensor_at)
    if any(isinstance(a, fx.Node) for a in scalars):
        return None
    return (node.target, args[0], scalars, bias is None, tuple(metas))


def fuse_sibling_linears(gm: fx.GraphModule, example_inputs=None, allow_copies: bool = True
                         ) -> tuple[fx.GraphModule, int]:
    """Fuse every group of sibling linears in `gm` (in place); returns (gm, number of groups fused)."""
    layouts = _layouts()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    real = {}
    if example_inputs is not None and len(example_inputs) == len(placeholders):
        real = {n: t for n, t in zip(placeholders, example_inputs) if isinstance(t, torch.Tensor)}
    groups: dict = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in layouts:
            continue
        key = _group_key(node, layouts[node.target])
        if key is not None:
            groups.setdefault(key, []).append(node)
    fused = 0
    for key, nodes in groups.items():
        if len(nodes) < 2:
            continue
        weights, bias_at, _ = layouts[key[0]]
        at = weights + ((bias_at,) if nodes[0].args[bias_at] is not None else ())
        blocks = {i: shared_block([_real_tensor(gm, real, n.args[i]) for n in nodes]) for i in at}
        if not allow_copies and any(b is None for b in blocks.values()):
            continue
        _fuse(gm.graph, nodes, layouts[key[0]], blocks)
        fused += 1
    if fused:
        gm.graph.lint()
        gm.recompile()
    return gm, fused


def _attribute(gm: fx.GraphModule, target: str):
    """The parameter or buffer `target` of gm, or None."""
    try:
        return gm.get_parameter(target)
    except AttributeError:
        try:
            return gm.get_buffer(target)
        except AttributeError:
            return None


def _real_tensor(gm: fx.GraphModule, real: dict, node: fx.Node):
    return real.get(node) if node.op == "placeholder" else _attribute(gm, node.target)


def shared_block(tensors: list) -> tuple | None:
    """(size, stride, storage_offset) of the one tensor that `tensors` are consecutive row slices of,
    or None. Row slices: contiguous, same storage and dtype, each starting where the previous ends."""
    if any(not isinstance(t, torch.Tensor) for t in tensors):
        return None
    first = tensors[0]
    if not all(t.is_contiguous() and t.dtype == first.dtype and t.shape[1:] == first.shape[1:] for t in tensors):
        return None
    try:
        ptr = first.untyped_storage().data_ptr()
        if any(t.untyped_storage().data_ptr() != ptr for t in tensors):
            return None
    except (RuntimeError, NotImplementedError):  # fake or functional tensors without real storage
        return None
    offset = first.storage_offset()
    for t in tensors:
        if t.storage_offset() != offset:
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return (rows, *first.shape[1:]), tuple(first.stride()), first.storage_offset()


def _fuse(graph: fx.Graph, nodes: list[fx.Node], layout, blocks: dict) -> None:
    weights, bias_at, _ = layout
    first = nodes[0]  # graph order: x comes before it
    tensor_at = weights + ((bias_at,) if first.args[bias_at] is not None else ())
    # dynamo (with freezing) places each attribute read just before its first use: move the later
    # siblings' reads up (they have no inputs); graph inputs already come first
    for n in nodes[1:]:
        for i in tensor_at:
            if n.args[i].op == "get_attr":
                first.prepend(n.args[i])
    sizes = [_tensor_meta(n.args[weights[0]])[1][0] for n in nodes]
    with graph.inserting_before(first):
        args = list(first.args)
        for i in tensor_at:
            if blocks.get(i) is not None:  # one storage already: a view of it
                args[i] = graph.call_function(torch.as_strided, (first.args[i], *blocks[i]))
            else:
                args[i] = graph.call_function(torch.cat, ([n.args[i] for n in nodes],), {"dim": 0})
        fused = graph.call_function(first.target, tuple(args))
        parts = graph.call_function(torch.split, (fused, sizes), {"dim": -1})
        outs = [graph.call_function(operator.getitem, (parts, j)) for j in range(len(nodes))]
    reads = [n.args[i] for n in nodes[1:] for i in tensor_at if n.args[i].op == "get_attr"]
    for node, out in zip(nodes, outs):
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    for read in dict.fromkeys(reads):  # attribute reads that only the views' groups used
        if not read.users:
            graph.erase_node(read)
