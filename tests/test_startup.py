"""The lazy-import contract: the command line and ``import lorapass`` load only what a command needs.

Timings are the startup benchmark's job (benchmarks/startup_bench.py); these tests check which modules a fresh
interpreter has loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import lorapass

HEAVY = ("torch", "transformers", "peft", "matplotlib", "networkx", "onnxruntime", "onnx", "onnx_ir", "numpy",
         "pydantic", "yaml", "safetensors", "tqdm")


def loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_cli_and_help_load_nothing_heavy():
    for code in ("import lorapass.cli", "import lorapass.cli\nlorapass.cli.build_parser().format_help()"):
        modules = loaded_after(code)
        assert not {m for m in modules if m.split(".")[0] in HEAVY}, code
        ours = {m for m in modules if m.startswith("lorapass")}
        # the cost and fx packages are entered only for their subcommand parsers
        assert ours <= {"lorapass", "lorapass.lazy", "lorapass.cli", "lorapass.errors", "lorapass.atomic",
                        "lorapass.progress", "lorapass.shorthand", "lorapass.cost", "lorapass.cost.cli", "lorapass.fx",
                        "lorapass.fx.cli"}, ours


def test_import_lorapass_is_cheap_and_its_names_resolve_on_use():
    modules = loaded_after("import lorapass")
    assert {m for m in modules if m.startswith("lorapass")} == {"lorapass", "lorapass.lazy"}
    assert not {m for m in modules if m.split(".")[0] in HEAVY}
    assert "torch" not in loaded_after("import lorapass\nlorapass.rewrite, lorapass.Session, lorapass.LoraRule")
    from lorapass.fx.export import export
    from lorapass.onnx.rewrite import rewrite
    from lorapass.ort_adapter import Session, export_adapter
    from lorapass.rules import LoraRule, RuleSet

    assert (lorapass.export, lorapass.rewrite, lorapass.Session, lorapass.export_adapter, lorapass.LoraRule,
            lorapass.RuleSet) == (export, rewrite, Session, export_adapter, LoraRule, RuleSet)
    assert set(lorapass.__all__) <= set(dir(lorapass))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lorapass.nope  # noqa: B018


def test_cost_and_fx_packages_resolve_lazily():
    modules = loaded_after("import lorapass.cost, lorapass.fx")
    assert not {m for m in modules if m.startswith(("lorapass.cost.", "lorapass.fx."))}
    assert not {m for m in modules if m.split(".")[0] in HEAVY}
    modules = loaded_after("from lorapass.cost import Analyser, ops")
    assert {"lorapass.cost.analysis", "lorapass.cost.ops"} <= modules and "torch" not in modules


def test_inspect_and_merge_never_import_torch(exported, tmp_path):
    from builders import make_adapter

    model, onnx_path = exported("llama")
    make_adapter(model, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    run = ("from lorapass.cli import main\n"
           f"assert main(['inspect', {str(onnx_path)!r}, '--adapter', {str(tmp_path / 'adapter')!r}, '--json']) == 0\n"
           f"assert main(['rewrite', {str(onnx_path)!r}, '--adapter', {str(tmp_path / 'adapter')!r}, "
           f"'--strategy', 'merge', '-o', {str(tmp_path / 'out' / 'm.onnx')!r}]) == 0")
    modules = loaded_after(run)
    assert (tmp_path / "out" / "m.onnx").is_file()
    assert not {m for m in modules if m.split(".")[0] in ("torch", "transformers", "peft", "matplotlib")}
    parts = {m for m in modules if m.startswith(("lorapass.cost.", "lorapass.fx."))}
    assert parts == {"lorapass.cost.cli", "lorapass.fx.cli"}  # the parsers only
