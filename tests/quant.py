"""Quantized test models and their oracle.

Models: real exports quantized by ONNX Runtime's own tools (MatMulNBitsQuantizer, QDQ static quantization with a
small calibration reader). Oracle: PEFT on the *dequantized* model: every quantized weight is extracted as ONNX
Runtime computes it (its MatMulNBits or DequantizeLinear node run alone, on an identity matrix for MatMulNBits),
placed in the HF model where its float weight came from, and, for QDQ graphs, each linear's input is fake-quantized
with the graph's own activation scale and zero point (as the graph's QuantizeLinear/DequantizeLinear pair does).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from builders import example_ids

_OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]


def nbits(src: Path, dst: Path, block: int = 32, symmetric: bool = True, bits: int = 4, qdq: bool = False,
          external: bool = False) -> Path:
    """``src`` quantized by ORT's MatMulNBitsQuantizer (MatMulNBits nodes, or DequantizeLinear->MatMul with ``qdq``)."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, bits=bits,
                                          quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=config)
    quantizer.process()
    onnx.save(quantizer.model.model, str(dst), save_as_external_data=external, all_tensors_to_one_file=True,
              location=f"{dst.name}.data", size_threshold=0)
    return dst


def fuse_bias(src: Path, dst: Path) -> Path:
    """``src`` optimized offline by ONNX Runtime (its MatMulNBitsFusion folds each bias Add into input 5)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return dst


def calibration():
    """A few random prompts for ORT's static quantizer (its CalibrationDataReader)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Prompts(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input_ids": example_ids(2, 7, seed).numpy()} for seed in range(4)])

        def get_next(self):
            return next(self.batches, None)

    return Prompts()


def qdq_static(src: Path, dst: Path, per_channel: bool) -> Path:
    """``src`` statically quantized by ORT: QDQ format, the linears' int8 weights (per tensor or per channel) and
    uint8 inputs; their outputs and the activation-by-activation MatMuls of attention stay float (so that PEFT's
    model, fake-quantizing each linear's input, is the oracle)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    model = onnx.load(str(src))
    constants = {t.name for t in model.graph.initializer}
    products = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in constants]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(src), str(dst), calibration(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        op_types_to_quantize=["MatMul"], nodes_to_exclude=products, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8, extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]})
    return dst


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _dequantizer(graph: onnx.GraphProto, node: onnx.NodeProto) -> onnx.NodeProto | None:
    """The DequantizeLinear of ``node``'s weight (an initializer), if it has one."""
    producer = _producers(graph).get(node.input[1]) if len(node.input) > 1 else None
    constant = producer is not None and producer.input[0] in {t.name for t in graph.initializer}
    return producer if constant and producer.op_type == "DequantizeLinear" else None


def weights(path: Path) -> dict[str, np.ndarray]:
    """Quantized linear node -> its weight [out, in] as ONNX Runtime computes it (the op run alone)."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "accuracy_level"}
            k = attrs["K"]
            inputs = ["A", *node.input[1:5]]  # no bias
            alone = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", **attrs)
            graph = helper.make_graph([alone], "w", [helper.make_tensor_value_info("A", inits[node.input[2]].data_type, [k, k])],
                                      [helper.make_tensor_value_info("Y", inits[node.input[2]].data_type, None)],
                                      [inits[n] for n in inputs[1:] if n])
            eye = np.eye(k, dtype=helper.tensor_dtype_to_np_dtype(inits[node.input[2]].data_type))
            out[node.name] = _session(helper.make_model(graph, opset_imports=_OPSETS)).run(None, {"A": eye})[0].T
        elif node.op_type == "MatMul" and (dq := _dequantizer(model.graph, node)) is not None:
            graph = helper.make_graph([dq], "w", [], [helper.make_tensor_value_info(dq.output[0], inits[dq.input[1]].data_type, None)],
                                      [inits[n] for n in dq.input if n])
            opsets = [o for o in model.opset_import]
            out[node.name] = _session(helper.make_model(graph, opset_imports=opsets)).run(None, {})[0].T
    return out


def activation_grids(path: Path) -> dict[str, tuple[float, float, int, int]]:
    """MatMul node -> (scale, zero point, qmin, qmax) of the QuantizeLinear/DequantizeLinear pair on its input."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = _producers(model.graph)
    out = {}
    for node in model.graph.node:
        dq = producers.get(node.input[0]) if node.op_type == "MatMul" and _dequantizer(model.graph, node) else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        zero = inits[dq.input[2]]
        info = np.iinfo(zero.dtype)
        out[node.name] = (float(inits[dq.input[1]]), float(zero), int(info.min), int(info.max))
    return out


