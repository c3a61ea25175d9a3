"""Convolutions: ``Conv`` with a constant 4-D kernel [out, in, kh, kw] (torch's own layout), any kernel size,
stride, padding or dilation; its optional third input is the bias, so the branch joins the node's output.

Grouped convolutions, 1-D/3-D convolutions, quantized (QDQ) kernels and ``ConvTranspose`` are reported as unsupported
by node name.
"""

from __future__ import annotations

import onnx_ir as ir

from lorapass.onnx.patterns import Match, Unsupported, constant, standard, weight_constant
from lorapass.onnx.storage import Plain, View


def _group(node: ir.Node) -> int:
    attr = node.attributes.get("group")
    return attr.as_int() if attr is not None else 1


def match(node: ir.Node) -> Match | Unsupported | None:
    if not standard(node) or node.op_type not in ("Conv", "ConvTranspose") or len(node.inputs) < 2:
        return None
    source = constant(node.inputs[1])
    if source is None:
        producer = node.inputs[1].producer()
        if producer is not None and producer.op_type == "DequantizeLinear":
            return Unsupported(node, "a convolution with a quantized (QDQ) kernel is not adaptable yet")
        return None
    if source.is_graph_input():
        return None
    rank = len(source.const_value.shape)
    if node.op_type == "ConvTranspose":
        return Unsupported(node, "a transposed convolution (ConvTranspose) is not adaptable yet")
    if rank != 4:
        return Unsupported(node, f"a {rank - 2}-D convolution (only 2-D Conv kernels are adaptable)")
    if _group(node) != 1:
        return Unsupported(node, f"a grouped convolution (group={_group(node)}); only group=1 is adaptable")
    tensor = weight_constant(node.inputs[1], rank=4)
    store = Plain(tensor, "out_in")
    out_c, in_c, *kernel = store.shape
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
    return Match(node, View(store, node), "conv", node.inputs[0], node.outputs[0], bias, node.inputs[1], in_c, out_c,
                 store.dtype, kernel=tuple(kernel))
