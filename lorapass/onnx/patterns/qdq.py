"""QDQ linears: a MatMul or Gemm whose weight is ``DequantizeLinear(W_q, scale, zero_point)`` of initializers
(ORT's static quantizer per tensor or per channel; MatMulNBitsQuantizer's QDQ format in blocks), read directly or
through ``Transpose(perm=[1,0])``. The site reads the node's own activation (after its QDQ pair, if any)."""

from __future__ import annotations

import onnx_ir as ir

from lorapass.onnx.patterns import Match, Unsupported, fixed, standard
from lorapass.onnx.patterns.linear import bias_after, gemm
from lorapass.onnx.quantized import INTEGER_RANGES, DequantizeLinear
from lorapass.onnx.storage import View

_DOMAINS = ("", "ai.onnx", "com.microsoft")  # ORT writes its 16-bit and int4 QDQ ops in its own domain


def _dequantized(value: ir.Value) -> tuple[ir.Node, bool] | None:
    """(the DequantizeLinear behind ``value``, whether a Transpose sits between), seeing through Identity."""
    transposed = False
    producer = value.producer()
    while producer is not None and standard(producer) and producer.op_type in ("Identity", "Transpose"):
        if producer.op_type == "Transpose":
            perm = producer.attributes.get("perm")
            if transposed or (perm is not None and list(perm.as_ints()) != [1, 0]):
                return None
            transposed = True
        producer = producer.inputs[0].producer()
    if producer is None or producer.op_type != "DequantizeLinear" or producer.domain not in _DOMAINS:
        return None
    return producer, transposed


def match(node: ir.Node) -> Match | Unsupported | None:
    if not standard(node) or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    found = _dequantized(node.inputs[1])
    if found is None:
        return None
    dq, transposed = found
    q, scale = fixed(dq.inputs[0]), fixed(dq.inputs[1])
    has_zero = len(dq.inputs) > 2 and dq.inputs[2] is not None
    if q is None or scale is None or (has_zero and fixed(dq.inputs[2]) is None) or len(q.const_value.shape) != 2:
        return None  # an activation's QDQ pair (attention scores), not a weight
    if q.const_value.dtype not in INTEGER_RANGES:
        return Unsupported(node, f"weight dequantized from {q.const_value.dtype.name.lower()} ({dq.name}): lorapass "
                                 "requantizes 4/8/16-bit integer weights only")
    if node.op_type == "Gemm":
        plain = gemm(node)
        if plain is None:
            return None
        layout, bias = plain
        output = node.outputs[0]
    else:
        layout, bias, output = "in_out", None, node.outputs[0]
    if transposed:
        layout = "out_in" if layout == "in_out" else "in_out"
    store = DequantizeLinear(dq, layout)
    out_features, in_features = store.shape
    if node.op_type == "MatMul":
        bias, output = bias_after(output, out_features)
    return Match(node, View(store, node), "linear", node.inputs[0], output, bias, q, in_features, out_features,
                 store.dtype)
