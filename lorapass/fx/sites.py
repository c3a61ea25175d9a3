"""Find every linear layer and embedding (site) of an fx graph and name it by its torch module path.

A site is a call of ``aten.linear`` / ``aten.addmm`` / ``aten.mm`` / ``aten.matmul`` / ``aten.bmm`` whose weight
operand is a 2-D parameter (or buffer) of the model, possibly through ``t``/``permute``/``transpose``, aliases,
or the expand + view a decomposed matmul broadcasts it with (``run_decompositions`` output); or, in a
``torch.fx.symbolic_trace`` graph, a ``call_module`` of an ``nn.Linear`` / transformers ``Conv1D`` leaf.
A LoRA branch's own ``<path>.lora_A``/``lora_B`` never makes a site. The layout is the stored parameter's:
``out_in`` for ``aten.linear`` and for ``mm`` of a transposed weight, ``in_out`` for ``addmm``/``mm``/``matmul``
of the weight itself (GPT-2 Conv1D). An ``aten.embedding`` of a 2-D parameter inside an ``nn.Embedding`` is an
embedding site (its table [rows, dim] in torch's layout, the ids as input).

The path comes from, in order: the ``nn_module_stack`` node metadata torch.export records (innermost
module; symbolic_trace records none for ops of the root's own forward, which are then no site), the
``call_module`` target, or the parameter's own name (``<path>.weight``) when the graph has no module stacks
at all. An op whose module is known but is not an ``nn.Linear``/``Conv1D`` (a raw ``x @ self.w`` in
some block's forward) is not a site: PEFT cannot give that module LoRA; it is listed in ``unresolved``.
Paths are made relative to the model PEFT sees by stripping a wrapper prefix, chosen as the ONNX frontend
chooses it.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Collection

import torch
from torch.fx import Node

from lorapass.fx.program import PASS_WEIGHT, Program, aten
from lorapass.onnx.sites import SiteReport, guess_prefix, strip_prefix
from lorapass.site import Site

LINEAR_OPS = {aten.linear.default: "aten.linear", aten.addmm.default: "aten.addmm", aten.mm.default: "aten.mm",
              aten.matmul.default: "aten.matmul", aten.bmm.default: "aten.bmm", torch.nn.functional.linear: "F.linear",
              torch.matmul: "torch.matmul", torch.addmm: "torch.addmm", torch.mm: "torch.mm",
              operator.matmul: "operator.matmul"}
ADDMM = (aten.addmm.default, torch.addmm)
_TO_OUTPUT = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default,
              aten.detach.default, aten.contiguous.default, aten.clone.default, aten.to.dtype,
              aten.to.dtype_layout, aten._to_copy.default, aten.squeeze.dim, aten.unsqueeze.default,
              aten.flatten.using_ints, operator.getitem}
_TO_OUTPUT_METHODS = {"view", "reshape", "contiguous", "to", "float", "half", "bfloat16", "squeeze", "unsqueeze",
                      "flatten", "clone", "detach"}
_DTYPES = {torch.float32: "float", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "double"}
_LINEAR_CLASSES = ("torch.nn.modules.linear.Linear", "transformers.pytorch_utils.Conv1D")
SOURCE_STACK, SOURCE_MODULE, SOURCE_PARAMETER = "nn_module_stack", "call_module", "parameter"
LORA_STATE = (".lora_A", ".lora_B")


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype in the Site vocabulary (the ONNX element type's name: float, float16, bfloat16, ...)."""
    return _DTYPES.get(dtype, str(dtype).removeprefix("torch."))


class WeightView:
    """What an fx site sees of its weight (the storage-view verbs kinds read: ``shape``, ``dtype``, ``read()`` in
    float32 and torch's layout); ``store`` is the tensor itself, so tied weights share it. fx merge edits state."""

    def __init__(self, tensor: torch.Tensor, layout: str) -> None:
        self.store, self.layout = tensor, layout

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.store.shape)
        return shape[::-1] if self.layout == "in_out" else shape

    @property
    def dtype(self) -> str:
        return dtype_name(self.store.dtype)

    def read(self):
        w = self.store.detach().to(torch.float32).cpu()
        return (w.T if self.layout == "in_out" else w).contiguous().numpy()


