"""Quantized weights as storage: a MatMulNBits blob with its scales and zero points, and a DequantizeLinear
weight (per tensor, per axis or blocked). ``read`` dequantizes exactly as the op does; a write requantizes the
merged weight with the same scheme (bits, blocks, symmetric or not, packing; :mod:`lorapass.onnx.grid`) and
writes new integers, scales and zero points. These stores are lossy: :meth:`Quantized.roundtrip` is what a
write of a weight reads back as.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from lorapass.onnx.fold import read as read_tensor
from lorapass.onnx.grid import Grid, dequantize, requantize
from lorapass.onnx.save import REPLACES
from lorapass.onnx.storage import LowRank, Store, behind, readers, unique_name

Arrays = dict[str, np.ndarray]
"""Role (``q``, ``scales``, ``zeros``) -> a stored tensor's values in its stored shape and dtype."""


def values(tensor: ir.TensorProtocol) -> np.ndarray:
    """A tensor's stored values (sub-byte integer types unpacked to one element each)."""
    return tensor.numpy() if tensor.dtype.bitwidth < 8 else read_tensor(tensor)


def unpack(data: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [rows, n] -> [rows, n * 8 / bits] integers, low bits first."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return ((data[..., None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(data.shape[0], -1)


def pack(ints: np.ndarray, bits: int) -> np.ndarray:
    """[rows, m] integers in [0, 2^bits) -> uint8 [rows, m * bits / 8], low bits first (inverse of :func:`unpack`)."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    parts = ints.astype(np.uint8).reshape(ints.shape[0], -1, 8 // bits) << shifts
    return np.bitwise_or.reduce(parts, axis=-1).astype(np.uint8)


class Quantized(Store):
    """A weight stored as integers on per-group grids (:class:`~lorapass.onnx.grid.Grid`). Subclasses say which
    initializers hold it (``tensors``: role -> value) and how its elements map onto groups."""

    lossy = True

    def __init__(self, name: str, shape: tuple[int, int], tensors: dict[str, ir.Value], grid: Grid) -> None:
        super().__init__(name, shape, ir.DataType.from_numpy(grid.scale_dtype).name.lower())
        self.tensors, self.grid = tensors, grid
        self.base = {role: v.const_value for role, v in tensors.items()}  # the stored tensors before any write
        self._memo: tuple[np.ndarray, Arrays] | None = None

    @abstractmethod
    def _state(self, arrays: Arrays) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(q [G, L], scale [G], zero [G]) as float arrays from the stored ``arrays``."""

    @abstractmethod
    def _groups(self, w: np.ndarray) -> np.ndarray:
        """Torch-layout [out, in] float weights -> [G, L] (zero pads short groups)."""

    @abstractmethod
    def _ungroup(self, g: np.ndarray) -> np.ndarray:
        """[G, L] -> torch-layout [out, in] (inverse of ``_groups``)."""

    @abstractmethod
    def _stored(self, arrays: Arrays, q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> Arrays:
        """New (q, scale, zero) as arrays to store, in the shapes and dtypes of the stored ``arrays``."""

    @abstractmethod
    def _rewire(self, node: ir.Node, new: dict[str, ir.Value]) -> None:
        """Make ``node`` compute with the initializers ``new`` (role -> value) in place of this store's."""

    def _decoders(self) -> set[ir.Node]:
        """The nodes that read this store's tensors directly (the MatMulNBits, or the DequantizeLinear)."""
        return set(self.tensors["q"].consumers())

    def _arrays(self) -> Arrays:
        return {role: values(t) for role, t in self.base.items()}

    def read(self) -> np.ndarray:
        return self._ungroup(dequantize(*self._state(self._arrays())))

    def roundtrip(self, w: np.ndarray) -> np.ndarray:
        return self._ungroup(dequantize(*self._state(self._encode(w))))

    def identity(self) -> tuple:
        return (type(self), id(self.tensors["q"]))

    def readers(self) -> set[ir.Node]:
        return readers(self.tensors["q"])

    def _encode(self, w: np.ndarray) -> Arrays:
        """The stored arrays of ``w`` requantized (remembered for the same ``w``: a measured write encodes once)."""
        if self._memo is not None and self._memo[0] is w:
            return self._memo[1]
        arrays = self._arrays()
        _, scale, zero = self._state(arrays)
        encoded = self._stored(arrays, *requantize(self._groups(w), scale, zero, self.grid))
        self._memo = (w, encoded)
        return encoded

    def _lazy(self, compute: Callable[[], np.ndarray]) -> Callable[[], Arrays]:
        """``compute`` encoded once, when the first of this store's tensors is written."""
        done: list[Arrays] = []

        def encoded() -> Arrays:
            if not done:
                done.append(self._encode(compute()))
                self._memo = None
            return done[0]

        return encoded

    def write(self, compute: Callable[[], np.ndarray], low_rank: LowRank | None) -> None:
        encoded = self._lazy(compute)
        decoders = self._decoders()
        for role, value in self.tensors.items():
            original, make = self.base[role], (lambda role=role: encoded()[role])
            if all(node in decoders for node in value.consumers()):
                value.const_value = ir.LazyTensor(lambda make=make, name=value.name: ir.Tensor(make(), name=name),
                                                  original.dtype, original.shape, name=value.name)
                value.meta[REPLACES] = original
                continue
            # a scale or zero point tensor that other weights' nodes read too: this weight's nodes get their own
            graph = next(iter(decoders)).graph
            own = _initializer(graph, f"{value.name}.{self.name}", original, make)
            for node in decoders:
                for i, v in enumerate(node.inputs):
                    if v is value:
                        node.replace_input_with(i, own)

    def write_copy(self, graph: ir.Graph, node: ir.Node, compute: Callable[[], np.ndarray], name: str) -> None:
        encoded = self._lazy(compute)
        self._rewire(node, {role: _initializer(graph, f"{name}.{role}", self.base[role],
                                               lambda role=role: encoded()[role]) for role in self.tensors})


def _initializer(graph: ir.Graph, name: str, like: ir.TensorProtocol, make: Callable[[], np.ndarray]) -> ir.Value:
    name = unique_name(graph, name)
    tensor = ir.LazyTensor(lambda: ir.Tensor(make(), name=name), like.dtype, like.shape, name=name)
    value = ir.Value(name=name, shape=ir.Shape(list(like.shape)), type=ir.TensorType(like.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _group_index(groups: np.ndarray, count: int) -> np.ndarray:
    """[count, L] positions k of each group's members (groups[k] == g); ``len(groups)`` pads short groups."""
    order = np.argsort(groups, kind="stable")
    sizes = np.bincount(groups, minlength=count)
    index = np.full((count, max(1, int(sizes.max()))), len(groups), np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    index[groups[order], np.arange(len(groups)) - np.repeat(starts, sizes)] = order
    return index


class MatMulNBits(Quantized):
    """``com.microsoft`` MatMulNBits: B uint8 [N, blocks, block_size * bits / 8] packed along K low bits first,
    scales [N, blocks] (or flat), optional zero points (uint8 packed per row like B, or in the scales' type; else
    2^(bits-1)) and g_idx (K -> block). W[n, k] = (q[n, k] - zp[n, b]) * scale[n, b], b = g_idx[k] or k // block."""

    layout = "out_in"  # rows are output features, as in torch

    def __init__(self, node: ir.Node, blob: ir.Value, scales: ir.Value, zeros: ir.Value | None,
                 g_idx: ir.Value | None) -> None:
        attrs = node.attributes
        self.k, self.n, self.block = attrs["K"].as_int(), attrs["N"].as_int(), attrs["block_size"].as_int()
        self.bits = attrs["bits"].as_int() if "bits" in attrs else 4
        self.blocks = -(-self.k // self.block)
        # with g_idx, each block's members by position; without, blocks are consecutive runs of K (reshapes)
        self.index = None if g_idx is None else _group_index(values(g_idx.const_value).astype(np.int64).reshape(-1),
                                                             self.blocks)
        self.packed_zeros = zeros is not None and zeros.const_value.dtype == ir.DataType.UINT8
        grid = Grid(0, (1 << self.bits) - 1, symmetric=zeros is None, signed_scale=True,
                    float_zero=zeros is not None and not self.packed_zeros,
                    scale_dtype=np.dtype(scales.const_value.dtype.numpy()))
        tensors = {"q": blob, "scales": scales} | ({"zeros": zeros} if zeros is not None else {})
        super().__init__(blob.name or "", (self.n, self.k), tensors, grid)

    def describe(self) -> str:
        zeros = ("packed zero points" if self.packed_zeros else "float zero points" if "zeros" in self.tensors
                 else "symmetric")
        return f"MatMulNBits int{self.bits}, blocks of {self.block}, {zeros}"

    def _ints(self, arrays: Arrays, role: str) -> np.ndarray:
        return unpack(arrays[role].reshape(self.n, -1), self.bits)

    def _state(self, arrays: Arrays) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q = self._groups(self._ints(arrays, "q")[:, :self.k].astype(np.float32))
        scale = arrays["scales"].reshape(-1).astype(np.float64)
        if "zeros" not in arrays:
            zero = np.full(self.n * self.blocks, 1 << (self.bits - 1), np.float64)
        elif self.packed_zeros:
            zero = self._ints(arrays, "zeros")[:, :self.blocks].reshape(-1).astype(np.float64)
        else:
            zero = arrays["zeros"].reshape(-1).astype(np.float64)
        return q, scale, zero

    def _groups(self, w: np.ndarray) -> np.ndarray:
        w = w.astype(np.float32, copy=False)
        if self.index is None:
            pad = self.blocks * self.block - self.k
            return (np.pad(w, ((0, 0), (0, pad))) if pad else w).reshape(self.n * self.blocks, self.block)
        padded = np.concatenate([w, np.zeros((self.n, 1), np.float32)], axis=1)
        return padded[:, self.index].reshape(self.n * self.blocks, -1)

    def _ungroup(self, g: np.ndarray) -> np.ndarray:
        if self.index is None:
            return g.reshape(self.n, -1)[:, :self.k]
        out = np.empty((self.n, self.k + 1), g.dtype)
        out[:, self.index] = g.reshape(self.n, self.blocks, -1)
        return out[:, :self.k]

    def _stored(self, arrays: Arrays, q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> Arrays:
        ints = self._ints(arrays, "q")  # keeps the padding past K as it was
        ints[:, :self.k] = self._ungroup(q)
        out = {"q": pack(ints, self.bits).reshape(arrays["q"].shape),
               "scales": scale.astype(arrays["scales"].dtype).reshape(arrays["scales"].shape)}
        if self.packed_zeros:
            zeros = self._ints(arrays, "zeros")
            zeros[:, :self.blocks] = zero.reshape(self.n, self.blocks)
            out["zeros"] = pack(zeros, self.bits).reshape(arrays["zeros"].shape)
        elif "zeros" in arrays:
            out["zeros"] = zero.astype(arrays["zeros"].dtype).reshape(arrays["zeros"].shape)
        return out

    def _rewire(self, node: ir.Node, new: dict[str, ir.Value]) -> None:
        for index, role in ((1, "q"), (2, "scales"), (3, "zeros")):
            if role in new:
                node.replace_input_with(index, new[role])


INTEGER_RANGES = {ir.DataType.INT8: (-128, 127), ir.DataType.UINT8: (0, 255), ir.DataType.INT16: (-32768, 32767),
                  ir.DataType.UINT16: (0, 65535), ir.DataType.INT4: (-8, 7), ir.DataType.UINT4: (0, 15)}
"""The DequantizeLinear integer types lorapass requantizes, with their ranges."""


class DequantizeLinear(Quantized):
    """``DequantizeLinear(W_q, scale, zero_point)`` feeding a linear: W = (W_q - zp) * scale per tensor (one scale),
    per ``axis`` (1-D scale) or in blocks of ``block_size`` along ``axis``. ``layout`` is how the linear reads the
    dequantized 2-D tensor (``in_out``: as [in, out], MatMul's own)."""

    def __init__(self, dq: ir.Node, layout: str) -> None:
        q, scale = dq.inputs[0], dq.inputs[1]
        zero = dq.inputs[2] if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
        self.dq, self.layout = dq, layout
        self.stored_shape = tuple(int(d) for d in q.const_value.shape)
        self.axis = (dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1) % 2
        self.block = dq.attributes["block_size"].as_int() if "block_size" in dq.attributes else 0
        self.mode = "tensor" if scale.const_value.size == 1 else "blocked" if self.block else "axis"
        qmin, qmax = INTEGER_RANGES[q.const_value.dtype]
        center = 0 if qmin < 0 else (qmax + 1) // 2
        symmetric = zero is None or bool(np.all(values(zero.const_value).astype(np.int64) == center))
        grid = Grid(qmin, qmax, symmetric=symmetric, scale_dtype=np.dtype(scale.const_value.dtype.numpy()))
        a, b = self.stored_shape
        tensors = {"q": q, "scales": scale} | ({"zeros": zero} if zero is not None else {})
        super().__init__(q.name or "", (b, a) if layout == "in_out" else (a, b), tensors, grid)

    def describe(self) -> str:
        how = {"tensor": "per tensor", "axis": f"per axis {self.axis}",
               "blocked": f"blocks of {self.block} along axis {self.axis}"}[self.mode]
        return f"DequantizeLinear {self.base['q'].dtype.name.lower()} {how}, {self.layout}"

    def readers(self) -> set[ir.Node]:
        return readers(self.dq.outputs[0])

    def _decoders(self) -> set[ir.Node]:
        return {self.dq}

    def _stored_groups(self, s: np.ndarray) -> np.ndarray:
        """Stored-layout 2-D values -> [G, L]."""
        if self.mode == "tensor":
            return s.reshape(1, -1)
        if self.mode == "axis":
            return np.moveaxis(s, self.axis, 0).reshape(s.shape[self.axis], -1)
        moved = np.moveaxis(s, self.axis, -1).astype(np.float32)
        blocks = -(-moved.shape[1] // self.block)
        pad = np.zeros((moved.shape[0], blocks * self.block - moved.shape[1]), np.float32)
        return np.concatenate([moved, pad], axis=1).reshape(-1, self.block)

    def _stored_ungroup(self, g: np.ndarray) -> np.ndarray:
        if self.mode == "tensor":
            return g.reshape(self.stored_shape)
        length, other = self.stored_shape[self.axis], self.stored_shape[1 - self.axis]
        if self.mode == "axis":
            return np.moveaxis(g.reshape(length, other), 0, self.axis)
        return np.moveaxis(g.reshape(other, -1)[:, :length], -1, self.axis)

    def _groups(self, w: np.ndarray) -> np.ndarray:
        return self._stored_groups(w.T if self.layout == "in_out" else w)

    def _ungroup(self, g: np.ndarray) -> np.ndarray:
        s = self._stored_ungroup(g)
        return np.ascontiguousarray(s.T if self.layout == "in_out" else s)

    def _per_group(self, stored: np.ndarray) -> np.ndarray:
        """A scale or zero point tensor -> [G], in the groups' order."""
        return (np.moveaxis(stored, self.axis, -1) if self.mode == "blocked" else stored).reshape(-1)

    def _as_stored(self, per_group: np.ndarray, like: np.ndarray) -> np.ndarray:
        """[G] -> a scale or zero point tensor shaped and typed like ``like`` (inverse of ``_per_group``)."""
        if self.mode == "blocked":
            per_group = np.moveaxis(per_group.reshape(np.moveaxis(like, self.axis, -1).shape), -1, self.axis)
        return per_group.reshape(like.shape).astype(like.dtype)

    def _state(self, arrays: Arrays) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q = self._stored_groups(arrays["q"].astype(np.float32))
        scale = self._per_group(arrays["scales"]).astype(np.float64)
        zero = self._per_group(arrays["zeros"]).astype(np.float64) if "zeros" in arrays else np.zeros(len(scale))
        return q, scale, zero

    def _stored(self, arrays: Arrays, q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> Arrays:
        out = {"q": self._stored_ungroup(q).astype(arrays["q"].dtype),
               "scales": self._as_stored(scale, arrays["scales"])}
        if "zeros" in arrays:
            out["zeros"] = self._as_stored(zero, arrays["zeros"])
        return out

    def _rewire(self, node: ir.Node, new: dict[str, ir.Value]) -> None:
        """Give ``node`` its own DequantizeLinear (and the Transpose it reads through, if any) over ``new``."""
        inputs = [new["q"], new["scales"]] + ([new["zeros"]] if "zeros" in new else [])
        decoded = ir.Node(self.dq.domain, "DequantizeLinear", inputs, list(self.dq.attributes.values()),
                          name=f"{new['q'].name}/DequantizeLinear")
        steps = [decoded]
        index = next(i for i, v in enumerate(node.inputs) if v is not None and behind(v, self.dq.outputs[0]))
        operand, chain = node.inputs[index], []
        while operand is not self.dq.outputs[0]:
            chain.append(operand.producer())
            operand = operand.producer().inputs[0]
        for step in reversed(chain):
            steps.append(ir.Node(step.domain, step.op_type, [steps[-1].outputs[0]], list(step.attributes.values()),
                                 name=f"{decoded.name}/{step.op_type}"))
        node.graph.insert_before(node, steps)
        node.replace_input_with(index, steps[-1].outputs[0])
