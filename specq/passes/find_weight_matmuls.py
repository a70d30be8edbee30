"""Pass 2 — find weight matmuls: which graph nodes multiply an activation by a model parameter.

Detection is by graph pattern, never by `isinstance`, so unfamiliar architectures work:

| pattern (aten or torch level)                         | weight layout | example              |
|-------------------------------------------------------|---------------|----------------------|
| `linear(x, W, b?)`                                    | W [out, in]   | nn.Linear, fused QKV |
| `addmm(b, x, W)`                                      | W [in, out]   | GPT-2 Conv1D         |
| `addmm(b, x, t(W))`                                   | W [out, in]   | decomposed linear    |
| `matmul/mm(x, W)`                                     | W [in, out]   | custom `x @ self.w`  |
| `matmul/mm(x, t(W))`, `transpose(W, -2, -1)`, `W.T`   | W [out, in]   | custom `x @ self.w.T`|

W must be a 2-D parameter (a `get_attr` node, or a placeholder that maps to a parameter name).
Each match is mapped to its owning module (last entry of `nn_module_stack`) and the attribute name
of the weight inside that module; a weight tied to an embedding (lm_head) is reported with its
aliases. The pass also records whether the matmul is the *whole* forward of its module (only shape
ops besides it), which is what allows swapping the module for a MultiModeLinear in eager mode.

Graph before and after: unchanged (this pass only reads; 0 rewrites). Output for llama::

    WeightMatmul(node='linear', op='aten.linear.default', module='model.layers.0.self_attn.q_proj',
                 param='weight', weight_fqn='model.layers.0.self_attn.q_proj.weight',
                 layout='out_in', in_features=64, out_features=64, bias_fqn=None, ...)
"""

from __future__ import annotations

import logging
import operator
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx

log = logging.getLogger(__name__)

aten = torch.ops.aten

# F.linear as dynamo (torch._C._nn.linear, F.linear) and export (aten.linear) record it; other passes use it too
LINEAR_TARGETS = frozenset({aten.linear.default, torch._C._nn.linear, torch.nn.functional.linear})
_ADDMM = {aten.addmm.default, torch.addmm}
_MATMUL = {aten.matmul.default, aten.mm.default, torch.matmul, torch.mm, operator.matmul}
_TRANSPOSE = {aten.t.default, torch.t, aten.numpy_T.default}
_TRANSPOSE_DIMS = {aten.transpose.int, torch.transpose}
_PERMUTE = {aten.permute.default, torch.permute}

# ops that only reshape/alias or read sizes: allowed besides the matmul in a swappable module
_SHAPE_OPS_NAMES = {
    "view", "reshape", "_unsafe_view", "alias", "contiguous", "size", "sym_size", "sym_numel",
    "getitem", "_assert_tensor_metadata",
}
# transposes are allowed only when they feed the weight operand of the module's matmul
_WEIGHT_TRANSPOSE_NAMES = {"t", "transpose", "permute", "numpy_T"}


@dataclass
class WeightMatmul:
    node: str  # graph node name of the matmul
    op: str  # "linear" | "addmm" | "matmul"
    module: str  # owning module path ("" = root)
    param: str  # attribute name of the weight inside `module` ("weight")
    weight_fqn: str  # the FQN under which the graph reads the weight
    layout: str  # "out_in" (nn.Linear) or "in_out" (Conv1D)
    in_features: int
    out_features: int
    bias_fqn: str | None = None
    bias_param: str | None = None  # attribute name of the bias inside `module`
    aliases: list[str] = field(default_factory=list)  # other FQNs of the same weight tensor
    tied_to_embedding: bool = False
    whole_module: bool = False  # the module's forward is this matmul (+ shape ops, + bias)
    module_type: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _target_name(target) -> str:
    name = getattr(target, "__name__", None) or str(target)
    if hasattr(target, "overloadpacket"):
        name = target.overloadpacket.__name__
    return name.split(".")[-1]


def _module_stack(node: fx.Node) -> list[tuple[str, str]]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, typ in stack.values():
        path = str(path)
        for prefix in ("L['self'].", "L['fn'].", "L['model']."):
            if path.startswith(prefix):
                path = path[len(prefix):]
        if path in ("L['self']", "L['fn']", "L['model']"):
            path = ""
        tname = typ if isinstance(typ, str) else f"{typ.__module__}.{typ.__qualname__}"
        out.append((path, tname))
    return out


class _Resolver:
    """Resolves graph nodes to parameter FQNs (get_attr targets or named placeholders)."""

    def __init__(self, gm: fx.GraphModule, param_names: dict[str, str] | None, shapes: dict | None):
        self.gm = gm
        self.param_names = dict(param_names or {})
        self.shapes = dict(shapes or {})

    def param(self, node) -> str | None:
        if not isinstance(node, fx.Node):
            return None
        if node.op == "get_attr":
            target = str(node.target)
            try:
                value = self.gm.get_submodule("").get_parameter(target)
            except AttributeError:
                value = None
            if value is None:  # buffers are not weights
                return None
            self.shapes.setdefault(target, tuple(value.shape))
            return target
        if node.op == "placeholder":
            return self.param_names.get(node.name)
        return None

    def shape(self, fqn: str, node) -> tuple[int, ...] | None:
        if fqn in self.shapes:
            return tuple(self.shapes[fqn])
        meta = node.meta if isinstance(node, fx.Node) else {}
        val = meta.get("val", meta.get("example_value"))
        return tuple(val.shape) if isinstance(val, torch.Tensor) else None

    def transposed_param(self, node) -> str | None:
        """FQN if `node` is the 2-D transpose of a parameter (t(W), W.T, transpose(W,0,1), permute(W,[1,0]))."""
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return None
        src = node.args[0] if node.args else None
        fqn = self.param(src)
        if fqn is None:
            return None
        if node.target in _TRANSPOSE:
            return fqn
        if node.target in _TRANSPOSE_DIMS and len(node.args) >= 3:
            if sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1]:
                return fqn
        if node.target in _PERMUTE and len(node.args) >= 2 and list(node.args[1]) in ([1, 0], [-1, -2]):
            return fqn
        return None


