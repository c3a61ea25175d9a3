"""MatMulNBits (``com.microsoft``): ``y = A @ dequant(B)^T (+ bias)``, a linear over a block-quantized weight
(the genai builder's ``-p int4``, ORT's MatMulNBitsQuantizer). The bias is the node's input 5, or an ``Add``
after it; the activation's float type is the scales' type."""

from __future__ import annotations

import onnx_ir as ir

from lorapass.onnx.patterns import Match, Unsupported, fixed
from lorapass.onnx.patterns.linear import bias_after
from lorapass.onnx.quantized import MatMulNBits
from lorapass.onnx.storage import View

BITS = (2, 4, 8)
"""Bit widths whose packing and dequantization were checked against ONNX Runtime's kernel."""


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _why_not(node: ir.Node, blob, scales, zeros, g_idx) -> str | None:
    attrs = node.attributes
    if not all(k in attrs for k in ("K", "N", "block_size")):
        return "MatMulNBits without its K / N / block_size attributes"
    bits = attrs["bits"].as_int() if "bits" in attrs else 4
    if bits not in BITS:
        return f"MatMulNBits with bits={bits}: lorapass reads {'/'.join(map(str, BITS))}-bit weights"
    if "weight_prepacked" in attrs and attrs["weight_prepacked"].as_int() != 0:
        return "MatMulNBits weights prepacked for a CUDA kernel layout (weight_prepacked != 0), not the op's own layout"
    for index, role, value in ((1, "B", blob), (2, "scales", scales), (3, "zero_points", zeros), (4, "g_idx", g_idx)):
        if _input(node, index) is not None and value is None:
            return f"MatMulNBits whose {role} is not an initializer (computed, or an overridable graph input)"
    packed_zeros = zeros is not None and zeros.const_value.dtype == ir.DataType.UINT8
    if g_idx is not None and (bits != 4 or packed_zeros):
        return (f"MatMulNBits with g_idx at {bits} bits{' and packed zero points' if packed_zeros else ''}: ONNX "
                "Runtime's CPU kernel does not compute the op's definition there (it ignores packed zero points; "
                "other widths reorder differently), so lorapass leaves it; g_idx is read at 4 bits with default or "
                "float zero points")
    return None


def match(node: ir.Node) -> Match | Unsupported | None:
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft" or len(node.inputs) < 3:
        return None
    blob, scales, zeros, g_idx = (fixed(_input(node, i)) for i in (1, 2, 3, 4))
    reason = _why_not(node, blob, scales, zeros, g_idx)
    if reason is not None:
        return Unsupported(node, reason)
    store = MatMulNBits(node, blob, scales, zeros, g_idx)
    out_features, in_features = store.shape
    bias = _input(node, 5)
    output = node.outputs[0]
    if bias is None:
        bias, output = bias_after(output, out_features)
    return Match(node, View(store, node), "linear", node.inputs[0], output, bias, node.inputs[1], in_features,
                 out_features, store.dtype)