def _class_name(cls: object) -> str:
    if isinstance(cls, str):
        return cls
    return f"{getattr(cls, '__module__', '')}.{getattr(cls, '__qualname__', getattr(cls, '__name__', cls))}"


def _class(cls: object) -> type | None:
    """The class object, from the object itself or its dotted name among the modules already imported."""
    if isinstance(cls, type):
        return cls
    parts = str(cls).split(".")
    for i in range(len(parts) - 1, 0, -1):
        value = sys.modules.get(".".join(parts[:i]))
        if value is None:
            continue
        for part in parts[i:]:
            value = getattr(value, part, None)
        return value if isinstance(value, type) else None
    return None


def is_linear_module(cls: object) -> bool | None:
    """Whether a module class is one PEFT gives LoRA to (nn.Linear or transformers Conv1D, or a subclass);
    None when the class cannot be resolved (then the site is kept)."""
    klass = _class(cls)
    if klass is None:
        return None
    return any(_class_name(c) in _LINEAR_CLASSES for c in klass.__mro__)


def _stack(node: Node) -> list[tuple[str, object]]:
    """(module path, class) from outermost to innermost, as torch.export / fx recorded them."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        if isinstance(value, tuple) and len(value) == 2:
            path, cls = value
            out.append((str(path).split("@")[0], cls))
    return out


def _rank(node: object) -> int | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _flips(node: Node) -> int | None:
    """1 if ``node`` swaps the last two dims of its input, 0 if it keeps the matrix as it is, None otherwise."""
    source, target = node.args[0], node.target
    rank = _rank(source) or 2
    if target in (aten.t.default, aten.numpy_T.default):
        return 1 if rank == 2 else None
    if target == aten.permute.default:
        dims = [d % rank for d in node.args[1]]
        if dims[:-2] != list(range(rank - 2)):
            return None
        return {(rank - 2, rank - 1): 0, (rank - 1, rank - 2): 1}.get(tuple(dims[-2:]))
    if target == aten.transpose.int:
        pair = {node.args[1] % rank, node.args[2] % rank}
        return 0 if len(pair) == 1 else 1 if pair == {rank - 2, rank - 1} else None
    if target in (aten.alias.default, aten.detach.default):
        return 0
    # expand / view / reshape: only leading (batch) dims may change, the matrix stays as it is
    before, after = node.args[0].meta.get("val") if isinstance(node.args[0], Node) else None, node.meta.get("val")
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor) or after.dim() < 2:
        return None
    return 0 if tuple(before.shape[-2:]) == tuple(after.shape[-2:]) else None


def _unwrap_weight(program: Program, node: object) -> tuple[str, bool] | None:
    """(state key, transposed) of the 2-D weight behind ``node``, seeing through transposes, aliases and the
    broadcast (expand + view) of a decomposed matmul."""
    flips = 0
    while isinstance(node, Node) and node.op == "call_function" and node.target in PASS_WEIGHT:
        step = _flips(node)
        if step is None:
            return None
        flips += step
        node = node.args[0]
    target = program.target(node)
    if target is None or target.endswith(LORA_STATE) or program.tensor(target).dim() != 2:
        return None  # not state, or a LoRA branch's own A/B (a program rewritten before)
    return target, flips % 2 == 1


def _module_of_weight(target: str) -> str | None:
    return target.rsplit(".", 1)[0] if target.endswith(".weight") and "." in target else None


class _Found:
    def __init__(self, node: Node, x: Node, weight: str, layout: str, bias: str | None, path: str | None, source: str,
                 cls: str | None, op: str, tensor: torch.Tensor, kind: str = "linear") -> None:
        self.node, self.x, self.weight, self.layout, self.bias = node, x, weight, layout, bias
        self.path, self.source, self.cls, self.op, self.tensor, self.kind = path, source, cls, op, tensor, kind

    @property
    def layer_class(self) -> bool | None:
        """Whether the module is one PEFT adapts as this kind of site (None: the class cannot be resolved)."""
        if self.kind == "norm":  # only replaced by name (modules_to_save, bias="all"), whatever its class
            return True
        if self.kind == "embedding":
            klass = _class(self.cls)
            return None if klass is None else issubclass(klass, torch.nn.Embedding)
        return is_linear_module(self.cls)


def _module_path(node: Node, stacks: bool, target: str) -> tuple[str | None, str, object]:
    """(path, source, class) of the module whose forward runs ``node``."""
    stack = _stack(node)
    if stack:  # the module whose forward runs the op: PEFT's LoRA wraps exactly that call
        return stack[-1][0] or None, SOURCE_STACK, stack[-1][1]
    if stacks:  # the tracer records module stacks and this op has none: it runs in the root's forward
        return None, "", None
    return _module_of_weight(target), SOURCE_PARAMETER, None


def _as_embedding(program: Program, node: Node, stacks: bool) -> _Found | None:
    """``aten.embedding(table, ids, ...)`` of a 2-D parameter: an embedding site (table [rows, dim], torch layout)."""
    table, ids = node.args[0], node.args[1]
    target = program.target(table)
    if target is None or target.endswith(LORA_STATE) or program.tensor(target).dim() != 2 or not isinstance(ids, Node):
        return None
    path, source, cls = _module_path(node, stacks, target)
    return _Found(node, ids, target, "out_in", None, path, source, cls, "aten.embedding", program.tensor(target),
                  "embedding")


def _as_norm(program: Program, node: Node, stacks: bool) -> _Found | None:
    """``aten.layer_norm(x, shape, weight, bias, ...)`` of a 1-D weight parameter: a norm site (see
    :mod:`lorapass.onnx.patterns.norm`)."""
    args = list(node.args) + [None] * 4
    x, target = args[0], program.target(args[2])
    if target is None or program.tensor(target).dim() != 1 or not isinstance(x, Node):
        return None
    bias = program.target(args[3]) if args[3] is not None else None
    if args[3] is not None and bias is None:  # a computed bias
        return None
    path, source, cls = _module_path(node, stacks, target)
    return _Found(node, x, target, "out_in", bias, path, source, cls, "aten.layer_norm", program.tensor(target), "norm")


def _as_scale(program: Program, node: Node, stacks: bool) -> _Found | None:
    """``aten.mul(x, weight)`` (either order) of a computed value and a 1-D parameter: the scale that ends a
    decomposed RMSNorm, a norm site (kept only where an adapter names it, like every norm site)."""
    if len(node.args) != 2 or node.kwargs:
        return None
    targets = [program.target(a) for a in node.args]
    params = [i for i, t in enumerate(targets) if t is not None and program.tensor(t).dim() == 1]
    if len(params) != 1 or not isinstance(x := node.args[1 - params[0]], Node) or targets[1 - params[0]] is not None:
        return None
    target = targets[params[0]]
    path, source, cls = _module_path(node, stacks, target)
    return _Found(node, x, target, "out_in", None, path, source, cls, "aten.mul", program.tensor(target), "norm")


def _as_site(program: Program, node: Node, stacks: bool) -> _Found | None:
    if node.op == "call_module":
        return _as_module(program, node)
    if node.op == "call_function" and node.target == aten.mul.Tensor:
        return _as_scale(program, node, stacks)
    if node.op == "call_function" and node.target == aten.embedding.default:
        return _as_embedding(program, node, stacks)
    if node.op == "call_function" and node.target == aten.layer_norm.default:
        return _as_norm(program, node, stacks)
    if node.op != "call_function" or node.target not in LINEAR_OPS or node.kwargs.get("out") is not None:
        return None
    op = LINEAR_OPS[node.target]
    args = list(node.args) + [None] * 3
    if node.target in ADDMM:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or len(node.args) > 3:
            return None
        bias, x, w = args[0], args[1], args[2]
    else:
        x, w, bias = args[0], args[1], args[2] if node.target in (aten.linear.default, torch.nn.functional.linear) else None
        bias = node.kwargs.get("bias", bias)
    found = _unwrap_weight(program, w)
    if found is None or not isinstance(x, Node):
        return None
    target, transposed = found
    linear = node.target in (aten.linear.default, torch.nn.functional.linear)
    layout = "out_in" if linear != transposed else "in_out"  # linear reads W.T; a transpose flips that
    bias_target = program.target(bias) if bias is not None else None
    path, source, cls = _module_path(node, stacks, target)
    return _Found(node, x, target, layout, bias_target, path, source, cls, op, program.tensor(target))


def _as_module(program: Program, node: Node) -> _Found | None:
    try:
        module = program.module.get_submodule(node.target)
    except AttributeError:
        return None
    if not is_linear_module(type(module)) or not node.args or not isinstance(node.args[0], Node) or node.kwargs:
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    layout = "out_in" if isinstance(module, torch.nn.Linear) else "in_out"
    bias = f"{node.target}.bias" if getattr(module, "bias", None) is not None else None
    return _Found(node, node.args[0], f"{node.target}.weight", layout, bias, node.target, SOURCE_MODULE,
                  type(module), "call_module", weight)


def _root_scope(found: list[_Found]) -> set[str]:
    """The outermost transformers model's path in each node's module stack (the model PEFT wraps)."""
    roots = set()
    for f in found:
        for path, cls in _stack(f.node):
            if _class_name(cls).startswith("transformers.models."):
                roots.add(path)
                break
    return roots


def _passes_to_output(node: Node) -> bool:
    if node.op == "call_function":
        return node.target in _TO_OUTPUT
    return node.op == "call_method" and node.target in _TO_OUTPUT_METHODS


def _is_output_head(node: Node) -> bool:
    """Whether the node's value reaches a graph output through reshapes/casts only."""
    value = node
    while True:
        users = list(value.users)
        if any(u.op == "output" for u in users):
            return True
        if len(users) != 1 or not _passes_to_output(users[0]):
            return False
        value = users[0]


