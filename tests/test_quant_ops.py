"""Quantized weights against ONNX Runtime's own kernels, one node at a time: the stores and verify's independent
dequantizer read MatMulNBits (bits 2/4/8, blocks, zero points packed / float / default, g_idx, bias, fp16) and
DequantizeLinear (per tensor, per axis, blocked; int4..int16) weights exactly as ORT computes them; a merge writes
what ORT then reads; quantized ops lorapass cannot adapt are listed by ``inspect`` with the reason."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lorapass import dequant
from lorapass.cli import main
from lorapass.onnx.load import load_model
from lorapass.onnx.quantized import pack
from lorapass.onnx.save import save_model
from lorapass.onnx.sites import find_sites
from lorapass.onnx.storage import commit
from quant import calibration

OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
N = 24


def _model(nodes, inits, k, elem=TensorProto.FLOAT, extra=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", elem, ["b", k])],
                              [helper.make_tensor_value_info("Y", elem, None)], inits + list(extra))
    return helper.make_model(graph, opset_imports=OPSETS)


def _ort_weight(model: onnx.ModelProto, k: int, dtype=np.float32, bias: np.ndarray | None = None) -> np.ndarray:
    """W [out, in] as ONNX Runtime computes it: the model run on an identity matrix (minus its bias)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    y = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"A": np.eye(k, dtype=dtype)})[0].astype(np.float64)
    return (y - (0 if bias is None else bias)).T


