"""The fx frontend on PEFT's DoRA and embedding LoRA: merge edits the program's state, dynamic inserts nodes, both
equal PEFT's unmerged eager output; merge also applies replaced modules, biases and token rows, which dynamic
refuses by name."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from builders import Wrapper, build, eager, example_ids, rel_err
from variants import make_variant

from lorapass import fx
from lorapass.errors import UnsupportedError
from lorapass.fx.trace import trace
from lorapass.onnx.slots import METADATA_KEY

TOL = 1e-4


@pytest.fixture(scope="module")
def llama():
    model = build("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, trace(Wrapper(model), (example_ids(),))


def run(program, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return program.module()(ids).numpy()


@pytest.mark.parametrize("config", [
    dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True),
    dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"], use_dora=True),
], ids=["dora-all-linear", "embedding", "embedding-dora"])
def test_fx_merge_and_dynamic_match_peft(llama, tmp_path, config):
    model, program = llama
    peft_model = make_variant(model, tmp_path / "ad", seed=4, **config)
    ids = example_ids(batch=2, seq=9, seed=3)
    expected = eager(peft_model, ids)
    assert rel_err(eager(model, ids), expected) > 1e-3
    merged = fx.apply(program, tmp_path / "ad", "merge")
    assert rel_err(run(merged.program, ids), expected) <= TOL
    dynamic = fx.apply(program, tmp_path / "ad", "dynamic")
    assert rel_err(run(dynamic.program, ids), expected) <= TOL
    records = dynamic.program.graph_module.meta[METADATA_KEY]
    assert {r["slot"] for r in records} == ({"embedding", "linear"} if "embed_tokens" in config["target_modules"]
                                            else {"linear"})
    assert all(("dora_factor" in r) == bool(config.get("use_dora")) for r in records)


def _traced(family: str, llama):
    if family == "llama":
        return llama
    model = build(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, trace(Wrapper(model), (example_ids(),))


@pytest.mark.parametrize("family, config", [
    ("llama", dict(target_modules=["v_proj"], modules_to_save=["lm_head"])),
    ("llama", dict(target_modules=["q_proj"], trainable_token_indices=[3, 5, 7])),
    ("gpt2", dict(target_modules=["c_attn"], trainable_token_indices=[2, 9])),  # the head is tied to the rows
    ("opt", dict(target_modules=["q_proj", "fc1"], bias="lora_only")),
    ("opt", dict(target_modules=["v_proj"], bias="all")),  # LayerNorm biases too: norm sites
    ("opt", dict(target_modules=["q_proj"], modules_to_save=["final_layer_norm"])),
    ("llama", dict(target_modules=["q_proj"], modules_to_save=["norm"])),  # every RMSNorm: a decomposed scale Mul
], ids=["modules-to-save-head", "tokens", "tokens-tied-head", "bias-lora-only", "bias-all", "modules-to-save-norm",
        "modules-to-save-rmsnorm"])
def test_fx_merge_applies_replacements_dynamic_refuses_them(llama, tmp_path, family, config):
    """Replaced modules, biases and token rows: merge equals PEFT's eager output; dynamic (whose adapter tensors
    are swappable buffers) refuses them by key, as it cannot swap a replacement."""
    model, program = _traced(family, llama)
    peft_model = make_variant(model, tmp_path / "ad", seed=5, r=4, lora_alpha=8, **config)
    ids = example_ids(batch=2, seq=9, seed=3)
    expected = eager(peft_model, ids)
    assert rel_err(eager(model, ids), expected) > 1e-3
    assert rel_err(run(fx.apply(program, tmp_path / "ad", "merge").program, ids), expected) <= TOL
    with pytest.raises(UnsupportedError, match=r"(replaced module|trainable tokens|lora).*fx frontend's dynamic"):
        fx.apply(program, tmp_path / "ad", "dynamic")


@pytest.mark.parametrize("family, targets", [("llama", ["v_proj", "down_proj"]), ("opt", ["q_proj", "fc1"])],
                         ids=["no-base-bias", "base-bias"])
def test_fx_lora_bias_merge_and_dynamic_match_peft(llama, tmp_path, family, targets):
    """Llama's linears have no bias (merge gives them one: PEFT's merge refuses, its unmerged output is the
    reference); OPT's have one (merge adds to it)."""
    model, program = _traced(family, llama)
    peft_model = make_variant(model, tmp_path / "ad", seed=6, r=4, lora_alpha=8, target_modules=targets, lora_bias=True)
    ids = example_ids(batch=2, seq=9, seed=3)
    expected = eager(peft_model, ids)
    before = {k: v.clone() for k, v in program.state_dict.items()}
    for strategy in ("merge", "dynamic"):
        result = fx.apply(program, tmp_path / "ad", strategy)
        assert rel_err(run(result.program, ids), expected) <= TOL, strategy
    assert all(torch.equal(program.state_dict[k], v) for k, v in before.items())  # the input program is untouched
    with torch.no_grad():  # the LoRA biases matter: without them PEFT's output moves
        for name, param in peft_model.named_parameters():
            if "lora_B" in name and name.endswith(".bias"):
                param.zero_()
    assert rel_err(eager(peft_model, ids), expected) > 1e-3
