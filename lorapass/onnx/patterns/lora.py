"""LoRA branches already in a graph: ``Add(y, (x @ A) @ B)`` where ``y`` is (after its bias) the output of a
linear reading the same ``x``, and A [in, r], B [r, out] are 2-D weights of a rank r below both widths that
say they are LoRA: overridable graph inputs (as lorapass and Olive write them), or nodes or weights named
``lora`` (the genai builder's ``adapter_path`` builds: ``/model/layers.N/attn/q_proj/lora_A/MatMul``). Both
MatMuls of such a branch are :class:`Branch` nodes, never sites; ``v(q(x)) + k(x)`` is no branch."""

from __future__ import annotations

import onnx_ir as ir

from lorapass.onnx.patterns import Branch, constant, standard


def _factor(value: ir.Value | None) -> ir.Value | None:
    """The 2-D weight behind ``value``: an initializer (seen through Identity) or a graph input."""
    source = constant(value)
    if source is None and value is not None and value.is_graph_input():
        source = value
    return source if source is not None and source.shape is not None and len(source.shape) == 2 else None


def _lora_like(a: ir.Node, b: ir.Node) -> bool:
    """Low rank (r below in and out, where the shapes say) and named or fed as LoRA."""
    wa, wb = _factor(a.inputs[1]), _factor(b.inputs[1])
    (d_in, r), (r_b, d_out) = wa.shape, wb.shape
    if all(isinstance(d, int) for d in (d_in, r, d_out)) and not r < min(d_in, d_out):
        return False
    names = [a.name, b.name, wa.name, wb.name]
    return wa.is_graph_input() or wb.is_graph_input() or any("lora" in (n or "").lower() for n in names)


def _matmul(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "MatMul" and standard(node) and len(node.inputs) == 2 and _factor(node.inputs[1])


def _reads(value: ir.Value, x: ir.Value) -> bool:
    """Whether ``value`` is computed from ``x`` by one node (a linear), possibly followed by its bias ``Add``."""
    producer = value.producer()
    if producer is None:
        return False
    if producer.inputs and producer.inputs[0] is x:
        return True
    if producer.op_type != "Add":
        return False
    return any(v is not None and v.producer() is not None and v.producer().inputs and v.producer().inputs[0] is x
               for v in producer.inputs)


def _joins(a: ir.Node) -> tuple[ir.Node, ir.Value] | None:
    """(B node, the value the branch is added to) when ``a`` is the A MatMul of a LoRA branch."""
    if not _matmul(a):
        return None
    down = a.outputs[0].consumers()
    if len(down) != 1 or not _matmul(down[0]) or down[0].inputs[0] is not a.outputs[0]:
        return None
    b = down[0]
    if not _lora_like(a, b):
        return None
    adds = b.outputs[0].consumers()
    if len(adds) != 1 or adds[0].op_type != "Add" or not standard(adds[0]):
        return None
    others = [v for v in adds[0].inputs if v is not b.outputs[0]]
    if len(others) != 1 or others[0] is None or not _reads(others[0], a.inputs[0]):
        return None
    return b, others[0]


def match(node: ir.Node) -> Branch | None:
    found = _joins(node)
    if found is not None:
        return Branch(node, found[1])
    producer = node.inputs[0].producer() if _matmul(node) and node.inputs[0] is not None else None
    found = _joins(producer) if producer is not None else None
    if found is not None and found[0] is node:
        return Branch(node, found[1])
    return None
