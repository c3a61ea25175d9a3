"""The merge kernel (lorapass/onnx/fold.py) and the block writer: exactly a plain numpy reference's bits.

The reference is ``(W.astype(float32) + L @ R).astype(W.dtype)``. Its only rounding that depends on how the
product is summed is L @ R, so the exact tests draw L and R whose products and sums are exact in float32 (small
integers times powers of two): any correct kernel then has the reference's bits, and what is tested is the
add, the one rounding to nearest even (ties, subnormals, overflow to inf), the layout and the blocking.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

from lorapass.onnx import fold as kernel
from lorapass.onnx import save
from lorapass.onnx.save import _Writer

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64}
SHAPES = [(1, 1), (1, 7), (2, 3), (3, 5), (37, 129), (300, 17)]  # one row, odd sizes, many blocks at BLOCK=64


def exact_case(rows: int, cols: int, dtype, rank: int = 16, seed: int = 0):
    """W with normal, subnormal and near-overflow rows; L, R whose product is exact in float32."""
    rng = np.random.default_rng(seed)
    kind = np.arange(rows) % 3  # 0: weights ~0.05, 1: subnormal-sized (fp16), 2: near the top of fp16's range
    top = 65504.0 if np.dtype(dtype) == np.float16 else 3e4
    w = np.where(kind[:, None] == 0, rng.normal(0, 0.05, (rows, cols)),
                 np.where(kind[:, None] == 1, rng.normal(0, 3e-6, (rows, cols)), top * rng.choice([-1, 1], (rows, cols))))
    scale = np.array([1.0, 2.0**-8, 2.0**14])[kind]  # updates tiny next to tiny weights, large enough to overflow
    left = (rng.integers(-2, 3, (rows, rank)) * 0.5 * scale[:, None]).astype(np.float32)
    right = (rng.integers(-1024, 1025, (rank, cols)) * 2.0**-20).astype(np.float32)
    return w.astype(dtype), left, right


def reference(w: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    if w.dtype == np.float64:
        return w + left.astype(np.float64) @ right.astype(np.float64)
    with np.errstate(over="ignore"):  # the near-overflow rows round to inf on purpose
        return (w.astype(np.float32) + left @ right).astype(w.dtype)


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint64 if a.dtype.itemsize == 8 else np.uint32 if a.dtype.itemsize == 4 else np.uint16)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(kernel, "BLOCK", 64)  # a few rows per block: block edges everywhere


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
def test_fold_has_the_reference_bits(small_blocks, dtype, shape):
    w, left, right = exact_case(*shape, DTYPES[dtype])
    expected = reference(w, left, right)
    got = kernel.fold(w, left, right)
    assert got.dtype == w.dtype and got.shape == w.shape
    assert np.array_equal(bits(got), bits(expected))


def test_exact_cases_exercise_ties_subnormals_and_overflow():
    """The exact data really reach the hard roundings: ties to even, fp16 subnormals, overflow to inf."""
    w, left, right = exact_case(300, 17, np.float16)
    s = (w.astype(np.float32) + left @ right).astype(np.float64)
    with np.errstate(over="ignore"):
        down = s.astype(np.float16)
        other = np.nextafter(down, np.where(s > down, np.float16(np.inf), np.float16(-np.inf)).astype(np.float16))
    ties = (s != down) & (np.abs(s - down) == np.abs(other.astype(np.float64) - s))
    assert ties.sum() > 10
    assert ((np.abs(down) < np.finfo(np.float16).tiny) & (down != 0)).sum() > 10
    assert np.isinf(down).sum() > 10 and np.isfinite(w).all()
    wb, left, right = exact_case(300, 17, ml_dtypes.bfloat16)
    s = wb.astype(np.float32) + left @ right
    assert (s.view(np.uint32) & 0xFFFF == 0x8000).sum() > 10  # bfloat16 ties: the low half is exactly one half


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_blocking_never_changes_bits_and_stays_within_one_ulp(monkeypatch, dtype):
    """Random (inexact) L, R: blocked and one-shot folds agree bit for bit, and round the reference within an ulp."""
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.05, (301, 67)).astype(DTYPES[dtype])
    left, right = rng.normal(0, 0.1, (301, 8)).astype(np.float32), rng.normal(0, 0.1, (8, 67)).astype(np.float32)
    whole = kernel.fold(w, left, right)
    monkeypatch.setattr(kernel, "BLOCK", 3 * 67)  # blocks of 3 rows, the last of 4 (301 = 99 * 3 + 4)
    assert [s.stop - s.start for s in kernel.blocks(301, 67)][-1] == 4
    assert np.array_equal(bits(kernel.fold(w, left, right)), bits(whole))
    w64, l64, r64 = w.astype(np.float64), left.astype(np.float64), right.astype(np.float64)
    exact = w64 + l64 @ r64
    ulp = np.abs(exact) * 2.0 ** -{"float16": 10, "bfloat16": 7, "float32": 23}[dtype]  # >= one ulp of the result
    accumulation = 16 * 2.0**-24 * (np.abs(w64) + np.abs(l64) @ np.abs(r64))  # float32 sums, before the rounding
    assert np.all(np.abs(whole.astype(np.float64) - exact) <= ulp + accumulation)


@pytest.mark.parametrize("rows,cols", [(1, 9), (2, 9), (5, 9), (6, 9), (7, 9), (1000, 1)])
def test_blocks_cover_every_row_once_and_never_one_row(small_blocks, rows, cols):
    spans = list(kernel.blocks(rows, cols))
    assert spans[0].start == 0 and spans[-1].stop == rows
    assert all(a.stop == b.start for a, b in zip(spans, spans[1:]))
    assert all(s.stop - s.start >= 2 for s in spans) or rows == 1


def test_read_maps_external_data_read_only(tmp_path):
    data = np.arange(5 * 7, dtype=np.float16).reshape(5, 7)
    (tmp_path / "w.data").write_bytes(b"\0" * 100 + data.tobytes())  # an offset off the page boundary
    tensor = ir.ExternalTensor("w.data", 100, data.nbytes, ir.DataType.FLOAT16, shape=ir.Shape([5, 7]), name="w",
                               base_dir=tmp_path)
    got = kernel.read(tensor)
    assert np.array_equal(got, data) and not got.flags.writeable


def test_folded_tensor_numpy_keeps_its_shape():
    w, left, right = exact_case(4, 6, np.float16)
    tensor = kernel.FoldedTensor(lambda: (w, left, right), ir.DataType.FLOAT16, ir.Shape([4, 3, 2]), name="t")
    assert np.array_equal(bits(tensor.numpy()), bits(reference(w, left, right).reshape(4, 3, 2)))


def test_writer_streams_folded_chunks_after_the_copy(small_blocks, tmp_path, monkeypatch):
    """Many chunks, two fold threads (one preads W from its file), one writer: the copy, then each fold in place."""
    monkeypatch.setattr(save, "_CHUNK", 700)  # a few blocks per chunk
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(bytes(range(256)) * 128)
    cases = [exact_case(37, 129, np.float16, seed=1), exact_case(300, 17, ml_dtypes.bfloat16, seed=2)]
    w, left, right = cases[1]  # W mapped from a file, as read() gives it: the fold threads pread its rows
    (tmp_path / "w.data").write_bytes(b"\0" * 4100 + w.tobytes())
    mapped = kernel.read(ir.ExternalTensor("w.data", 4100, w.nbytes, ir.DataType.BFLOAT16, shape=ir.Shape(w.shape),
                                           name="w", base_dir=tmp_path))
    assert kernel.location(mapped) == (str(tmp_path / "w.data"), 4100)
    assert kernel.location(mapped[7:]) == (str(tmp_path / "w.data"), 4100 + 7 * w.shape[1] * 2)
    assert kernel.location(mapped[:, 1:]) is None and kernel.location(w) is None
    cases[1] = (mapped, left, right)
    offsets = [1000, 1000 + cases[0][0].nbytes + 24]
    with _Writer(workers=2) as io:
        io.submit(lambda: dst.write_bytes(src.read_bytes()))  # a copy that truncates dst, as the real one does
        for (w, left, right), offset in zip(cases, offsets):
            io.fold(dst, offset, w, left, right)
        io.drain()
    out, expected = dst.read_bytes(), bytearray(src.read_bytes())
    for (w, left, right), offset in zip(cases, offsets):
        expected[offset:offset + w.nbytes] = reference(np.asarray(w), left, right).tobytes()
    assert out == bytes(expected)