def nbits_model(k: int, bits: int, block: int, zeros: str, g_idx: bool = False, bias: bool = False,
                dtype=np.float32, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray | None]:
    """One MatMulNBits node with random integers, scales, zero points (``none`` / ``packed`` / ``float``)."""
    rng = np.random.default_rng(seed)
    blocks = -(-k // block)
    ints = rng.integers(0, 2 ** bits, (N, blocks * block))
    scales = rng.uniform(-0.1, 0.1, (N, blocks)).astype(dtype)
    inits = [numpy_helper.from_array(pack(ints, bits).reshape(N, blocks, -1), "B"), numpy_helper.from_array(scales, "S")]
    inputs = ["A", "B", "S", "", "", ""]
    if zeros == "packed":
        zp = rng.integers(0, 2 ** bits, (N, -(-blocks * bits // 8) * 8 // bits))
        inits.append(numpy_helper.from_array(pack(zp, bits), "Z"))
        inputs[3] = "Z"
    elif zeros == "float":
        inits.append(numpy_helper.from_array(rng.uniform(0, 2 ** bits - 1, (N, blocks)).astype(dtype), "Z"))
        inputs[3] = "Z"
    if g_idx:
        inits.append(numpy_helper.from_array(rng.permutation(np.arange(k) // block).astype(np.int32), "G"))
        inputs[4] = "G"
    b = rng.standard_normal(N).astype(dtype) if bias else None
    if bias:
        inits.append(numpy_helper.from_array(b, "bias"))
        inputs[5] = "bias"
    while inputs[-1] == "":
        inputs.pop()
    node = helper.make_node("MatMulNBits", inputs, ["Y"], "/lin/MatMul_Q4", domain="com.microsoft", K=k, N=N,
                            bits=bits, block_size=block)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return _model([node], inits, k, elem), b


def _site(model: onnx.ModelProto, tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    graph = load_model(path)
    report = find_sites(graph)
    assert not report.unsupported, report.unsupported
    assert [s.path for s in report.sites] == ["lin"]
    return graph, report.sites[0], path


NBITS = [(bits, block, k, zeros) for bits in (2, 4, 8) for block, k in ((16, 64), (32, 80)) for zeros in ("none", "packed", "float")
         if not (bits == 8 and zeros == "float")]  # ORT's CPU kernel refuses float zero points at 8 bits


@pytest.mark.parametrize("bits,block,k,zeros", NBITS, ids=[f"{b}bit-block{s}-K{k}-{z}" for b, s, k, z in NBITS])
def test_nbits_store_and_reference_read_what_ort_computes(tmp_path, bits, block, k, zeros):
    model, _ = nbits_model(k, bits, block, zeros)
    expected = _ort_weight(model, k)
    _, site, _ = _site(model, tmp_path)
    assert site.op == "MatMulNBits" and (site.in_features, site.out_features) == (k, N)
    np.testing.assert_allclose(site.storage.read(), expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_allclose(dequant.matmul_nbits(model.graph.node[0], tensors), expected, rtol=0,
                               atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("case", ["g_idx-none", "g_idx-float", "bias", "fp16"])
def test_nbits_g_idx_bias_and_fp16(tmp_path, case):
    dtype = np.float16 if case == "fp16" else np.float32
    zeros = "float" if case == "g_idx-float" else "packed" if case in ("bias", "fp16") else "none"
    model, bias = nbits_model(64, 4, 16, zeros, g_idx=case.startswith("g_idx"), bias=case == "bias", dtype=dtype)
    expected = _ort_weight(model, 64, dtype, bias)
    _, site, _ = _site(model, tmp_path)
    assert site.dtype == ("float16" if case == "fp16" else "float")
    assert (site.bias is not None) == (case == "bias")
    tol = (2e-3 if case == "fp16" else 1e-6) * np.abs(expected).max()  # fp16: ORT's output is rounded to fp16
    np.testing.assert_allclose(site.storage.read(), expected, rtol=0, atol=tol)


def dq_model(qtype: int, mode: str, zero: bool, reader: str, seed: int = 0) -> tuple[onnx.ModelProto, int]:
    """``DequantizeLinear -> MatMul`` (or through Transpose, or into Gemm transB=1) over a random [K, N] integer weight."""
    rng = np.random.default_rng(seed)
    k = 40
    np_type = helper.tensor_dtype_to_np_dtype(qtype)
    info = {TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15)}.get(qtype) or (np.iinfo(np_type).min, np.iinfo(np_type).max)
    stored = (k, N) if reader == "matmul" else (N, k)
    axis = {"tensor": 1, "axis0": 0, "axis1": 1, "blocked": 0}[mode]
    scale_shape = {"tensor": (), "axis0": (stored[0],), "axis1": (stored[1],), "blocked": (-(-stored[0] // 16), stored[1])}[mode]
    q = rng.integers(info[0], info[1] + 1, stored)
    inits = [helper.make_tensor("W", qtype, stored, q.reshape(-1).tolist()),
             numpy_helper.from_array(rng.uniform(0.01, 0.1, scale_shape).astype(np.float32), "S")]
    inputs = ["W", "S"]
    if zero:
        inits.append(helper.make_tensor("Z", qtype, scale_shape, rng.integers(info[0], info[1] + 1, scale_shape).reshape(-1).tolist()))
        inputs.append("Z")
    attrs = {"axis": axis} | ({"block_size": 16} if mode == "blocked" else {})
    nodes = [helper.make_node("DequantizeLinear", inputs, ["Wd"], "/lin/DequantizeLinear", **attrs)]
    if reader == "matmul":
        nodes.append(helper.make_node("MatMul", ["A", "Wd"], ["Y"], "/lin/MatMul"))
    elif reader == "transpose":
        nodes += [helper.make_node("Transpose", ["Wd"], ["Wt"], "/lin/Transpose", perm=[1, 0]),
                  helper.make_node("MatMul", ["A", "Wt"], ["Y"], "/lin/MatMul")]
    else:
        nodes.append(helper.make_node("Gemm", ["A", "Wd"], ["Y"], "/lin/Gemm", transB=1))
    return _model(nodes, inits, k), k


DQ = [(TensorProto.INT8, "tensor", True, "matmul"), (TensorProto.UINT8, "tensor", True, "matmul"),
      (TensorProto.INT8, "axis1", False, "matmul"), (TensorProto.UINT8, "axis0", True, "transpose"),
      (TensorProto.INT16, "axis0", True, "gemm"), (TensorProto.INT4, "blocked", False, "matmul"),
      (TensorProto.UINT4, "blocked", True, "matmul"), (TensorProto.UINT8, "blocked", True, "gemm")]


@pytest.mark.parametrize("qtype,mode,zero,reader", DQ,
                         ids=[f"{TensorProto.DataType.Name(t).lower()}-{m}-{'zp' if z else 'nozp'}-{r}" for t, m, z, r in DQ])
def test_dequantize_linear_store_and_reference_read_what_ort_computes(tmp_path, qtype, mode, zero, reader):
    model, k = dq_model(qtype, mode, zero, reader)
    expected = _ort_weight(model, k)
    _, site, _ = _site(model, tmp_path)
    assert site.layout.startswith("DequantizeLinear")
    np.testing.assert_allclose(site.storage.read(), expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    reference = dequant.dequantize_linear(model.graph.node[0], tensors)  # the stored [A, B] tensor
    np.testing.assert_allclose(reference.T if reader == "matmul" else reference, expected, rtol=0,
                               atol=1e-6 * np.abs(expected).max())


MERGES = {"nbits-4bit-packed": lambda: (nbits_model(80, 4, 32, "packed")[0], 80),
          "nbits-8bit-symmetric": lambda: (nbits_model(64, 8, 16, "none")[0], 64),
          "nbits-2bit-packed": lambda: (nbits_model(64, 2, 16, "packed")[0], 64),
          "nbits-4bit-float-g_idx": lambda: (nbits_model(64, 4, 16, "float", g_idx=True)[0], 64),
          "dq-int8-axis-transpose": lambda: dq_model(TensorProto.INT8, "axis0", True, "transpose"),
          "dq-uint4-blocked": lambda: dq_model(TensorProto.UINT4, "blocked", True, "matmul")}


@pytest.mark.parametrize("scale", [3.0, 1e-3], ids=["large-delta", "small-delta"])
@pytest.mark.parametrize("case", list(MERGES))
def test_merge_writes_what_ort_reads_and_reports_what_survives(tmp_path, case, scale):
    """A merged low-rank delta, requantized and saved: ORT reads back what the store says it wrote, the integers
    stay in range (ORT computes them), the report's figure is recomputed from ORT's weights, and a delta far
    below one quantization step is (nearly) all lost."""
    model, k = MERGES[case]()
    graph, site, path = _site(model, tmp_path)
    base = _ort_weight(model, k)
    rng = np.random.default_rng(1)
    step = 2 * np.abs(base).max() / (site.storage.store.grid.qmax - site.storage.store.grid.qmin)  # ~ one integer step
    up, down = rng.standard_normal((N, 2)).astype(np.float32), rng.standard_normal((2, k)).astype(np.float32)
    up *= np.float32(scale * step / np.abs(up @ down).max())  # peaks of 3 steps, or 1/1000 of one
    site.storage.add(up, down)
    store = site.storage.store
    wanted = site.storage.read() + up @ down
    written = store.roundtrip(wanted)
    commit([store], graph.graph)
    save_model(graph, path, tmp_path / "merged.onnx", progress=False)
    merged = _ort_weight(onnx.load(str(tmp_path / "merged.onnx")), k)
    np.testing.assert_allclose(merged, written, rtol=0, atol=1e-6 * np.abs(base).max())
    [loss] = store.losses
    delta = up.astype(np.float64) @ down
    kept = 1 - np.linalg.norm(merged - (base + delta)) / np.linalg.norm(delta)
    # lorapass measures on the float32 merged weight: its rounding is ~1e-7 of |W|, 1e-4 of the small delta
    assert abs(loss.kept - kept) < 1e-3 and abs(loss.delta - np.linalg.norm(delta)) < 1e-3 * np.linalg.norm(delta)
    if scale > 1:
        assert kept > 0.5
    else:
        assert kept < 0.2 and np.abs(merged - base).max() <= step  # rounded back onto the base grid, or one step off


def test_quantized_ops_lorapass_cannot_adapt_are_listed(exported, tmp_path, capsys):
    """ORT's dynamic quantization (MatMulInteger) and QOperator static quantization (QLinearMatMul) of a real
    export, and MatMulNBits forms whose semantics lorapass does not read, are named by inspect with the reason."""
    from onnxruntime.quantization import QuantFormat, quantize_dynamic, quantize_static

    _, base = exported("llama")
    quantize_dynamic(str(base), str(tmp_path / "dynamic.onnx"), op_types_to_quantize=["MatMul"])
    quantize_static(str(base), str(tmp_path / "qop.onnx"), calibration(), quant_format=QuantFormat.QOperator,
                    op_types_to_quantize=["MatMul"])
    for name, weight_input in (("dynamic", {"MatMulInteger": 1, "DynamicQuantizeMatMul": 1}), ("qop", {"QLinearMatMul": 3})):
        assert main(["inspect", str(tmp_path / f"{name}.onnx"), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        proto = onnx.load(str(tmp_path / f"{name}.onnx"), load_external_data=False)
        constants = {t.name for t in proto.graph.initializer}
        weighted = {n.name: n.op_type for n in proto.graph.node
                    if n.op_type in weight_input and n.input[weight_input[n.op_type]] in constants}
        listed = {u["node"]: u["reason"] for u in report["unsupported_nodes"]}
        assert len(weighted) == 15 and set(listed) == set(weighted)  # every linear of the tiny Llama, nothing else
        assert all(listed[node].startswith(f"{op}: ") and "apply LoRA" in listed[node] or "QDQ" in listed[node]
                   for node, op in weighted.items())
        assert [s["path"] for s in report["sites"]] == ["model.embed_tokens"]  # only the float table is a site
    three_bit, _ = nbits_model(64, 4, 16, "none")
    next(a for a in three_bit.graph.node[0].attribute if a.name == "bits").i = 3
    for model, why in ((three_bit, "bits=3"), (nbits_model(64, 4, 16, "packed", g_idx=True)[0], "ignores packed zero points")):
        onnx.save(model, str(tmp_path / "odd.onnx"))
        assert main(["inspect", str(tmp_path / "odd.onnx")]) == 0
        out = capsys.readouterr().out
        assert "/lin/MatMul_Q4" in out and why in out and "0 sites" in out


def test_shared_quantized_tensors_are_copied_on_write(tmp_path):
    """A DequantizeLinear weight read by two linears, and a scale / zero point two weights share: merging one
    linear gives it its own tensors (in the layout it reads); the other keeps the original, byte for byte."""
    rng = np.random.default_rng(3)
    k = 32
    q = [helper.make_tensor(f"W{i}", TensorProto.INT8, (k, N), rng.integers(-128, 128, (k, N)).reshape(-1).tolist()) for i in (0, 1)]
    inits = q + [numpy_helper.from_array(np.float32(0.02), "S"), helper.make_tensor("Z", TensorProto.INT8, (), [3])]
    nodes = [helper.make_node("DequantizeLinear", ["W0", "S", "Z"], ["D0"], "/dq0"),
             helper.make_node("DequantizeLinear", ["W1", "S", "Z"], ["D1"], "/dq1"),
             helper.make_node("Transpose", ["D0"], ["T0"], "/shared/Transpose", perm=[1, 0]),
             helper.make_node("MatMul", ["A", "D0"], ["Ya"], "/a/MatMul"),  # a and b read the same weight
             helper.make_node("Gemm", ["A", "T0"], ["Yb"], "/b/Gemm", transB=1),
             helper.make_node("MatMul", ["A", "D1"], ["Yc"], "/c/MatMul"),  # c shares only the scale and zero point
             helper.make_node("Concat", ["Ya", "Yb", "Yc"], ["Y"], "/cat", axis=-1)]
    path = tmp_path / "shared.onnx"
    model = _model(nodes, inits, k)
    onnx.save(model, str(path))
    graph = load_model(path)
    sites = {s.path: s for s in find_sites(graph).sites}
    assert set(sites) == {"a", "b", "c"} and sites["a"].storage.store is sites["b"].storage.store
    before = _ort_weight(model, k)  # [3N, K]: a, b, c stacked
    up, down = rng.standard_normal((N, 1)).astype(np.float32) * 0.3, rng.standard_normal((1, k)).astype(np.float32)
    for path_ in ("a", "c"):
        sites[path_].storage.add(up, down)
    commit([sites["a"].storage.store, sites["c"].storage.store], graph.graph)
    save_model(graph, path, tmp_path / "merged.onnx", progress=False)
    merged = onnx.load(str(tmp_path / "merged.onnx"))
    after = _ort_weight(merged, k)
    rows = {name: slice(i * N, (i + 1) * N) for i, name in enumerate("abc")}
    np.testing.assert_allclose(after[rows["b"]], before[rows["b"]], rtol=0, atol=1e-6)  # b reads the original weight
    for name in "ac":
        kept = 1 - np.linalg.norm(after[rows[name]] - before[rows[name]] - up @ down) / np.linalg.norm(up @ down)
        assert kept > 0.5
    stored = {t.name: numpy_helper.to_array(t) for t in merged.graph.initializer}
    assert stored["S"] == np.float32(0.02) and stored["Z"] == 3
    assert [n.input[:] for n in merged.graph.node if n.name == "/dq0"] == [["W0", "S", "Z"]]
