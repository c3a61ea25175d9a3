"""Strategy ``merge``: fold scale·B·A into each targeted weight, in the weight's own layout and dtype."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from lorapass.adapter import Adapter
from lorapass.onnx.save import REPLACES
from lorapass.plan import Target
from lorapass.site import Site

_SEE_THROUGH = {"Identity", "Transpose"}


def delta(adapter: Adapter, target: Target) -> np.ndarray:
    """scale · B @ A in float32, shaped [out, in] (torch.nn.Linear's layout)."""
    a = adapter.tensor(target.site.path, "lora_A")
    b = adapter.tensor(target.site.path, "lora_B")
    return (b @ a) * np.float32(target.params.scale)


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


def _merged(weight: ir.TensorProtocol, update: np.ndarray, layout: str, name: str) -> ir.LazyTensor:
    """A tensor computed only when written: (W in float32 + update) cast back to W's dtype."""
    shape, dtype = weight.shape, weight.dtype

    def compute() -> ir.Tensor:
        w = weight.numpy()
        result = (w.astype(np.float32) + (update if layout == "out_in" else update.T)).astype(w.dtype)
        del w  # drop the view on the memory map so it can be closed
        if isinstance(weight, ir.ExternalTensor):
            weight.release()
        return ir.Tensor(result, name=name)

    return ir.LazyTensor(compute, dtype, shape, name=name)


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
        update = delta(adapter, group[0])
        if len(paths) == 1 and _readers(value) <= group_nodes and not value.is_graph_input():
            original = value.const_value
            value.const_value = _merged(original, update, group[0].site.layout, weight_name)
            value.meta[REPLACES] = original
            changed += 1
            continue
        for target in group:  # copy-on-write, one new weight per site, in the layout its node reads
            changed += _copy_on_write(graph, nodes[target.site.node], value.const_value, target.site,
                                      delta(adapter, target))
    return changed


def _copy_on_write(graph: ir.Graph, node: ir.Node, weight: ir.TensorProtocol, site: Site, update: np.ndarray) -> int:
    layout = _node_operand_layout(node)
    source = weight
    if layout != site.layout:  # the node reads W through a Transpose: store the new weight pre-transposed
        source = ir.Tensor(weight.numpy().T.copy(), name=weight.name)
    name = _unique(graph, f"{site.path}.weight")
    new = ir.Value(name=name, shape=ir.Shape(source.shape), type=ir.TensorType(source.dtype),
                   const_value=_merged(source, update, layout, name))
    graph.register_initializer(new)
    node.replace_input_with(1, new)
    return 1


def _unique(graph: ir.Graph, name: str) -> str:
    taken = set(graph.initializers) | {v.name for v in graph.inputs}
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    return candidate
