"""Normalisation layers: ``LayerNormalization(X, Scale[, B])`` and ``RMSNormalization(X, Scale)`` with constant 1-D
parameters, and the ``Mul`` by a constant 1-D parameter that ends an RMSNorm the exporter decomposed (Llama's at
opset < 23). Nothing low-rank applies to them (PEFT refuses LoRA on norms); they are sites so that what an adapter
replaces by name reaches them: a ``modules_to_save`` copy of a norm, and the norm biases PEFT's ``bias="all"``
trains. The scale is the site's weight ([dim], torch's ``weight``), B its bias. Discovery keeps them only where an
adapter names them, so the ``Mul`` form may be loose."""

from __future__ import annotations

import onnx_ir as ir

from lorapass.onnx.patterns import Match, fixed, standard
from lorapass.onnx.storage import Plain, View

_SCALED = {"LayerNormalization": True, "RMSNormalization": False}  # op -> takes a bias


def _vector(value: ir.Value | None) -> ir.Value | None:
    source = fixed(value)
    return source if source is not None and len(source.const_value.shape) == 1 else None


def _scaled(node: ir.Node) -> Match | None:
    """``Mul(x, scale)`` (either order) of a computed value and a constant 1-D float parameter."""
    if len(node.inputs) != 2:
        return None
    scales = [i for i, v in enumerate(node.inputs) if _vector(v) is not None]
    if len(scales) != 1 or node.inputs[1 - scales[0]].const_value is not None:
        return None
    scale = _vector(node.inputs[scales[0]])
    if not scale.const_value.dtype.is_floating_point():
        return None
    store = Plain(scale, "out_in")
    dim = store.shape[0]
    return Match(node, View(store, node), "norm", node.inputs[1 - scales[0]], node.outputs[0], None,
                 node.inputs[scales[0]], dim, dim, store.dtype)


def match(node: ir.Node) -> Match | None:
    if node.op_type == "Mul" and standard(node):
        return _scaled(node)
    if node.op_type not in _SCALED or not standard(node) or len(node.inputs) < 2:
        return None
    scale = _vector(node.inputs[1])
    if scale is None:
        return None
    bias = node.inputs[2] if _SCALED[node.op_type] and len(node.inputs) > 2 else None
    bias_store = _vector(bias) if bias is not None else None
    if bias is not None and bias_store is None:  # a computed bias: not this pattern's
        return None
    store = Plain(scale, "out_in")
    dim = store.shape[0]
    return Match(node, View(store, node), "norm", node.inputs[0], node.outputs[0], bias, node.inputs[1], dim, dim,
                 store.dtype, View(Plain(bias_store, "out_in"), node) if bias_store is not None else None)
