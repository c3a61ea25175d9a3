"""Bad input never yields a silently wrong result or a traceback: each class is a typed error naming the file,
key, tensor or rule (exit 2), with nothing written and every input unchanged; --debug shows the traceback."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from safetensors.numpy import load_file, save_file

from reliability_case import cli, fails, ort_output, peft_output, tiny, tiny_template  # noqa: F401
from lorapass import rules as rules_module
from lorapass.rules import HARMLESS_KEYS, PEFT_KEYS

A_KEY = "base_model.model.q.lora_A.weight"


def merge(case, *extra) -> list:
    return ["rewrite", case.model, "--adapter", case.a, "-o", case.out / "o.onnx", *extra]


def edit_external(case, change) -> None:
    """Rewrite the input model's external-data entries in place with ``change(tensor_name, {key: value})``."""
    proto = onnx.load(case.model, load_external_data=False)
    for tensor in proto.graph.initializer:
        entries = {e.key: e.value for e in tensor.external_data}
        change(tensor.name, entries)
        del tensor.external_data[:]
        for key, value in entries.items():
            tensor.external_data.add(key=key, value=value)
    onnx.save(proto, case.model)


def edit_config(case, **changes) -> None:
    path = case.a / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_tensor(case, key: str, change) -> None:
    path = case.a / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors[key] = change(tensors[key])
    save_file(tensors, str(path))


# ------------------------------------------------------------------ models

def _no_graph(path):
    proto = onnx.ModelProto(ir_version=9)
    proto.opset_import.add(domain="", version=17)
    path.write_bytes(proto.SerializeToString())


def _no_opset(path):
    proto = onnx.load(path.with_name("model.onnx"), load_external_data=False)
    del proto.opset_import[:]
    path.write_bytes(proto.SerializeToString())


@pytest.mark.parametrize("make, message", [(lambda p: p.write_bytes(b""), "empty"), (_no_graph, "has no graph"),
                                           (_no_opset, "imports no opset")], ids=["empty", "no-graph", "no-opset"])
def test_not_a_model(tiny, capsys, make, message):
    bad = tiny.model.with_name("bad.onnx")
    make(bad)
    fails(capsys, tiny, ["rewrite", bad, "--adapter", tiny.a, "-o", tiny.out / "o.onnx"], 2, bad, message)
    fails(capsys, tiny, ["inspect", bad, "--adapter", tiny.a], 2, bad, message)


def test_external_data_length_disagreeing_with_shape_and_dtype(tiny, capsys):
    edit_external(tiny, lambda name, e: e.update(length="1020") if name == "k.weight" else None)
    fails(capsys, tiny, merge(tiny), 2, "'k.weight'", "length 1020", "must be 1024", tiny.model)


def test_external_data_without_length_is_sized_by_shape_and_dtype(tiny, capsys):
    edit_external(tiny, lambda name, e: e.pop("length"))
    data = tiny.model.with_name("model.onnx.data")
    full = data.read_bytes()
    data.write_bytes(full[:-8])  # the last tensor is now short by 8 bytes
    fails(capsys, tiny, merge(tiny), 2, "'v.weight'", "reads past the end")
    data.write_bytes(full)  # without length but complete: valid ONNX, merged correctly
    assert cli(capsys, merge(tiny))[0] == 0
    x = torch.randn(3, 16)
    np.testing.assert_allclose(ort_output(tiny.out / "o.onnx", x), peft_output(tiny, tiny.a, x), rtol=1e-5, atol=1e-5)


def test_nul_byte_in_an_external_data_location(tiny, capsys):
    edit_external(tiny, lambda name, e: e.update(location="model.onnx\0.data") if name == "q.weight" else None)
    fails(capsys, tiny, merge(tiny), 2, "'q.weight'", "NUL byte")


# ------------------------------------------------------------------ adapter tensors

@pytest.mark.parametrize("value, word", [(np.nan, "3 NaN, 0 Inf"), (np.inf, "0 NaN, 3 Inf")], ids=["nan", "inf"])
def test_non_finite_adapter_tensor(tiny, capsys, value, word):
    def poison(t):
        t = t.copy()
        t.reshape(-1)[[0, 5, 9]] = value
        return t

    edit_tensor(tiny, A_KEY, poison)
    fails(capsys, tiny, merge(tiny), 2, A_KEY, "3 non-finite value(s)", word, "adapter_model.safetensors")


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.int8])
def test_integer_or_bool_adapter_tensor(tiny, capsys, dtype):
    edit_tensor(tiny, A_KEY, lambda t: (t * 10).astype(dtype))
    fails(capsys, tiny, merge(tiny), 2, A_KEY, "must be floating point", np.dtype(dtype).name)


