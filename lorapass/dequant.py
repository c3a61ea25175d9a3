"""Float64 dequantization from onnx protos, for ``lorapass verify``'s reference: MatMulNBits and DequantizeLinear
weights as the ops define them. Written apart from the quantized stores (:mod:`lorapass.onnx.quantized`) so
that verify cross-checks them: bits come out of ``np.unpackbits``, blocks are expanded with ``np.repeat``."""

from __future__ import annotations

import numpy as np
import onnx


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _fields(data: np.ndarray, rows: int, bits: int) -> np.ndarray:
    """Each row of uint8 ``data`` as consecutive ``bits``-wide unsigned fields, low bits first."""
    stream = np.unpackbits(data.reshape(rows, -1), axis=1, bitorder="little").reshape(rows, -1, bits)
    return stream.astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64))


def matmul_nbits(node: onnx.NodeProto, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """W [N, K] float64 of a MatMulNBits node: (q - zero_point) * scale per block of K (or per g_idx group)."""
    attrs = _attrs(node)
    k, n, block, bits = attrs["K"], attrs["N"], attrs["block_size"], attrs.get("bits", 4)
    blocks = -(-k // block)
    inputs = list(node.input) + [""] * (6 - len(node.input))
    q = _fields(tensors[inputs[1]], n, bits)[:, :k].astype(np.float64)
    scale = tensors[inputs[2]].astype(np.float64).reshape(n, blocks)
    if not inputs[3]:
        zero = np.full((n, blocks), 2.0 ** (bits - 1))
    elif tensors[inputs[3]].dtype == np.uint8:
        zero = _fields(tensors[inputs[3]], n, bits)[:, :blocks].astype(np.float64)
    else:
        zero = tensors[inputs[3]].astype(np.float64).reshape(n, blocks)
    group = tensors[inputs[4]].astype(np.int64).reshape(-1) if inputs[4] else np.arange(k) // block
    return (q - zero[:, group]) * scale[:, group]


def dequantize_linear(node: onnx.NodeProto, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """The float64 output of a DequantizeLinear node over initializers: per tensor, per axis, or blocked."""
    attrs = _attrs(node)
    x = tensors[node.input[0]].astype(np.float64)
    scale = tensors[node.input[1]].astype(np.float64)
    zero = tensors[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else np.zeros_like(scale)
    if scale.size == 1:
        return (x - zero.reshape(())) * scale.reshape(())
    axis = attrs.get("axis", 1) % x.ndim
    block = attrs.get("block_size", 0)
    if block:
        scale = np.repeat(scale, block, axis=axis).take(np.arange(x.shape[axis]), axis=axis)
        zero = np.repeat(zero, block, axis=axis).take(np.arange(x.shape[axis]), axis=axis)
    else:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (x - zero) * scale
