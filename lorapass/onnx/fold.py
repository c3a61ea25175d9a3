"""The merge kernel: W + L @ R with float32 accumulation, rounded once (to nearest even) to W's dtype.

The arithmetic runs in ONNX Runtime's CPU kernels (MLAS): ``Cast(W) -> Gemm(L, R, W) -> Cast``, one small
session per dtype, fed numpy views without copies and writing into the caller's buffer. numpy has no SIMD
float16/bfloat16 casts (about 1.5 ns per element each way on this project's machines, three times MLAS's
whole fold), and torch costs a second to import. MLAS computes every element the same way whatever the row
blocking, except in a block of a single row (a gemv), so blocks never have one row unless W does: a blocked
fold has the bits of a one-shot ``Gemm`` on the whole tensor.

External tensors are read as read-only memory maps; a writer streaming a fold reads their rows with ``pread``
into a buffer that stays in cache (see :func:`location`): cheaper than faulting in and unmapping the map.
"""

from __future__ import annotations

import functools
import mmap
from collections.abc import Callable, Iterator

import ml_dtypes
import numpy as np
import onnx_ir as ir

BLOCK = 1 << 19
"""Elements per block: the float32 intermediates of one block stay in a core's L2 cache."""

_BF16 = np.dtype(ml_dtypes.bfloat16)
_ONNX_TYPES = {np.dtype(np.float32): 1, np.dtype(np.float16): 10, _BF16: 16}  # onnx.TensorProto data types


def blocks(rows: int, cols: int) -> Iterator[slice]:
    """Row ranges of about :data:`BLOCK` elements that cover ``rows``; none has one row unless ``rows`` is 1."""
    step = max(2, BLOCK // max(1, cols))
    start = 0
    while start < rows:
        stop = rows if rows - start < step + 2 else start + step  # never leave a one-row tail
        yield slice(start, stop)
        start = stop


def fold(w: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """W + left @ right in W's layout and dtype: float32 accumulation, one rounding to nearest even."""
    out = np.empty(w.shape, w.dtype)
    left, right = np.ascontiguousarray(left, np.float32), np.ascontiguousarray(right, np.float32)
    for rows in blocks(*w.shape):
        fold_into(out[rows], w[rows], left[rows], right)
    return out


def fold_into(out: np.ndarray, w: np.ndarray, left: np.ndarray, right: np.ndarray) -> None:
    """Write W + left @ right into ``out`` (any writable C-contiguous array of W's shape and dtype, e.g. a
    memory-mapped slot of the destination file). For one block, call with the same rows of ``out``, ``w`` and
    ``left``; two threads may fold different blocks at once.
    """
    left = np.ascontiguousarray(left, np.float32)
    right = np.ascontiguousarray(right, np.float32)
    if w.dtype not in _ONNX_TYPES:  # float64: no rounding to worry about, numpy's BLAS in W's own precision
        np.add(w, left.astype(w.dtype) @ right.astype(w.dtype), out=out)
        return
    if w.size == 0:
        return
    session = _session(w.dtype)
    binding = session.io_binding()
    binding.bind_ortvalue_input("W", _ortvalue(np.ascontiguousarray(w)))
    binding.bind_ortvalue_input("L", _ortvalue(left))
    binding.bind_ortvalue_input("R", _ortvalue(right))
    binding.bind_ortvalue_output("O", _ortvalue(out))
    session.run_with_iobinding(binding)


def _ortvalue(array: np.ndarray):
    from onnxruntime import OrtValue

    if array.dtype == _BF16:  # numpy has no bfloat16 buffer format: hand ORT the raw 16-bit words
        return OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), _ONNX_TYPES[_BF16])
    return OrtValue.ortvalue_from_numpy(array)


@functools.cache
def _session(dtype: np.dtype):
    """An ORT session computing O = Cast(Gemm(L, R, Cast(W, float)), dtype) on one thread (callers run blocks
    in parallel), graph optimisations off so the three ops run as written."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    kind = _ONNX_TYPES[dtype]
    nodes = [helper.make_node("Gemm", ["L", "R", "W32"], ["O32"])]
    if kind == TensorProto.FLOAT:
        nodes[0].input[2], nodes[0].output[0] = "W", "O"
    else:
        nodes = [helper.make_node("Cast", ["W"], ["W32"], to=TensorProto.FLOAT), *nodes,
                 helper.make_node("Cast", ["O32"], ["O"], to=kind)]
    graph = helper.make_graph(nodes, "fold", [helper.make_tensor_value_info("W", kind, ["m", "n"]),
                                              helper.make_tensor_value_info("L", TensorProto.FLOAT, ["m", "r"]),
                                              helper.make_tensor_value_info("R", TensorProto.FLOAT, ["r", "n"])],
                              [helper.make_tensor_value_info("O", kind, ["m", "n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def read(tensor: ir.TensorProtocol) -> np.ndarray:
    """The tensor's values; external data as a read-only ``np.memmap`` of its file (nothing read until used)."""
    if not isinstance(tensor, ir.ExternalTensor):
        return tensor.numpy()
    dtype = np.dtype(tensor.dtype.numpy()).newbyteorder("<")
    if tensor.size == 0:
        return np.empty(tensor.shape.numpy(), dtype)
    return np.memmap(tensor.path, dtype, "r", tensor.offset or 0, tuple(tensor.shape.numpy()))


def location(w: np.ndarray) -> tuple[str, int] | None:
    """(file, byte offset) of a C-contiguous array that maps a file (as :func:`read` gives), else None: a
    reader can then ``pread`` rows straight into its own cache-sized buffer instead of faulting the map in."""
    if not isinstance(w, np.memmap) or w.filename is None or not w.flags.c_contiguous or w.size == 0:
        return None
    base = np.frombuffer(w._mmap, np.uint8).ctypes.data  # the map starts at the offset rounded down to a granule
    return w.filename, w.offset - w.offset % mmap.ALLOCATIONGRANULARITY + (w.ctypes.data - base)


class FoldedTensor(ir.LazyTensor):
    """W + left @ right (W flattened to 2-D, the tensor of ``shape``), computed only when needed: ``numpy()``
    folds it whole, a writer (save_model) takes ``operands()`` and folds it block by block into the destination."""

    __slots__ = ("operands",)

    def __init__(self, operands: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]], dtype: ir.DataType,
                 shape: ir.Shape, name: str | None = None) -> None:
        def whole() -> ir.Tensor:
            return ir.Tensor(fold(*operands()).reshape(shape.numpy()), name=name)

        super().__init__(whole, dtype, shape, name=name)
        self.operands = operands
