"""Embeddings: ``Gather(table, ids)`` on axis 0 of a constant 2-D float table [rows, dim] (torch's own layout), read
directly or through ``Identity``. The ids are the site's input; its output is the gathered rows."""

from __future__ import annotations

import onnx_ir as ir

from lorapass.onnx.patterns import FLOATS, Match, standard, weight_constant
from lorapass.onnx.storage import Plain, View


def match(node: ir.Node) -> Match | None:
    if node.op_type != "Gather" or not standard(node) or len(node.inputs) != 2:
        return None
    axis = node.attributes.get("axis")
    table = weight_constant(node.inputs[0])
    if (axis is not None and axis.as_int() != 0) or table is None or table.const_value.dtype not in FLOATS:
        return None
    store = Plain(table, "out_in")
    rows, dim = store.shape
    return Match(node, View(store, node), "embedding", node.inputs[1], node.outputs[0], None, node.inputs[0], rows, dim,
                 store.dtype)
