"""Normalisation layers: ``LayerNormalization(X, Scale[, B])`` and ``RMSNormalization(X, Scale)`` with constant 1-D
parameters, and the ``Mul`` by a constant 1-D parameter that ends an RMSNorm the exporter decomposed (Llama's at
opset < 23). Nothing low-rank applies to them (PEFT refuses LoRA on norms); they are sites so that what an adapter
replaces by name reaches them: a ``modules_to_save`` copy of a norm, and the norm biases PEFT's ``bias="all"``
trains. The scale is the site's weight ([dim], torch's ``weight``), B its bias. Discovery keeps them only where an
adapter names them, so the ``Mul`` form may be loose."""

from __future__ import annotations

import onnx_ir as ir

from lorapass.onnx.patterns import FLOATS, Match, standard, weight_constant
from lorapass.onnx.storage import Plain, View

_SCALED = {"LayerNormalization": True, "RMSNormalization": False}  # op -> takes a bias


def _site(node: ir.Node, x: ir.Value, scale: ir.Value, bias: ir.Value | None = None) -> Match | None:
    """The norm site of ``node`` reading ``x``, scaled by the constant 1-D ``scale`` (and shifted by the constant 1-D
    ``bias``, if given); None when either is computed or not a float vector."""
    source, shift = weight_constant(scale, 1), weight_constant(bias, 1) if bias is not None else None
    if source is None or source.const_value.dtype not in FLOATS or (bias is not None and shift is None):
        return None
    store = Plain(source, "out_in")
    dim = store.shape[0]
    return Match(node, View(store, node), "norm", x, node.outputs[0], bias, scale, dim, dim, store.dtype,
                 View(Plain(shift, "out_in"), node) if shift is not None else None)


def match(node: ir.Node) -> Match | None:
    if not standard(node) or len(node.inputs) < 2:
        return None
    if node.op_type == "Mul":  # Mul(x, scale), either order, of a computed value and a 1-D parameter
        scales = [i for i, v in enumerate(node.inputs) if weight_constant(v, 1) is not None]
        if len(node.inputs) != 2 or len(scales) != 1 or node.inputs[1 - scales[0]].const_value is not None:
            return None
        return _site(node, node.inputs[1 - scales[0]], node.inputs[scales[0]])
    if node.op_type not in _SCALED:
        return None
    bias = node.inputs[2] if _SCALED[node.op_type] and len(node.inputs) > 2 else None
    return _site(node, node.inputs[0], node.inputs[1], bias)
