"""Float models quantized by ONNX Runtime's MatMulNBitsQuantizer (int4, block 32), adapted by lorapass and checked
against PEFT on the dequantized model (tests/quant.py): symmetric and asymmetric, with a bias (an Add after the
node, or ORT's own fusion of it into input 5) and without. dynamic matches PEFT and leaves the quantized tensors
byte for byte; merge matches the same oracle up to the requantization error lorapass reports, and that report is
recomputed here from the weights ONNX Runtime reads out of the merged graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builders import eager, example_ids, make_adapter, rel_err, run_onnx
from lorapass.onnx.load import load_model
from lorapass.onnx.rewrite import rewrite
from lorapass.onnx.sites import find_sites
from lorapass.verify import verify
from quant import fuse_bias, load_weights, nbits, placement, quantized_bytes, weights

TOL = 1e-4
CASES = {  # family (TorchScript export: node names survive the quantizer), symmetric, bias placement, targets
    "opt-asymmetric-bias-add": ("opt", False, "add", ["q_proj", "k_proj", "v_proj", "out_proj"]),
    "opt-symmetric-bias-input": ("opt", True, "input", ["q_proj", "v_proj", "out_proj"]),
    "falcon-symmetric-no-bias": ("falcon", True, None, ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, exported, tmp_path_factory):
    """(name, HF model, quantized graph, its weights as ORT computes them, node -> module paths, PEFT adapter dir,
    PEFT over the dequantized model)."""
    family, symmetric, bias, targets = CASES[request.param]
    model, base = exported(family, dynamo=False)
    folder = tmp_path_factory.mktemp(request.param)
    path = nbits(base, folder / "int4.onnx", block=32, symmetric=symmetric)
    if bias == "input":
        path = fuse_bias(path, folder / "int4_fused.onnx")
    extracted = weights(path)
    where = placement(model, extracted)
    peft = make_adapter(load_weights(model, extracted, where), folder / "adapter", seed=3, r=4, lora_alpha=8,
                        target_modules=targets)
    return request.param, model, path, extracted, where, folder / "adapter", peft


def test_sites_are_the_quantized_linears(case):
    name, model, path, extracted, where, _, _ = case
    modules = dict(model.named_modules())
    report = find_sites(load_model(path), wanted=[p for paths in where.values() for p in paths])
    by_node = {s.node: s for s in report.sites}
    assert set(extracted) <= set(by_node) and not report.unresolved and not report.unsupported
    for node, paths in where.items():
        site = by_node[node]
        assert site.op == "MatMulNBits" and site.path == paths[0] and site.dtype == "float"
        assert site.layout.startswith("MatMulNBits int4, blocks of 32, " + ("packed zero points" if "asym" in name else "symmetric"))
        assert (site.bias is not None) == (modules[paths[0]].bias is not None)  # an Add after it, or its input 5


def test_dynamic_matches_peft_on_the_dequantized_model(case, tmp_path):
    _, model, path, extracted, _, adapter, peft = case
    out = tmp_path / "dynamic.onnx"
    result = rewrite(path, out, adapter=adapter, strategy="dynamic", progress=False)
    assert result.requantization is None  # nothing was requantized
    ids = example_ids(batch=2, seq=9, seed=5)
    expected = eager(peft, ids)
    assert rel_err(run_onnx(out, ids), expected) <= TOL
    assert rel_err(run_onnx(path, ids), expected) > 1e-2  # the adapter changes the output
    base = quantized_bytes(path)
    assert len(base) >= 2 * len(extracted) and quantized_bytes(out, set(base)) == base  # the int4 weights, untouched
    report = verify(path, out, adapter)  # its reference dequantizes on its own
    assert report.passed and report.outputs[0].max_rel <= TOL and report.outputs[0].changed_from_base > 1e-2


def test_merge_is_the_oracle_plus_the_reported_requantization_error(case, tmp_path):
    _, model, path, extracted, where, adapter, peft = case
    out = tmp_path / "merged.onnx"
    result = rewrite(path, out, adapter=adapter, strategy="merge", progress=False)
    report = result.requantization
    merged = weights(out)
    # the report, recomputed: 1 - ||Q(W + dW) - (W + dW)|| / ||dW|| per site, W and Q(.) as ORT computes them
    lora = {name.removeprefix("base_model.model."): m for name, m in peft.named_modules() if hasattr(m, "lora_A")}
    rows = {name: m.out_features for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    deltas, errors = {}, {}
    for node, paths in where.items():
        at = 0
        for p in paths:  # one module, or the modules a packed node stacks
            block = slice(at, at + rows[p])
            at = block.stop
            if p in lora:
                delta = lora[p].get_delta_weight("default").detach().numpy().astype(np.float64)
                deltas[p] = np.linalg.norm(delta)
                errors[p] = np.linalg.norm(merged[node][block] - (extracted[node][block] + delta))
    assert set(report["sites"]) == set(deltas)
    for p in deltas:
        assert abs(report["sites"][p]["kept"] - (1 - errors[p] / deltas[p])) < 1e-3
    total = 1 - np.sqrt(sum(e ** 2 for e in errors.values())) / np.sqrt(sum(d ** 2 for d in deltas.values()))
    assert abs(report["delta_kept"] - total) < 1e-3 and 0.3 < total < 1
    # the merged graph computes with exactly those weights: the oracle plus the reported error
    ids = example_ids(batch=2, seq=9, seed=5)
    assert rel_err(run_onnx(out, ids), eager(load_weights(model, merged, where), ids)) <= TOL
    deviation = rel_err(run_onnx(out, ids), eager(peft, ids))
    check = verify(path, out, adapter, inputs={"input_ids": ids.numpy()})  # its reference is the same oracle
    assert abs(check.outputs[0].max_rel - deviation) <= TOL and not check.passed
