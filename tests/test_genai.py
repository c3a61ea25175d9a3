"""onnxruntime-genai builder graphs in ONNX Runtime: tiny llama / qwen2 / mistral / phi3 built fp32 with and without
q/k/v fusion and fp16; merge, dynamic and LoRA-ready slots + export-adapter against PEFT's eager logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builders import make_adapter
from genai import first_logits
from lorapass.onnx.rewrite import rewrite
from lorapass.ort_adapter import export_adapter
from lorapass.rules import LoraRule

BUILDS = {"fp32-fused": ("fp32", {}), "fp32-unfused": ("fp32", {"fuse_qkv": "false"}), "fp16": ("fp16", {})}
ADAPTERS = {  # the adapters people train: every linear, or q and v; Phi-3 names its own packed modules
    "llama": {"all-linear": "all-linear", "qv": ["q_proj", "v_proj"]},
    "qwen2": {"all-linear": "all-linear", "qv": ["q_proj", "v_proj"]},
    "mistral": {"all-linear": "all-linear", "qv": ["q_proj", "v_proj"]},
    "phi3": {"all-linear": "all-linear", "packed": ["qkv_proj", "gate_up_proj"]},
}
SEEDS = {"llama": 0, "qwen2": 1, "mistral": 2, "phi3": 3}
PROMPT = np.array([[5, 17, 33, 8, 61, 40, 12]], np.int64)
FP32_TOL = 1e-4


@pytest.fixture(scope="module")
def references(genai, tmp_path_factory):
    """family -> (model, {adapter: (dir, PEFT logits)}, base logits): real PEFT adapters with non-zero B."""
    cache = {}

    def get(family):
        if family not in cache:
            model, _ = genai.model(family, SEEDS[family])
            folder = tmp_path_factory.mktemp(f"{family}_adapters")
            adapters = {}
            for i, (name, targets) in enumerate(ADAPTERS[family].items()):
                peft_model = make_adapter(model, folder / name, seed=i, r=8, lora_alpha=2, target_modules=targets)
                with torch.no_grad():
                    adapters[name] = (folder / name, peft_model(input_ids=torch.tensor(PROMPT)).logits.numpy())
            with torch.no_grad():
                base = model(input_ids=torch.tensor(PROMPT)).logits.numpy()
            cache[family] = (model, adapters, base)
        return cache[family]

    return get


def rel(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("family", list(ADAPTERS))
def test_merge_dynamic_and_slots_match_peft(genai, references, tmp_path, family, build):
    precision, extra = BUILDS[build]
    out = genai.build(family, precision, seed=SEEDS[family], **extra)
    _, adapters, base_ref = references(family)
    base_err = rel(first_logits(out / "model.onnx", PROMPT), base_ref)
    tol = FP32_TOL if precision == "fp32" else 2 * base_err  # fp16: within twice the export's own error
    assert base_err <= (FP32_TOL if precision == "fp32" else 5e-3), base_err
    slots = tmp_path / "slots" / "model.onnx"
    rewrite(out / "model.onnx", slots, rules=LoraRule(name="slots", target_modules="all-linear", r=8, strategy="dynamic"))
    for name, (directory, expected) in adapters.items():
        merged, dynamic = tmp_path / f"merged_{name}" / "model.onnx", tmp_path / f"dynamic_{name}" / "model.onnx"
        rewrite(out / "model.onnx", merged, adapter=str(directory), strategy="merge")
        rewrite(out / "model.onnx", dynamic, adapter=str(directory), strategy="dynamic")
        adapter_file = export_adapter(str(directory), slots, tmp_path / f"{name}.onnx_adapter")
        errors = {"merge": rel(first_logits(merged, PROMPT), expected),
                  "dynamic": rel(first_logits(dynamic, PROMPT), expected),
                  "slots": rel(first_logits(slots, PROMPT, adapter_file), expected)}
        print(f"{family} {build} {name}: base {base_err:.1e}", " ".join(f"{k} {v:.1e}" for k, v in errors.items()))
        assert max(errors.values()) <= tol, (errors, tol)
        assert rel(base_ref, expected) > 50 * tol  # the adapter moves the logits far beyond the tolerance