def find_sites(program: Program, prefix: str | None = None, wanted: Collection[str] = ()) -> SiteReport:
    """Every linear and embedding site of ``program``'s graph (and the norms ``wanted`` names), named by module path
    relative to the model PEFT sees.

    ``prefix`` is the wrapper path to strip (``m`` for a module holding the model as ``self.m``); when None
    it is the outermost transformers model recorded in ``nn_module_stack``, else the prefix that makes the
    most ``wanted`` paths (an adapter's module names) exist, else nothing.
    """
    stacks = any(n.meta.get("nn_module_stack") for n in program.graph.nodes)
    nodes = {n.name: n for n in program.graph.nodes}
    found = [f for node in program.graph.nodes if (f := _as_site(program, node, stacks)) is not None]
    named = [f for f in found if f.path and f.layer_class is not False]
    unresolved = [f.node.name if not f.path else f"{f.node.name} (in {f.path}, a {_class_name(f.cls)}: not a LoRA layer)"
                  for f in found if f not in named and f.kind != "norm"]
    roots = _root_scope(named)
    if prefix is not None:
        chosen, how = prefix, "given"
    elif len(roots) == 1:
        chosen, how = roots.pop(), "nn_module_stack classes"
    elif wanted:
        chosen, how = guess_prefix([f.path for f in named], wanted), "adapter module names"
    else:
        chosen, how = "", "none"
    sites = []
    for f in named:
        if f.kind == "norm" and strip_prefix(f.path, chosen) not in wanted:  # norms: where an adapter replaces one
            continue
        rows, cols = (*f.tensor.shape, *f.tensor.shape)[:2]  # a norm's [dim] is both
        in_f, out_f = (cols, rows) if f.layout == "out_in" and f.kind == "linear" else (rows, cols)
        sites.append(Site(path=strip_prefix(f.path, chosen), op=f.op, node=f.node.name, weight=f.weight, layout=f.layout,
                          in_features=int(in_f), out_features=int(out_f), dtype=dtype_name(f.tensor.dtype),
                          output=f.node.name, input=f.x.name, bias=f.bias, source=f.source,
                          module_class=_class_name(f.cls) if f.cls is not None else None, kind=f.kind,
                          storage=WeightView(f.tensor, f.layout)))
    heads = sorted({s.path for s in sites if s.kind != "norm" and _is_output_head(nodes[s.node])})
    return SiteReport(sites, unresolved, prefix=chosen, prefix_source=how if chosen else "none", output_heads=heads)


def full_path(report: SiteReport, path: str) -> str:
    """The module path in the traced module (the stripped prefix put back)."""
    return f"{report.prefix}.{path}" if report.prefix else path
