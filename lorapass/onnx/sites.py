"""Find every linear layer (site) of an ONNX graph and name it by its torch module path."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import onnx_ir as ir

from lorapass.onnx import naming
from lorapass.site import Layout, Site

_PASS_THROUGH = {"Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten"}
NAMESPACE = "namespace"


@dataclass
class SiteReport:
    """What discovery found: the sites, the nodes it could not name, and the prefix it stripped."""

    sites: list[Site]
    unresolved: list[str] = field(default_factory=list)
    prefix: str = ""
    prefix_source: str = "none"
    output_heads: list[str] = field(default_factory=list)

    def by_path(self) -> dict[str, list[Site]]:
        out: dict[str, list[Site]] = {}
        for site in self.sites:
            out.setdefault(site.path, []).append(site)
        return out


@dataclass
class _Linear:
    node: ir.Node
    weight: ir.Value  # the node's operand as named in the graph (an Identity output keeps the parameter name)
    tensor: ir.Value  # the initializer holding W
    layout: Layout
    bias: ir.Value | None
    output: ir.Value


def constant(value: ir.Value | None) -> ir.Value | None:
    """The initializer behind ``value``, seeing through the ``Identity`` nodes exporters use to share one."""
    while value is not None and value.const_value is None:
        producer = value.producer()
        if producer is None or producer.op_type != "Identity" or producer.domain not in ("", "ai.onnx"):
            return None
        value = producer.inputs[0]
    return value


def _const_2d(value: ir.Value | None) -> ir.Value | None:
    """A 2-D initializer that is not also a graph input (an overridable input, e.g. a LoRA slot, is no weight)."""
    source = constant(value)
    if source is None or source.is_graph_input() or len(source.const_value.shape) != 2:
        return None
    return source


def _transposed_const(value: ir.Value | None) -> ir.Value | None:
    """The 2-D initializer behind a ``Transpose(perm=[1,0])``, as unfolded exports leave it."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Transpose" or producer.domain not in ("", "ai.onnx"):
        return None
    perm = producer.attributes.get("perm")
    if perm is None or list(perm.as_ints()) == [1, 0]:
        return _const_2d(producer.inputs[0])
    return None


