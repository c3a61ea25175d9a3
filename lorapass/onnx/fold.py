"""The merge kernel: W + L @ R in float32 block by block, cast back to W's dtype; and raw tensor reads."""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import onnx_ir as ir

_BLOCK = 1 << 21  # elements per block: W, its update and the float32 sum stay in cache


def fold(w: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """W + left @ right, computed in float32 block by block and cast back to W's dtype (round to nearest even).

    Uses torch's kernels when torch is installed (about 10x numpy's on fp16/bf16 weights), else numpy;
    both give the same bits.
    """
    rows = max(1, _BLOCK // max(1, w.shape[1]))
    try:
        import torch
    except ImportError:
        return _fold_numpy(w, left, right, rows)
    return _fold_torch(torch, w, left, right, rows)


def _fold_numpy(w: np.ndarray, left: np.ndarray, right: np.ndarray, rows: int) -> np.ndarray:
    out = np.empty_like(w)
    for start in range(0, w.shape[0], rows):
        update = left[start:start + rows] @ right
        update += w[start:start + rows]
        out[start:start + rows] = update
    return out


def _fold_torch(torch, w: np.ndarray, left: np.ndarray, right: np.ndarray, rows: int) -> np.ndarray:
    bf16 = w.dtype == ml_dtypes.bfloat16  # numpy has no bfloat16: cross over as raw 16-bit words
    with warnings.catch_warnings():  # W may be read-only (a memory map); it is only ever read
        warnings.simplefilter("ignore", UserWarning)
        weight = torch.from_numpy(w.view(np.uint16)).view(torch.bfloat16) if bf16 else torch.from_numpy(w)
    lhs, rhs = torch.from_numpy(left), torch.from_numpy(right)
    out = torch.empty_like(weight)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # blocks this small are memory-bound; a busy second core stalls a thread pool
    try:
        for start in range(0, w.shape[0], rows):
            block = weight[start:start + rows].to(torch.float32, copy=True)  # never write into W itself
            block.addmm_(lhs[start:start + rows], rhs)
            out[start:start + rows] = block
    finally:
        torch.set_num_threads(threads)
    return out.view(torch.uint16).numpy().view(ml_dtypes.bfloat16) if bf16 else out.numpy()


def read(tensor: ir.TensorProtocol) -> np.ndarray:
    """The tensor's values; external data is read with plain sequential reads (faster than faulting in a mmap)."""
    if not isinstance(tensor, ir.ExternalTensor):
        return tensor.numpy()
    dtype = np.dtype(tensor.dtype.numpy()).newbyteorder("<")
    array = np.fromfile(tensor.path, dtype=dtype, count=tensor.size, offset=tensor.offset or 0)
    return array.reshape(tensor.shape.numpy())
