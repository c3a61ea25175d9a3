"""``lorapass export package.module:factory``: the pipeline from the command line; bad input exits 2."""

from __future__ import annotations

import argparse
import json
import textwrap
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from builders import make_adapter, rel_err

from lorapass.errors import LorapassError
from lorapass.fx.cli import add_export_parser, parse_input

FACTORY = textwrap.dedent('''
    import torch
    from transformers.pytorch_utils import Conv1D


    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(16, 16)
            self.v = torch.nn.Linear(16, 16, bias=False)
            self.proj = Conv1D(16, 16)

        def forward(self, x):
            return x + self.proj(torch.relu(self.q(x)) * self.v(x))


    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])
            self.head = torch.nn.Linear(16, 8)

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return self.head(x)


    def make_module():
        torch.manual_seed(0)
        return Tiny().eval()


    def make():
        return make_module(), (torch.randn(2, 5, 16),)


    not_a_model = 42
''')


def cli(argv: list[str]) -> int:
    """What ``lorapass`` does with the export subcommand: parse, run, LorapassError -> exit 2."""
    parser = argparse.ArgumentParser(prog="lorapass")
    add_export_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LorapassError:
        return 2


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """A folder holding the factory module and a PEFT adapter for its model, plus the expected outputs."""
    folder = tmp_path_factory.mktemp("cli_app")
    (folder / "lorapass_cli_models.py").write_text(FACTORY)
    import sys

    sys.path.insert(0, str(folder))
    try:
        import lorapass_cli_models as models
    finally:
        sys.path.remove(str(folder))
    model = models.make_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT sets fan_in_fan_out for Conv1D itself
        peft_model = make_adapter(model, folder / "adapter", r=2, lora_alpha=4, target_modules=["q", "v", "proj"])
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return folder, x, peft_model(x).numpy(), model(x).numpy()


def ort_run(path, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("strategy", ["merge", "dynamic"])
def test_export_factory_with_example_inputs(app, tmp_path, capsys, strategy):
    folder, x, expected, base = app
    out = tmp_path / "model.onnx"
    code = cli(["export", "lorapass_cli_models:make", "-o", str(out), "--adapter", str(folder / "adapter"),
                "--strategy", strategy, "--app-dir", str(folder), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["strategy"] == strategy and summary["targets"] == 6 and summary["sites"] == 7
    assert summary["lora_inputs"] == (12 if strategy == "dynamic" else 0)
    assert rel_err(ort_run(out, x), expected) <= 1e-4
    assert rel_err(base, expected) > 1e-3


def test_export_module_factory_with_input_specs(app, tmp_path, capsys):
    folder, x, expected, _ = app
    out = tmp_path / "model.onnx"
    assert cli(["export", "lorapass_cli_models:make_module", "-o", str(out), "--adapter", str(folder / "adapter"),
                "--strategy", "dynamic", "--input", "x:2x5x16:float32", "--app-dir", str(folder)]) == 0
    assert "dynamic: 6 of 7 sites" in capsys.readouterr().out
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_overridable_initializers()}
    assert {"blocks.0.q.lora_A", "blocks.1.proj.lora_B"} <= names
    assert rel_err(ort_run(out, x), expected) <= 1e-4


@pytest.mark.parametrize("argv", [
    ["lorapass_cli_models"],                        # no :factory
    ["no_such_module_here:make"],                   # not importable
    ["lorapass_cli_models:missing"],                # no such attribute
    ["lorapass_cli_models:not_a_model"],            # neither a module nor callable
    ["lorapass_cli_models:make_module"],            # no example inputs
    ["lorapass_cli_models:make_module", "--input", "x:2xq"],   # bad shape
    ["lorapass_cli_models:make_module", "--input", "x:2x5x16:complex"],  # bad dtype
    ["lorapass_cli_models:make", "--kwarg", "flag=nope"],      # not JSON
    ["lorapass_cli_models:make", "--adapter", "/no/such/adapter"],
], ids=["no-colon", "no-module", "no-attribute", "not-callable", "no-inputs", "bad-shape", "bad-dtype", "bad-kwarg",
        "no-adapter"])
def test_bad_input_exits_2(app, tmp_path, argv):
    folder = app[0]
    model, *rest = argv
    assert cli(["export", model, "-o", str(tmp_path / "o.onnx"), "--app-dir", str(folder), *rest]) == 2
    assert not (tmp_path / "o.onnx").exists()


def test_input_spec_values():
    name, tensor = parse_input("input_ids:1x8")
    assert name == "input_ids" and tensor.dtype == torch.int64 and tensor.shape == (1, 8) and bool((tensor == 1).all())
    assert parse_input("mask:2x3:bool")[1].dtype == torch.bool


def test_registered_on_the_lorapass_cli():
    from lorapass.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if "export" not in commands:
        pytest.skip("lorapass.cli does not register `export` yet: call lorapass.fx.cli.add_export_parser(sub)")
    assert commands["export"].get_default("func").__module__ == "lorapass.fx.cli"