def _linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _candidates(model: torch.nn.Module) -> dict[tuple[str, ...], torch.Tensor]:
    """Module paths -> their float weight, single linears and the q/k/v and gate/up rows a builder packs."""
    linears = _linears(model)
    out = {(name,): m.weight.detach() for name, m in linears.items()}
    for name in linears:
        parent, _, leaf = name.rpartition(".")
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            paths = tuple(f"{parent}.{part}" for part in group)
            if leaf == group[0] and all(p in linears for p in paths):
                out[paths] = torch.cat([linears[p].weight.detach() for p in paths])
    return out


def placement(model: torch.nn.Module, extracted: dict[str, np.ndarray]) -> dict[str, tuple[str, ...]]:
    """Quantized node -> the module path(s) whose float weight it quantizes (the nearest weight of the same shape)."""
    candidates = _candidates(model)
    out = {}
    for node, w in extracted.items():
        scored = [(float(torch.linalg.norm(torch.from_numpy(w) - f) / torch.linalg.norm(f)), paths)
                  for paths, f in candidates.items() if tuple(f.shape) == w.shape]
        distance, paths = min(scored)
        assert distance < 0.5, f"{node}: no float weight near its dequantized weight ({distance:.2f})"
        out[node] = paths
    assert len(set(out.values())) == len(out), "two quantized nodes claim one module"
    return out


def load_weights(model: torch.nn.Module, extracted: dict[str, np.ndarray], where: dict[str, tuple[str, ...]]) -> torch.nn.Module:
    """A copy of ``model`` computing with the ``extracted`` weights (new parameters: a tied lm_head gets its own)."""
    model = copy.deepcopy(model)
    linears = _linears(model)
    for node, paths in where.items():
        rows = torch.from_numpy(np.ascontiguousarray(extracted[node]))
        at = 0
        for path in paths:
            module = linears[path]
            module.weight = torch.nn.Parameter(rows[at:at + module.out_features].clone(), requires_grad=False)
            at += module.out_features
    return model


def fake_quantize(model: torch.nn.Module, grids: dict[str, tuple], where: dict[str, tuple[str, ...]]) -> None:
    """Fake-quantize the input of each module (PEFT's LoRA layer, when wrapped) as the graph's QDQ pair does."""
    modules = dict(model.named_modules())
    for node, (scale, zero, qmin, qmax) in grids.items():
        for path in where[node]:
            module = next(m for name, m in modules.items() if name == path or name.endswith("." + path))

            def hook(_module, args, scale=scale, zero=zero, qmin=qmin, qmax=qmax):
                q = torch.clamp(torch.round(args[0] / scale) + zero, qmin, qmax)
                return ((q - zero) * scale,)

            module.register_forward_pre_hook(hook)


def run(path: Path, ids: torch.Tensor) -> np.ndarray:
    """The graph's output for ``ids`` in ONNX Runtime, computing in float: ORT fuses blocked int4 QDQ into
    MatMulNBits with int8 activations (accuracy level 4) unless told otherwise."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]


def quantized_bytes(path: Path, names: set[str] | None = None) -> dict[str, bytes]:
    """The stored bytes of the quantized weights' tensors (MatMulNBits B / scales / zero points, DequantizeLinear
    inputs), or of the initializers ``names``, for byte-for-byte comparisons."""
    model = onnx.load(str(path))
    if names is None:
        weights_ = {n for node in model.graph.node if node.op_type == "MatMulNBits" for n in node.input[1:4]}
        weights_ |= {n for node in model.graph.node if node.op_type == "DequantizeLinear" for n in node.input}
        names = weights_ & {t.name for t in model.graph.initializer}
    return {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer if t.name in names}