def _bias_after(output: ir.Value, out_features: int) -> tuple[ir.Value | None, ir.Value]:
    """A following ``Add`` of a 1-D constant of the output width is the layer's bias."""
    consumers = output.consumers()
    if len(consumers) != 1 or output.is_graph_output():
        return None, output
    add = consumers[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None, output
    other = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
    source = constant(other)
    if source is None or tuple(source.const_value.shape) != (out_features,):
        return None, output
    return other, add.outputs[0]


def _as_linear(node: ir.Node) -> _Linear | None:
    if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    rhs = node.inputs[1]
    if node.op_type == "MatMul":
        if (tensor := _const_2d(rhs)) is not None:
            weight, layout = rhs, "in_out"
        elif (tensor := _transposed_const(rhs)) is not None:
            weight, layout = rhs.producer().inputs[0], "out_in"
        else:
            return None
        out_features = tensor.const_value.shape[1 if layout == "in_out" else 0]
        bias, output = _bias_after(node.outputs[0], out_features)
        return _Linear(node, weight, tensor, layout, bias, output)
    if node.op_type == "Gemm" and (tensor := _const_2d(rhs)) is not None:
        attrs = node.attributes
        if attrs.get("transA") is not None and attrs["transA"].as_int() != 0:
            return None
        if attrs.get("alpha") is not None and attrs["alpha"].as_float() != 1.0:
            return None
        trans_b = attrs.get("transB") is not None and attrs["transB"].as_int() == 1
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if bias is not None and attrs.get("beta") is not None and attrs["beta"].as_float() != 1.0:
            return None
        return _Linear(node, rhs, tensor, "out_in" if trans_b else "in_out", bias, node.outputs[0])
    return None


def _root_scope(node: ir.Node) -> str | None:
    """The scope of the outermost transformers model in the dynamo exporter's ``namespace`` record."""
    text = node.metadata_props.get(NAMESPACE)
    if not text:
        return None
    for entry in text.split("/"):
        scope, _, cls = entry.partition(": ")
        if cls.strip().startswith("transformers.models."):
            return scope.strip()
    return None


def strip_prefix(path: str, prefix: str) -> str:
    return path[len(prefix) + 1:] if prefix and path.startswith(prefix + ".") else path


def guess_prefix(paths: list[str], wanted: Collection[str]) -> str:
    """The leading scope whose removal makes the most ``wanted`` module paths exist in the graph."""
    candidates = {""}
    for path in paths:
        parts = path.split(".")
        candidates.update(".".join(parts[:k]) for k in range(1, min(3, len(parts))))
    wanted = set(wanted)

    def hits(prefix: str) -> int:
        return len(wanted & {strip_prefix(p, prefix) for p in paths if not prefix or p.startswith(prefix + ".")})

    return max(sorted(candidates, key=len), key=hits)


def _is_output_head(output: ir.Value) -> bool:
    value = output
    while not value.is_graph_output():
        consumers = value.consumers()
        if len(consumers) != 1 or consumers[0].op_type not in _PASS_THROUGH:
            return False
        value = consumers[0].outputs[0]
    return True


def find_sites(model: ir.Model, prefix: str | None = None, wanted: Collection[str] = ()) -> SiteReport:
    """Every MatMul/Gemm with a constant 2-D weight, named by module path.

    ``prefix`` is the wrapper scope to strip (``m`` for a module that holds the model as ``self.m``);
    when None it is read from the dynamo exporter's class records, else chosen so that the most
    ``wanted`` paths (e.g. an adapter's module names) exist.
    """
    linears = [lin for node in model.graph for lin in [_as_linear(node)] if lin is not None]
    named: list[tuple[_Linear, str, str]] = []
    unresolved: list[str] = []
    from_nodes: list[tuple[_Linear, str]] = []
    for lin in linears:
        for source, strategy in naming.STRATEGIES.items():
            path = strategy(lin.node, lin.weight, lin.bias)
            if path:
                break
        if not path:
            unresolved.append(lin.node.name or f"<unnamed {lin.node.op_type}>")
        elif source == "node_name":
            from_nodes.append((lin, path))
        else:
            named.append((lin, path, source))

    # TorchScript node names may drop scopes: map them with what parameter names taught us.
    pairs = [(p, path) for lin, path, source in named if (p := naming.from_node_name(lin.node, lin.weight, lin.bias))]
    scope_map = naming.learn_scope_map(pairs)
    named += [(lin, naming.apply_scope_map(path, scope_map), "node_name") for lin, path in from_nodes]

    root_scopes = {s for lin, _, _ in named if (s := _root_scope(lin.node)) is not None}
    if prefix is not None:
        chosen, prefix_source = prefix, "given"
    elif len(root_scopes) == 1:
        chosen, prefix_source = root_scopes.pop(), "exporter class records"
    elif wanted:
        chosen, prefix_source = guess_prefix([p for _, p, _ in named], wanted), "adapter module names"
    else:
        chosen, prefix_source = "", "none"

    sites = []
    for lin, path, source in named:
        shape = lin.tensor.const_value.shape
        in_f, out_f = (shape[0], shape[1]) if lin.layout == "in_out" else (shape[1], shape[0])
        sites.append(
            Site(
                path=strip_prefix(path, chosen),
                op=lin.node.op_type,
                node=lin.node.name or "",
                weight=lin.tensor.name or "",
                layout=lin.layout,
                in_features=int(in_f),
                out_features=int(out_f),
                dtype=lin.tensor.const_value.dtype.name.lower(),
                output=lin.output.name or "",
                input=lin.node.inputs[0].name or "",
                bias=lin.bias.name if lin.bias is not None else None,
                source=source,
                module_class=naming.module_class(lin.node),
            )
        )
    heads = sorted({s.path for s, lin in zip(sites, [n[0] for n in named]) if _is_output_head(lin.output)})
    return SiteReport(sites, unresolved, chosen, prefix_source if chosen else "none", heads)
