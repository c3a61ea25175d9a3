"""Bad input: a typed error naming the culprit, exit code 2, no output left, the input untouched."""

from __future__ import annotations

import hashlib
import json
import shutil

import onnx
import pytest
from safetensors.numpy import load_file, save_file

from builders import make_adapter
from lorapass.cli import main


@pytest.fixture
def case(exported, tmp_path):
    """A llama export copied into its own folder, a matching adapter, and an empty output folder."""
    model, src = exported("llama")
    folder = tmp_path / "in"
    shutil.copytree(src.parent, folder)
    make_adapter(model, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    (tmp_path / "out").mkdir()
    return folder / "model.onnx", tmp_path / "adapter", tmp_path / "out"


def run_failing(capsys, args, out_dir, inputs):
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs if p.exists()}
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("lorapass: error: ")
    assert list(out_dir.iterdir()) == []  # nothing half-written, no temporaries
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs if p.exists()} == before
    return err


def test_rule_matching_no_site(case, capsys, tmp_path):
    model, adapter, out = case
    rules = tmp_path / "rules.yaml"
    rules.write_text("name: attn-only\ntarget_modules: [qkv_proj]\nr: 4\nlora_alpha: 8\n")
    err = run_failing(capsys, ["rewrite", str(model), "--rules", str(rules), "--strategy", "dynamic",
                               "-o", str(out / "o.onnx")], out, [model])
    assert "attn-only" in err


def test_corrupt_onnx(case, capsys, tmp_path):
    _, adapter, out = case
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07this is not a protobuf" * 50)
    err = run_failing(capsys, ["rewrite", str(bad), "--adapter", str(adapter), "-o", str(out / "o.onnx")], out, [bad])
    assert str(bad) in err


def test_adapter_for_another_model_shape(case, capsys, tmp_path):
    model, _, out = case
    import transformers as tf

    wide = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2))
    make_adapter(wide, tmp_path / "wide", r=4, lora_alpha=8, target_modules=["q_proj"])
    err = run_failing(capsys, ["rewrite", str(model), "--adapter", str(tmp_path / "wide"), "-o", str(out / "o.onnx")], out, [model])
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in err
    assert "[4, 48]" in err and "[4, 32]" in err  # both shapes
    assert "model.layers.0.self_attn.q_proj" in err


@pytest.mark.parametrize("missing", ["adapter_model.safetensors", "adapter_config.json"])
def test_missing_adapter_file(case, capsys, missing):
    model, adapter, out = case
    (adapter / missing).unlink()
    err = run_failing(capsys, ["rewrite", str(model), "--adapter", str(adapter), "-o", str(out / "o.onnx")], out, [model])
    assert missing in err


def test_pickled_adapter_needs_opt_in(case, capsys):
    import torch

    model, adapter, out = case
    tensors = {k: torch.from_numpy(v) for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    torch.save(tensors, adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    err = run_failing(capsys, ["rewrite", str(model), "--adapter", str(adapter), "-o", str(out / "o.onnx")], out, [model])
    assert "--allow-pickle" in err
    assert main(["rewrite", str(model), "--adapter", str(adapter), "--allow-pickle", "-o", str(out / "o.onnx")]) == 0


def test_adapter_names_that_fit_no_site_are_listed_with_the_closest(case, capsys, tmp_path):
    """The classic failure: an adapter keyed `attn` for a graph whose modules are `self_attn`."""
    model, adapter, out = case
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k.replace("self_attn", "attn"): v for k, v in tensors.items()}, str(renamed / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (renamed / "adapter_config.json").write_text(json.dumps(config))
    err = run_failing(capsys, ["rewrite", str(model), "--adapter", str(renamed), "-o", str(out / "o.onnx")], out, [model])
    assert "base_model.model.model.layers.0.attn.q_proj.lora_A.weight" in err
    assert "closest site: 'model.layers.0.self_attn.q_proj'" in err


def test_external_data_outside_the_model_folder(case, capsys, tmp_path):
    model, adapter, out = case
    proto = onnx.load(model, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secrets.data"
    evil = model.parent / "evil.onnx"
    onnx.save(proto, evil)
    (tmp_path / "secrets.data").write_bytes(b"\0" * 1024)
    err = run_failing(capsys, ["rewrite", str(evil), "--adapter", str(adapter), "-o", str(out / "o.onnx")], out, [evil])
    assert "outside the model's folder" in err and "../secrets.data" in err


def test_truncated_external_data(case, capsys):
    model, adapter, out = case
    data = model.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    err = run_failing(capsys, ["rewrite", str(model), "--adapter", str(adapter), "-o", str(out / "o.onnx")], out, [model])
    assert "model.onnx.data" in err


def test_output_may_not_overwrite_input(case, capsys):
    model, adapter, out = case
    before = model.read_bytes()
    assert main(["rewrite", str(model), "--adapter", str(adapter), "-o", str(model)]) == 2
    assert "must not overwrite" in capsys.readouterr().err
    assert model.read_bytes() == before


def test_unsupported_peft_feature_is_refused(case, capsys):
    model, adapter, out = case
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["layer_replication"] = [[0, 2], [1, 2]]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    err = run_failing(capsys, ["rewrite", str(model), "--adapter", str(adapter), "-o", str(out / "o.onnx")], out, [model])
    assert "layer_replication" in err


def test_failure_while_writing_leaves_nothing(case, monkeypatch):
    """An error in the middle of writing (disk full, a bad tensor) removes every temporary file."""
    from lorapass.onnx import save

    model, adapter, out = case

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(save, "_write_at", fail)
    assert main(["rewrite", str(model), "--adapter", str(adapter), "-o", str(out / "o.onnx")]) == 1
    assert list(out.iterdir()) == []
