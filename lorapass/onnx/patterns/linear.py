"""Linear layers: ``MatMul`` / ``Gemm`` with a constant 2-D weight, read directly, through ``Identity`` (TorchScript's
deduplication) or through ``Transpose(perm=[1,0])`` (unfolded exports); a following ``Add`` of a 1-D constant of
the output width is the bias."""

from __future__ import annotations

import onnx_ir as ir

from lorapass.onnx.patterns import FLOATS, Match, Unsupported, constant, standard, weight_constant
from lorapass.onnx.storage import NewBias, Plain, View


def _transposed(value: ir.Value | None) -> ir.Value | None:
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Transpose" or not standard(producer):
        return None
    perm = producer.attributes.get("perm")
    if perm is None or list(perm.as_ints()) == [1, 0]:
        return weight_constant(producer.inputs[0])
    return None


def bias_after(output: ir.Value, out_features: int) -> tuple[ir.Value | None, ir.Value]:
    """(bias, value after it) when ``output``'s only reader adds a 1-D constant of the output width."""
    consumers = output.consumers()
    if len(consumers) != 1 or output.is_graph_output():
        return None, output
    add = consumers[0]
    if add.op_type != "Add" or not standard(add):
        return None, output
    other = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
    source = constant(other)
    if source is None or tuple(source.const_value.shape) != (out_features,):
        return None, output
    return other, add.outputs[0]


def _bias_view(node: ir.Node, bias: ir.Value | None, features: int, dtype: ir.DataType) -> View | None:
    """The bias as a view: its initializer as read by ``node`` (the Gemm, or the Add after a MatMul), a new one
    when the layer has none, None when it is computed."""
    if bias is None:
        return View(NewBias(node, features, dtype), node)
    source = constant(bias)
    return View(Plain(source, "out_in"), node) if source is not None and len(source.const_value.shape) == 1 else None


def _match(node: ir.Node, weight: ir.Value, tensor: ir.Value, layout: str, bias: ir.Value | None,
           output: ir.Value) -> Match | Unsupported:
    if tensor.const_value.dtype not in FLOATS:
        return Unsupported(node, f"{node.op_type} over the {tensor.const_value.dtype.name} weight {tensor.name!r}: an "
                                 "integer product has no float weight to add a LoRA delta to")
    store = Plain(tensor, layout)
    out_f, in_f = store.shape
    dtype = store.dtype
    bias_node = node if node.op_type == "Gemm" or bias is None else output.producer()
    return Match(node, View(store, node), "linear", node.inputs[0], output, bias, weight, in_f, out_f, dtype,
                 _bias_view(bias_node, bias, out_f, tensor.const_value.dtype))


def match(node: ir.Node) -> Match | Unsupported | None:
    if not standard(node) or len(node.inputs) < 2:
        return None
    rhs = node.inputs[1]
    if node.op_type == "MatMul":
        if (tensor := weight_constant(rhs)) is not None:
            weight, layout = rhs, "in_out"
        elif (tensor := _transposed(rhs)) is not None:
            weight, layout = rhs.producer().inputs[0], "out_in"
        else:
            return None
        out_features = tensor.const_value.shape[1 if layout == "in_out" else 0]
        bias, output = bias_after(node.outputs[0], out_features)
        return _match(node, weight, tensor, layout, bias, output)
    if node.op_type == "Gemm" and (tensor := weight_constant(rhs)) is not None and (plain := gemm(node)) is not None:
        layout, bias = plain
        return _match(node, rhs, tensor, layout, bias, node.outputs[0])
    return None


def gemm(node: ir.Node) -> tuple[str, ir.Value | None] | None:
    """(layout of B, bias C) when the Gemm is a plain linear ``A @ op(B) + C`` (no transA, alpha = beta = 1)."""
    attrs = node.attributes
    if attrs.get("transA") is not None and attrs["transA"].as_int() != 0:
        return None
    if attrs.get("alpha") is not None and attrs["alpha"].as_float() != 1.0:
        return None
    trans_b = attrs.get("transB") is not None and attrs["transB"].as_int() == 1
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if bias is not None and attrs.get("beta") is not None and attrs["beta"].as_float() != 1.0:
        return None
    return ("out_in" if trans_b else "in_out"), bias
