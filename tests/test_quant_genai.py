"""int4 builds of the onnxruntime-genai model builder (``-p int4 -e cpu``: MatMulNBits, packed q/k/v, Qwen2's q/k/v
bias as an Add): dynamic and merge against PEFT on the dequantized model, verify, the requantization warning in
inspect and rewrite, and onnxruntime-genai running the dynamic graph with an adapter through ``og.Adapters``.

The builder's CPU default ``accuracy_level=4`` quantizes the activations of every MatMulNBits to int8 (the base
itself is ~1e-2 from its dequantized float model), so comparisons with PEFT use builds at ``accuracy_level=1``
(float compute, the same weights); the og test runs the default build against ONNX Runtime on the same graph."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from builders import make_adapter
from genai import feeds, first_logits
from lorapass.cli import main
from lorapass.onnx.rewrite import rewrite
from lorapass.ort_adapter import export_adapter
from lorapass.verify import verify
from quant import load_weights, placement, quantized_bytes, weights

import onnxruntime_genai as og  # in the test extra: a missing install fails, never skips

PROMPT = np.array([[5, 17, 33, 8, 61, 40, 12]], np.int64)
TOL = 1e-4
SEEDS = {"llama": 11, "qwen2": 12}


def rel(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def peft_logits(peft_model) -> np.ndarray:
    with torch.no_grad():
        return peft_model(input_ids=torch.tensor(PROMPT)).logits.numpy()


@pytest.fixture(scope="module", params=list(SEEDS))
def build(request, genai, tmp_path_factory):
    """(family, int4 model.onnx at accuracy level 1, its weights as ORT computes them, node -> modules, HF model)."""
    family = request.param
    out = genai.build(family, "int4", seed=SEEDS[family], accuracy_level="1")
    model, _ = genai.model(family, SEEDS[family])
    extracted = weights(out / "model.onnx")
    return family, out / "model.onnx", extracted, placement(model, extracted), model


def test_dynamic_matches_peft_and_keeps_the_int4_weights(build, tmp_path):
    family, path, extracted, where, model = build
    peft = make_adapter(load_weights(model, extracted, where), tmp_path / "ad", seed=1, r=8, lora_alpha=16,
                        target_modules="all-linear")
    assert any(len(paths) == 3 for paths in where.values())  # the builder packs q/k/v into one MatMulNBits
    out = tmp_path / "dynamic" / "model.onnx"
    rewrite(path, out, adapter=tmp_path / "ad", strategy="dynamic", progress=False)
    expected = peft_logits(peft)
    assert rel(first_logits(out, PROMPT), expected) <= TOL and rel(first_logits(path, PROMPT), expected) > 1e-2
    base = quantized_bytes(path)
    assert len(base) == 2 * len(extracted) and quantized_bytes(out, set(base)) == base  # B and scales, untouched
    report = verify(path, out, tmp_path / "ad", inputs=feeds(path, PROMPT))
    assert report.passed and report.outputs[0].max_rel <= TOL


def test_merge_report_and_the_warning_for_a_delta_below_one_step(build, tmp_path, capsys):
    family, path, extracted, where, model = build
    deq = load_weights(model, extracted, where)
    peft = make_adapter(deq, tmp_path / "ad", seed=2, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    out = tmp_path / "merged" / "model.onnx"
    report = rewrite(path, out, adapter=tmp_path / "ad", strategy="merge", progress=False).requantization
    merged = weights(out)
    lora = {n.removeprefix("base_model.model."): m for n, m in peft.named_modules() if hasattr(m, "lora_A")}
    sizes = {n: m.out_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    deltas, errors = [], []
    for node, paths in where.items():
        at = 0
        for p in paths:
            block, at = slice(at, at + sizes[p]), at + sizes[p]
            if p in lora:
                delta = lora[p].get_delta_weight("default").detach().numpy().astype(np.float64)
                deltas.append(np.linalg.norm(delta))
                errors.append(np.linalg.norm(merged[node][block] - (extracted[node][block] + delta)))
                assert abs(report["sites"][p]["kept"] - (1 - errors[-1] / deltas[-1])) < 1e-3
            else:  # k_proj, in the same packed node: rows re-rounded onto their own grid, unchanged
                assert np.allclose(merged[node][block], extracted[node][block], rtol=0, atol=1e-6)
    assert len(report["sites"]) == len(deltas) == 6
    assert abs(report["delta_kept"] - (1 - np.linalg.norm(errors) / np.linalg.norm(deltas))) < 1e-3
    assert rel(first_logits(out, PROMPT), peft_logits(load_weights(model, merged, where))) <= TOL
    assert report["warning"] is None

    # the same adapter scaled far below one int4 step: inspect and rewrite say merge loses it, and point to dynamic
    make_adapter(deq, tmp_path / "small", seed=2, r=8, lora_alpha=0.002, target_modules=["q_proj", "v_proj", "down_proj"])
    assert main(["inspect", str(path), "--adapter", str(tmp_path / "small"), "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)["requantization"]
    assert dry["delta_kept"] < 0.2 and "--strategy dynamic" in dry["warning"]
    assert main(["inspect", str(path), "--adapter", str(tmp_path / "small")]) == 0
    assert "warning: merging into the quantized weights keeps" in capsys.readouterr().out
    small = tmp_path / "small_merged" / "model.onnx"
    assert main(["rewrite", str(path), "--adapter", str(tmp_path / "small"), "--strategy", "merge", "-o", str(small), "--json"]) == 0
    captured = capsys.readouterr()
    written = json.loads(captured.out)["requantization"]
    assert "--strategy dynamic" in captured.err and abs(written["delta_kept"] - dry["delta_kept"]) < 1e-9


def test_og_runs_the_int4_dynamic_graph_with_an_adapter(genai, tmp_path):
    """The builder's default int4 build (accuracy level 4): LoRA-ready slots, an exported adapter active in
    onnxruntime-genai, the same logits as ONNX Runtime with that adapter file, and PEFT's within the base's own
    distance from its dequantized model."""
    out = genai.build("llama", "int4", seed=SEEDS["llama"])
    model, _ = genai.model("llama", SEEDS["llama"])
    path = out / "model.onnx"
    extracted = weights(path)
    deq = load_weights(model, extracted, placement(model, extracted))
    peft = make_adapter(deq, tmp_path / "ad", seed=3, r=8, lora_alpha=16, target_modules="all-linear")
    slots = tmp_path / "slots" / "model.onnx"
    assert main(["rewrite", str(path), "--target", "all-linear", "--rank", "16", "-o", str(slots)]) == 0
    adapter = export_adapter(tmp_path / "ad", slots, tmp_path / "ad.onnx_adapter")
    model_og = og.Model(str(slots.parent))
    adapters = og.Adapters(model_og)
    adapters.load(str(adapter), "ad")
    params = og.GeneratorParams(model_og)
    params.set_search_options(max_length=PROMPT.shape[1] + 1, do_sample=False)
    generator = og.Generator(model_og, params)
    generator.set_active_adapter(adapters, "ad")
    generator.append_tokens(PROMPT.astype(np.int32))
    logits = np.asarray(generator.get_output("logits"), np.float32)
    ort_logits = first_logits(slots, PROMPT, adapter)
    assert rel(logits[:, -1], ort_logits[:, -1]) <= 1e-5
    with torch.no_grad():
        base_error = rel(first_logits(path, PROMPT), deq(input_ids=torch.tensor(PROMPT)).logits.numpy())
    expected = peft_logits(peft)
    assert rel(logits[:, -1], expected[:, -1]) <= 2 * base_error and rel(first_logits(path, PROMPT)[:, -1], expected[:, -1]) > 0.1
