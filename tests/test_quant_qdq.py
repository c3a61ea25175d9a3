"""QDQ graphs: a float Llama statically quantized by ONNX Runtime (``quantize_static``, QDQ format, int8 weights per
tensor and per channel, uint8 activations from a small calibration reader) and a Falcon quantized to blocked int4
QDQ by MatMulNBitsQuantizer (saved with external data). The oracle is PEFT on the dequantized model whose linears
fake-quantize their input as the graph's QuantizeLinear/DequantizeLinear pair does (tests/quant.py); the LoRA
branch reads the linear's own (dequantized) activation, so it sees the same input as PEFT's."""

from __future__ import annotations

import numpy as np
import pytest

from builders import eager, example_ids, make_adapter, rel_err
from lorapass.onnx.load import load_model
from lorapass.onnx.rewrite import rewrite
from lorapass.onnx.sites import find_sites
from lorapass.verify import verify
from quant import activation_grids, fake_quantize, load_weights, nbits, placement, qdq_static, quantized_bytes, run, weights

TOL = 1e-4
CASES = {  # family, exporter (dynamo?), how it is quantized, targets
    "llama-static-per-tensor": ("llama", True, "per-tensor", ["q_proj", "v_proj", "down_proj"]),
    "llama-static-per-channel": ("llama", True, "per-channel", "all-linear"),
    "falcon-int4-blocked": ("falcon", False, "blocked", ["query_key_value", "dense_4h_to_h"]),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, exported, tmp_path_factory):
    family, dynamo, how, targets = CASES[request.param]
    model, base = exported(family, dynamo=dynamo)
    folder = tmp_path_factory.mktemp(request.param)
    if how == "blocked":
        path = nbits(base, folder / "qdq.onnx", block=32, symmetric=False, qdq=True, external=True)
    else:
        path = qdq_static(base, folder / "qdq.onnx", per_channel=how == "per-channel")
    extracted = weights(path)
    where = placement(model, extracted)
    grids = activation_grids(path)
    dequantized = load_weights(model, extracted, where)
    peft = make_adapter(dequantized, folder / "adapter", seed=4, r=4, lora_alpha=8, target_modules=targets)
    fake_quantize(dequantized, grids, where)
    fake_quantize(peft, grids, where)
    return request.param, model, path, extracted, where, grids, dequantized, folder / "adapter", peft


def test_the_oracle_reproduces_the_quantized_graph(case):
    name, _, path, extracted, where, grids, dequantized, _, _ = case
    report = find_sites(load_model(path), wanted=[p for paths in where.values() for p in paths])
    sites = {s.node: s for s in report.sites}
    assert set(where) <= set(sites) and not report.unsupported
    for node, paths in where.items():
        assert sites[node].path == paths[0] and sites[node].layout.startswith("DequantizeLinear")
    assert ("per axis" in sites[next(iter(where))].layout) == name.endswith("per-channel")
    assert bool(grids) == ("static" in name)  # static quantization also quantizes every linear's input
    ids = example_ids(batch=2, seq=9, seed=5)
    assert rel_err(run(path, ids), eager(dequantized, ids)) <= TOL


def test_dynamic_matches_peft(case, tmp_path):
    _, _, path, extracted, where, _, _, adapter, peft = case
    out = tmp_path / "dynamic.onnx"
    rewrite(path, out, adapter=adapter, strategy="dynamic", progress=False)
    ids = example_ids(batch=2, seq=9, seed=5)
    expected = eager(peft, ids)
    assert rel_err(run(out, ids), expected) <= TOL and rel_err(run(path, ids), expected) > 1e-2
    base = quantized_bytes(path)
    assert len(base) >= 2 * len(extracted) and quantized_bytes(out, set(base)) == base  # untouched, byte for byte
    report = verify(path, out, adapter)  # its reference dequantizes on its own
    assert report.passed and report.outputs[0].max_rel <= TOL and report.outputs[0].changed_from_base > 1e-2


def test_merge_requantizes_with_the_same_scheme(case, tmp_path):
    name, model, path, extracted, where, grids, _, adapter, peft = case
    out = tmp_path / "merged.onnx"
    report = rewrite(path, out, adapter=adapter, strategy="merge", progress=False).requantization
    merged = weights(out)
    lora = {n.removeprefix("base_model.model."): m for n, m in peft.named_modules() if hasattr(m, "lora_A")}
    deltas, errors = [], []
    for node, (p,) in where.items():
        if p in lora:
            delta = lora[p].get_delta_weight("default").detach().numpy().astype(np.float64)
            error = np.linalg.norm(merged[node] - (extracted[node] + delta))
            assert abs(report["sites"][p]["kept"] - (1 - error / np.linalg.norm(delta))) < 1e-3
            deltas.append(np.linalg.norm(delta))
            errors.append(error)
        else:
            assert np.array_equal(merged[node], extracted[node])
    total = 1 - np.linalg.norm(errors) / np.linalg.norm(deltas)
    assert abs(report["delta_kept"] - total) < 1e-3
    merged_model = load_weights(model, merged, where)
    fake_quantize(merged_model, grids, where)
    ids = example_ids(batch=2, seq=9, seed=5)
    assert rel_err(run(out, ids), eager(merged_model, ids)) <= TOL