def _weight_node(node: fx.Node):
    """The node that carries the weight tensor (through one transpose, if any)."""
    w = node.args[2] if "addmm" in str(node.target) else node.args[1]
    if w is None:
        w = node.kwargs.get("weight")
    if isinstance(w, fx.Node) and w.op == "call_function" and w.args:
        return w.args[0]
    return w


def _relative(fqn: str, module: str, aliases: list[str]) -> tuple[str, str | None]:
    """(module path, attribute) for a weight FQN read inside `module` (checks tied aliases)."""
    for name in [fqn] + list(aliases):
        if module and name.startswith(module + ".") and "." not in name[len(module) + 1:]:
            return module, name[len(module) + 1:]
        if not module and "." not in name:
            return module, name
    return module, None


def find_weight_matmuls(gm: fx.GraphModule, param_names: dict[str, str] | None = None,
                        aliases: dict[str, list[str]] | None = None,
                        shapes: dict[str, tuple[int, ...]] | None = None) -> list[WeightMatmul]:
    """Every node of `gm` that multiplies an activation by a 2-D parameter, in graph order."""
    aliases = aliases or {}
    res = _Resolver(gm, param_names, shapes)
    embedding_weights: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and _target_name(node.target) == "embedding":
            w = res.param(node.args[0] if node.args else node.kwargs.get("weight"))
            if w is not None:
                embedding_weights.update(aliases.get(w, [w]))

    found: list[WeightMatmul] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        t = node.target
        weight = bias = None
        layout = None
        if t in LINEAR_TARGETS:
            args = list(node.args) + [None] * 3
            weight = res.param(args[1] if args[1] is not None else node.kwargs.get("weight"))
            bias_node = args[2] if args[2] is not None else node.kwargs.get("bias")
            layout, op = "out_in", "linear"
        elif t in _ADDMM:
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                continue
            bias_node = node.args[0]
            weight = res.param(node.args[2])
            layout, op = "in_out", "addmm"
            if weight is None:
                weight = res.transposed_param(node.args[2])
                layout = "out_in"
        elif t in _MATMUL:
            bias_node = None
            weight = res.param(node.args[1])
            layout, op = "in_out", "matmul"
            if weight is None:
                weight = res.transposed_param(node.args[1])
                layout = "out_in"
        else:
            continue
        if weight is None:
            continue
        shape = res.shape(weight, _weight_node(node))
        if shape is None or len(shape) != 2:
            continue
        bias = res.param(bias_node) if isinstance(bias_node, fx.Node) else None
        if isinstance(bias_node, fx.Node) and bias is None:
            continue  # a non-parameter additive term: not a plain weight matmul
        out_f, in_f = shape if layout == "out_in" else (shape[1], shape[0])
        stack = _module_stack(node)
        module, mtype = stack[-1] if stack else ("", "")
        al = [a for a in aliases.get(weight, [weight]) if a != weight]
        module, attr = _relative(weight, module, al)
        bias_attr = None
        if bias is not None:
            _, bias_attr = _relative(bias, module, [a for a in aliases.get(bias, [bias]) if a != bias])
        found.append(WeightMatmul(
            node=node.name, op=op, module=module, param=attr or "", weight_fqn=weight, layout=layout,
            in_features=int(in_f), out_features=int(out_f), bias_fqn=bias, bias_param=bias_attr,
            aliases=al, tied_to_embedding=bool(set([weight] + al) & embedding_weights),
            module_type=mtype))

    _mark_whole_module(gm, found)
    log.info("find_weight_matmuls: %d weight matmuls found (0 rewrites)", len(found))
    return found


def _mark_whole_module(gm: fx.GraphModule, found: list[WeightMatmul]) -> None:
    """A module is swappable when its forward is one weight matmul (per call) plus shape ops.

    The weight must be an attribute of the module itself (`param` resolved), the module must not be
    the root, and every other op executed inside it must be a shape/alias op (or the bias add).
    """
    by_module: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        stack = _module_stack(node)
        if stack:
            by_module.setdefault(stack[-1][0], []).append(node)
        # nodes of a child module also belong to the parent: a parent with children is not swappable
        for path, _ in stack[:-1]:
            by_module.setdefault(path, []).append(None)
    names = {}
    for m in found:
        names.setdefault(m.module, []).append(m)
    for module, matmuls in names.items():
        nodes = by_module.get(module, [])
        ok = bool(module) and all(m.param for m in matmuls) and None not in nodes
        ok = ok and len({m.weight_fqn for m in matmuls}) == 1
        mm_nodes = {m.node for m in matmuls}
        for n in nodes:
            if n is None or n.name in mm_nodes:
                continue
            name = _target_name(n.target)
            if name in _WEIGHT_TRANSPOSE_NAMES and all(u.name in mm_nodes for u in n.users):
                continue
            if name not in _SHAPE_OPS_NAMES:
                ok = False
                break
        for m in matmuls:
            m.whole_module = ok
