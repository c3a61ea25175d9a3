"""Quantized ops lorapass cannot adapt, reported by node with the reason (never silently absent): the integer
matmuls of ORT's dynamic quantization and of the QOperator format, and formats it does not decode."""

from __future__ import annotations

import onnx_ir as ir

from lorapass.onnx.patterns import Unsupported, fixed

_DYNAMIC = ("integer matmul of a quantized weight and activations quantized at run time (ORT dynamic quantization): "
            "no float weight or float output to adapt; apply LoRA to the float model before quantizing, or quantize "
            "with MatMulNBits or the QDQ format, which lorapass adapts")
_QOPERATOR = ("integer in, integer out (the QOperator format): no float activation for a LoRA branch; quantize in "
              "the QDQ format, which lorapass adapts")
_OPS: dict[tuple[str, str], tuple[int, str]] = {  # (domain, op) -> (index of the weight input, reason)
    ("", "MatMulInteger"): (1, _DYNAMIC),
    ("com.microsoft", "DynamicQuantizeMatMul"): (1, _DYNAMIC),
    ("com.microsoft", "MatMulIntegerToFloat"): (1, _DYNAMIC),
    ("", "ConvInteger"): (1, _DYNAMIC),
    ("", "QLinearMatMul"): (3, _QOPERATOR),
    ("com.microsoft", "QGemm"): (3, _QOPERATOR),
    ("", "QLinearConv"): (3, _QOPERATOR),
    ("com.microsoft", "QAttention"): (1, "quantized fused attention: its q/k/v weights are packed inside the op"),
    ("com.microsoft", "MatMulBnb4"): (1, "bitsandbytes 4-bit weight (MatMulBnb4): a format lorapass does not decode"),
    ("com.microsoft", "MatMulFpQ4"): (1, "legacy MLAS 4-bit blob (MatMulFpQ4): a format lorapass does not decode"),
    ("com.microsoft", "GatherBlockQuantized"): (0, "block-quantized embedding table: lorapass does not adapt it"),
}


def match(node: ir.Node) -> Unsupported | None:
    domain = "" if node.domain == "ai.onnx" else node.domain
    entry = _OPS.get((domain, node.op_type))
    if entry is None:
        return None
    index, reason = entry
    if len(node.inputs) <= index or fixed(node.inputs[index]) is None:
        return None  # no constant weight: an activation-by-activation product
    return Unsupported(node, f"{node.op_type}: {reason}")