def test_bfloat16_adapter_is_read_through_torch(tiny, capsys):
    from safetensors.torch import load_file as load_torch, save_file as save_torch

    path = tiny.a / "adapter_model.safetensors"
    save_torch({k: v.to(torch.bfloat16) for k, v in load_torch(str(path)).items()}, str(path))
    assert cli(capsys, merge(tiny))[0] == 0
    x = torch.randn(3, 16)
    np.testing.assert_allclose(ort_output(tiny.out / "o.onnx", x), peft_output(tiny, tiny.a, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("payload, message", [
    (lambda t: [t[A_KEY]], "holds a list, not a dict of tensors"),
    (lambda t: {**t, A_KEY: "not a tensor"}, "is a str, not a tensor"),
    (lambda t: {**t, 3: t[A_KEY]}, "entry 3"),
    (lambda t: {**t, A_KEY: t[A_KEY].to(torch.int64)}, "must be floating point"),
    (lambda t: {**t, A_KEY: t[A_KEY] * float("nan")}, "non-finite"),
], ids=["list", "str-value", "int-key", "int-tensor", "nan"])
def test_pickled_adapter_payload(tiny, capsys, payload, message):
    from safetensors.torch import load_file as load_torch

    weights = tiny.a / "adapter_model.safetensors"
    torch.save(payload(load_torch(str(weights))), tiny.a / "adapter_model.bin")
    weights.unlink()
    fails(capsys, tiny, [*merge(tiny), "--allow-pickle"], 2, "adapter_model.bin", message)


# ------------------------------------------------------------------ rules and adapter configs

@pytest.mark.parametrize("changes, key", [({"lora_alpha": float("nan")}, "lora_alpha"),
                                          ({"lora_alpha": float("-inf")}, "lora_alpha"),
                                          ({"alpha_pattern": {"q": float("inf")}}, "alpha_pattern.q")],
                         ids=["alpha-nan", "alpha-inf", "pattern-inf"])
def test_non_finite_alpha_in_an_adapter_config(tiny, capsys, changes, key):
    edit_config(tiny, **changes)  # json writes the NaN / Infinity literals PEFT's own loader accepts
    fails(capsys, tiny, merge(tiny), 2, key, "finite", "adapter_config.json")


@pytest.mark.parametrize("text", ["lora_alpha: .nan", "lora_alpha: .inf", "alpha_pattern: {v: -.inf}"])
def test_non_finite_alpha_in_yaml_rules(tiny, capsys, text):
    rules = tiny.root / "rules.yaml"
    rules.write_text(f"target_modules: [k, q]\nr: 4\n{text}\n")
    fails(capsys, tiny, [*merge(tiny), "--rules", rules], 2, "rules.yaml", "finite")


def test_negative_alpha_negates_the_adapter_as_in_peft(tiny, capsys):
    edit_config(tiny, lora_alpha=-8)
    assert cli(capsys, merge(tiny))[0] == 0
    x = torch.randn(3, 16)
    expected = peft_output(tiny, tiny.a, x)
    np.testing.assert_allclose(ort_output(tiny.out / "o.onnx", x), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(expected, tiny.torch_model(x).detach().numpy(), atol=1e-3)


@pytest.mark.parametrize("text, key", [
    ("target_modules: [k, q]\nrank_pattern: {'(?i)Q': 2}", "(?i)Q"),
    ("target_modules: [k, q]\nalpha_pattern: {'(?s)v': 2}", "(?s)v"),
    ("target_modules: [k, q]\nlayers_to_transform: [0]\nlayers_pattern: '(?P<idx>layers)'", "(?P<idx>layers)"),
], ids=["inline-flag-rank", "inline-flag-alpha", "named-group-layers"])
def test_regex_keys_are_validated_as_matching_composes_them(tiny, capsys, text, key):
    import re

    re.compile(key)  # valid alone: only the composed expression fails
    rules = tiny.root / "rules.yaml"
    rules.write_text(text + "\n")
    fails(capsys, tiny, [*merge(tiny), "--rules", rules], 2, "rules.yaml", repr(key), "invalid regular expression")


def test_regex_key_in_an_adapter_config(tiny, capsys):
    edit_config(tiny, rank_pattern={"(?i)q": 4})
    fails(capsys, tiny, merge(tiny), 2, "adapter_config.json", "rank_pattern", "'(?i)q'")


def test_deeply_nested_adapter_config_and_rules(tiny, capsys):
    depth = 100_000
    (tiny.a / "adapter_config.json").write_text('{"target_modules": ' + "[" * depth + "]" * depth + "}")
    fails(capsys, tiny, merge(tiny), 2, "adapter_config.json", "nested too deeply")
    rules = tiny.root / "rules.yaml"
    rules.write_text("target_modules: " + "[" * depth + "]" * depth + "\n")
    fails(capsys, tiny, ["rewrite", tiny.model, "--rules", rules, "--strategy", "dynamic", "-o", tiny.out / "o.onnx"],
          2, "rules.yaml", "nested too deeply")


def test_self_referencing_yaml_rules(tiny, capsys):
    rules = tiny.root / "rules.yaml"
    rules.write_text("target_modules: &a [*a]\n")
    fails(capsys, tiny, ["rewrite", tiny.model, "--rules", rules, "--strategy", "dynamic", "-o", tiny.out / "o.onnx"],
          2, "rules.yaml", "target_modules")


def test_misspelt_adapter_config_key_is_refused_with_the_closest_known_key(tiny, capsys):
    config = json.loads((tiny.a / "adapter_config.json").read_text())
    config["lora_alhpa"] = config.pop("lora_alpha")
    (tiny.a / "adapter_config.json").write_text(json.dumps(config))
    err = fails(capsys, tiny, merge(tiny), 2, "adapter_config.json", "'lora_alhpa'", "closest known key: 'lora_alpha'",
                "--allow-unknown-keys")
    for args in (merge(tiny, "--allow-unknown-keys"), ["--allow-unknown-keys", *merge(tiny)]):
        code, err = cli(capsys, args)
        assert code == 0, err
        assert "lorapass: warning:" in err and "'lora_alhpa'" in err and "'lora_alpha'" in err and "ignored" in err


def test_unknown_key_in_yaml_rules_names_the_closest_known_key(tiny, capsys):
    rules = tiny.root / "rules.yaml"
    rules.write_text("target_modules: [k, q]\nrank_patern: {q: 2}\n")
    fails(capsys, tiny, [*merge(tiny), "--rules", rules], 2, "rank_patern", "closest known key: 'rank_pattern'")


def test_known_keys_are_peft_loraconfig_fields():
    """The policy's reference is PEFT's own LoraConfig; every field is read, refused when set, or harmless."""
    from peft import LoraConfig

    assert PEFT_KEYS == {f.name for f in dataclasses.fields(LoraConfig)}
    refused = {key for key, _, _ in rules_module._UNSUPPORTED}
    read = set(rules_module._PEFT_FIELDS) | rules_module.ADAPTER_KEYS  # by the rule, or into adapter kinds
    assert read | refused | HARMLESS_KEYS == PEFT_KEYS
    assert not (read | refused) & HARMLESS_KEYS


def test_harmless_keys_are_accepted_silently(tiny, capsys):
    edit_config(tiny, lora_dropout=0.3, task_type="CAUSAL_LM", peft_version="0.21.2", inference_mode=False,
                megatron_core="megatron.core", ensure_weight_tying=False)
    code, err = cli(capsys, merge(tiny))
    assert code == 0 and "warning" not in err


# ------------------------------------------------------------------ command line values

@pytest.mark.parametrize("rank", ["0", "-3", "1000000000"])
def test_absurd_slot_rank(tiny, capsys, rank):
    fails(capsys, tiny, ["rewrite", tiny.model, "--strategy", "dynamic", "--target", "q", "--rank", rank, "-o",
                         tiny.out / "o.onnx"], 2, f"--rank {rank}")


def test_non_finite_slot_alpha(tiny, capsys):
    fails(capsys, tiny, ["rewrite", tiny.model, "--strategy", "dynamic", "--target", "q", "--alpha", "nan", "-o",
                         tiny.out / "o.onnx"], 2, "--alpha", "lora_alpha", "finite")


def test_absurd_rank_in_rules(tiny, capsys):
    rules = tiny.root / "rules.yaml"
    rules.write_text("target_modules: [q]\nr: 1000000000\nstrategy: dynamic\n")
    fails(capsys, tiny, ["rewrite", tiny.model, "--rules", rules, "-o", tiny.out / "o.onnx"], 2, "rules.yaml", "r:")


# ------------------------------------------------------------------ export-adapter, analyse, export

@pytest.fixture
def dynamic(tiny, capsys):
    path = tiny.out / "dyn.onnx"
    assert cli(capsys, ["rewrite", tiny.model, "--strategy", "dynamic", "--target", "k", "q", "-o", path])[0] == 0
    return path


def _with_metadata(dynamic, value: str):
    proto = onnx.load(dynamic, load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == "lorapass.lora":
            prop.value = value
    bad = dynamic.with_name("bad.onnx")
    onnx.save(proto, bad)
    return bad


def _corrupt(path):
    path.write_bytes(b"\x08\x07garbage" * 20)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: d.with_name("missing.onnx"), "no such ONNX file"),
    (lambda d: _corrupt(d.with_name("bad.onnx")), "not a readable ONNX model"),
    (lambda d: _with_metadata(d, "{not json"), "'lorapass.lora' is not valid JSON"),
    (lambda d: _with_metadata(d, '{"path": "q"}'), "must be a JSON list of slot records"),
    (lambda d: _with_metadata(d, '[{"lora_A": 1, "lora_B": "x"}]'), "must be a JSON list of slot records"),
    (lambda d: _with_metadata(d, '[{"slot": "linear", "path": "q", "lora_A": "q.lora_A", "lora_B": "w.lora_B", '
                                 '"in": 8, "out": 8, "r": 2}]'), "'w.lora_B'"),
], ids=["missing", "corrupt", "metadata-json", "metadata-object", "metadata-types", "metadata-unknown-input"])
def test_export_adapter_bad_model(tiny, dynamic, capsys, make, message):
    model = make(dynamic)
    fails(capsys, tiny, ["export-adapter", tiny.a, "--model", model, "-o", tiny.out / "a.onnx_adapter"], 2,
          model.name, message)


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_analyse_spec_with_a_non_finite_peak(tmp_path, capsys, value):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = tmp_path / "spec.yaml"
    spec.write_text((repo / "hw_specs" / "h100.yaml").read_text().replace("fp32: 67 ", f"fp32: {value} "))
    code, err = cli(capsys, ["analyse", repo / "models" / "gpt2.yaml", "--hw", spec])
    assert code == 2 and "spec.yaml" in err and "peak_tflops.fp32" in err and "Traceback" not in err


@pytest.mark.parametrize("module, body, message", [
    ("raising_factory", "def make():\n    raise ZeroDivisionError('no model today')\n",
     "the factory raised ZeroDivisionError: no model today"),
    ("raising_import", "raise RuntimeError('broken at import')\n",
     "cannot import 'raising_import' (RuntimeError: broken at import)"),
], ids=["factory-raises", "import-raises"])
def test_export_factory_that_raises(tmp_path, capsys, module, body, message):
    (tmp_path / f"{module}.py").write_text(body)
    code, err = cli(capsys, ["export", f"{module}:make", "--app-dir", tmp_path, "-o", tmp_path / "out.onnx"])
    assert code == 2 and message in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == [f"{module}.py"]


# ------------------------------------------------------------------ --debug and unexpected exceptions

def test_debug_shows_the_traceback(tiny, capsys):
    bad = tiny.model.with_name("bad.onnx")
    bad.write_bytes(b"")
    for args in (["--debug", "inspect", bad], ["inspect", bad, "--debug"]):
        code, err = cli(capsys, args)
        assert code == 2 and "Traceback (most recent call last)" in err and "ModelError" in err
        assert err.rstrip().splitlines()[-1].startswith("lorapass: error: ")


@pytest.mark.parametrize("raised, code, message", [
    (RuntimeError("boom"), 3, "internal error: RuntimeError: boom (a bug in lorapass"),
    (MemoryError(), 1, "out of memory"),
    (KeyboardInterrupt(), 130, "interrupted"),
], ids=["bug", "memory", "ctrl-c"])
def test_unexpected_exceptions_are_summarised(tiny, capsys, monkeypatch, raised, code, message):
    from lorapass.onnx import rewrite

    def explode(*args, **kwargs):
        raise raised

    monkeypatch.setattr(rewrite, "find_sites", explode)
    err = fails(capsys, tiny, merge(tiny), code, message)
    assert len(err.strip().splitlines()) == 1
    status, err = cli(capsys, [*merge(tiny), "--debug"])
    assert status == code and "Traceback (most recent call last)" in err and "explode" in err
