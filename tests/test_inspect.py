"""`lorapass inspect`: the dry run lists sites, rule hits (as PEFT resolves them) and adapter keys that fit nothing."""

from __future__ import annotations

import json

from safetensors.numpy import load_file, save_file

from builders import make_adapter
from lorapass.cli import main


def test_inspect_json_reports_what_peft_targets(exported, tmp_path, capsys):
    model, onnx_path = exported("llama")
    peft_model = make_adapter(model, tmp_path / "ad", r=8, lora_alpha=16, target_modules=["q_proj", "gate_proj"],
                              rank_pattern={"gate_proj": 4}, use_rslora=True)
    assert main(["inspect", str(onnx_path), "--adapter", str(tmp_path / "ad"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prefix"] == "m" and report["problems"] == [] and report["unmatched_adapter_modules"] == {}
    hits = {s["path"]: s["target"] for s in report["sites"] if s["target"]}
    lora = {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert set(hits) == set(lora)
    for path, module in lora.items():
        assert hits[path]["r"] == module.r["default"]
        assert abs(hits[path]["scale"] - module.scaling["default"]) < 1e-12
    assert len(report["sites"]) == 16 and report["output_heads"] == ["lm_head"]  # 15 linears + embed_tokens


def test_inspect_names_adapter_modules_that_fit_nothing(exported, tmp_path, capsys):
    model, onnx_path = exported("llama")
    make_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    tensors = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    save_file({k.replace("self_attn", "attn"): v for k, v in tensors.items()}, str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert main(["inspect", str(onnx_path), "--adapter", str(tmp_path / "ad")]) == 0
    out = capsys.readouterr().out
    assert "adapter module 'model.layers.1.attn.q_proj' matches no site (closest: 'model.layers.1.self_attn.q_proj')" in out
    assert "problem:" in out


def test_inspect_with_rules_file_and_regex(exported, tmp_path, capsys):
    _, onnx_path = exported("gpt2")
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n- name: attn\n  target_modules: 'transformer\\.h\\.\\d+\\.attn\\.c_attn'\n  r: 4\n  lora_alpha: 8\n"
                     "- name: mlp\n  target_modules: [c_fc]\n  r: 2\n  lora_alpha: 2\n")
    assert main(["inspect", str(onnx_path), "--rules", str(rules), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    hits = {s["path"]: s["target"]["rule"] for s in report["sites"] if s["target"]}
    assert hits == {f"transformer.h.{i}.{m}": rule for i in (0, 1) for m, rule in (("attn.c_attn", "attn"), ("mlp.c_fc", "mlp"))}
    layouts = {s["path"]: s["layout"] for s in report["sites"]}
    assert layouts["transformer.h.0.attn.c_attn"] == "in_out"  # Conv1D keeps [in, out]
