"""Strategy ``merge``: fold scale·B·A into each targeted weight, in the weight's own layout and dtype."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from lorapass.adapter import Adapter
from lorapass.onnx.fold import fold, read
from lorapass.onnx.save import REPLACES
from lorapass.plan import Target

_SEE_THROUGH = {"Identity", "Transpose"}


def factors(adapter: Adapter, target: Target, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """(L, R) in float32 with L @ R = the update in ``layout``: scale·B @ A for [out, in], its transpose for [in, out]."""
    a = adapter.tensor(target.site.path, "lora_A")
    b = adapter.tensor(target.site.path, "lora_B")
    scale = np.float32(target.params.scale)
    if layout == "out_in":
        return np.ascontiguousarray(b * scale), a
    return np.ascontiguousarray(a.T * scale), np.ascontiguousarray(b.T)


def delta(adapter: Adapter, target: Target) -> np.ndarray:
    """scale · B @ A in float32, shaped [out, in] (torch.nn.Linear's layout)."""
    left, right = factors(adapter, target, "out_in")
    return left @ right


def _readers(value: ir.Value) -> set[ir.Node]:
    """The nodes that compute with ``value``, seeing through Identity/Transpose (how exporters pass weights)."""
    out: set[ir.Node] = set()
    for node in value.consumers():
        if node.op_type in _SEE_THROUGH and node.domain in ("", "ai.onnx"):
            out |= _readers(node.outputs[0])
        else:
            out.add(node)
    return out


def _node_operand_layout(node: ir.Node) -> str:
    """How ``node`` consumes its B operand: [in, out] for MatMul and Gemm transB=0, else [out, in]."""
    trans_b = node.op_type == "Gemm" and node.attributes.get("transB") is not None and node.attributes["transB"].as_int() == 1
    return "out_in" if trans_b else "in_out"


def _merged(weight: ir.TensorProtocol, adapter: Adapter, target: Target, layout: str, name: str) -> ir.LazyTensor:
    """A tensor computed only when written, so one merged weight is in memory at a time."""

    def compute() -> ir.Tensor:
        return ir.Tensor(fold(read(weight), *factors(adapter, target, layout)), name=name)

    return ir.LazyTensor(compute, weight.dtype, weight.shape, name=name)


def merge(model: ir.Model, targets: list[Target], adapter: Adapter) -> int:
    """Rewrite ``model`` in place so each targeted weight holds W + scale·B·A; returns how many weights changed.

    A weight read only by its own site is replaced where it is. One shared with other nodes (tied
    embeddings, or identical tensors the exporter deduplicated) is copied: the site gets a new
    initializer ``<path>.weight`` and the others keep the original.
    """
    graph = model.graph
    nodes = {n.name: n for n in graph}
    by_weight: dict[str, list[Target]] = defaultdict(list)
    for target in targets:
        by_weight[target.site.weight].append(target)
    changed = 0
    for weight_name, group in by_weight.items():
        paths = {t.site.path for t in group}
        value = graph.initializers[weight_name]
        group_nodes = {nodes[t.site.node] for t in group}
        if len(paths) == 1 and _readers(value) <= group_nodes and not value.is_graph_input():
            original = value.const_value
            value.const_value = _merged(original, adapter, group[0], group[0].site.layout, weight_name)
            value.meta[REPLACES] = original
            changed += 1
            continue
        for target in group:  # copy-on-write, one new weight per site, in the layout its node reads
            changed += _copy_on_write(graph, nodes[target.site.node], value.const_value, target, adapter)
    return changed


def _copy_on_write(graph: ir.Graph, node: ir.Node, weight: ir.TensorProtocol, target: Target, adapter: Adapter) -> int:
    site = target.site
    layout = _node_operand_layout(node)
    source = weight
    if layout != site.layout:  # the node reads W through a Transpose: store the new weight pre-transposed
        source = ir.Tensor(weight.numpy().T.copy(), name=weight.name)
    name = _unique(graph, f"{site.path}.weight")
    new = ir.Value(name=name, shape=ir.Shape(source.shape), type=ir.TensorType(source.dtype),
                   const_value=_merged(source, adapter, target, layout, name))
    graph.register_initializer(new)
    node.replace_input_with(1, new)
    return 1


def _unique(graph: ir.Graph, name: str) -> str:
    taken = set(graph.initializers) | {v.name for v in graph.inputs}
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    return candidate
