"""One command line: ``analyse`` takes rewrite's ``--target/--rank/--alpha`` shorthand, and progress bars show on a
terminal only (never when stderr is piped, never with ``--json``)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import yaml

from lorapass.cli import main

ROOT = Path(__file__).resolve().parents[1]
H100 = str(ROOT / "hw_specs" / "h100.yaml")
L7 = str(ROOT / "models" / "llama2-7b.yaml")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_analyse_shorthand_equals_the_same_rule_as_a_file(tmp_path, capsys):
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"name": "target", "target_modules": ["q_proj", "v_proj"], "r": 16, "lora_alpha": 32,
                                     "strategy": "dynamic"}))
    common = ["analyse", L7, "--hw", H100, "--batch", "4", "--seq", "512", "--gen", "32", "--json"]
    assert main([*common, "--rules", str(rules)]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert main([*common, "--target", "q_proj", "v_proj", "--rank", "16", "--alpha", "32"]) == 0
    shorthand = json.loads(capsys.readouterr().out)
    assert shorthand == from_file and shorthand["strategy"] == "dynamic" and shorthand["lora_sites"] == 64
    assert main([*common, "--target", "all-linear", "--rank", "8", "--strategy", "merge"]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert merged["strategy"] == "merge" and merged["lora_sites"] == 7 * 32


def test_analyse_shorthand_does_not_mix_with_an_adapter(tmp_path, capsys):
    assert main(["analyse", L7, "--hw", H100, "--target", "q_proj", "--adapter", str(tmp_path)]) == 2
    assert "--target" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny(exported, tmp_path_factory):
    from builders import make_adapter

    model, onnx_path = exported("llama")
    adapter = tmp_path_factory.mktemp("progress") / "adapter"
    make_adapter(model, adapter, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    return onnx_path, adapter


@pytest.mark.parametrize("stderr,flags,shown", [(Terminal, [], True), (io.StringIO, [], False),
                                                (Terminal, ["--json"], False)], ids=["terminal", "piped", "json"])
def test_progress_bar_only_on_a_terminal_without_json(tiny, tmp_path, monkeypatch, capsys, stderr, flags, shown):
    onnx_path, adapter = tiny
    err = stderr()
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["rewrite", str(onnx_path), "--adapter", str(adapter), "--strategy", "merge",
                 "-o", str(tmp_path / "m.onnx"), *flags]) == 0
    assert ("writing tensors" in err.getvalue()) is shown
    assert "writing tensors" not in capsys.readouterr().out
