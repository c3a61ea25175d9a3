"""A tiny two-linear torch model, its ONNX graph with external data, and real PEFT adapters for it; CLI helpers
for the reliability tests (every error path: exit status, message, no output or temporary, inputs unchanged)."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from builders import make_adapter
from lorapass.cli import main

WIDTH = 16


class Tiny(torch.nn.Module):
    """y = v(q(x)) + k(x): three bias-free linears; the adapters target "k" and "q" (one shared input), so "v"
    is copied as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.k = torch.nn.Linear(WIDTH, WIDTH, bias=False)
        self.q = torch.nn.Linear(WIDTH, WIDTH, bias=False)
        self.v = torch.nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(self.q(x)) + self.k(x)


def tiny_onnx(model: Tiny, path: Path) -> Path:
    """``model`` as MatMuls on initializers named after its parameters ([in, out]), weights in ``<path>.data``."""
    weights = [numpy_helper.from_array(getattr(model, n).weight.detach().numpy().T.copy(), f"{n}.weight") for n in "kqv"]
    nodes = [helper.make_node("MatMul", ["x", "k.weight"], ["hk"], name="k_matmul"),
             helper.make_node("MatMul", ["x", "q.weight"], ["h"], name="q_matmul"),
             helper.make_node("MatMul", ["h", "v.weight"], ["hv"], name="v_matmul"),
             helper.make_node("Add", ["hv", "hk"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", WIDTH])], weights)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(proto, str(path), save_as_external_data=True, location=f"{path.name}.data", size_threshold=0)
    return path


@dataclass
class Case:
    """One test's copy: ``folder/model.onnx`` (+ data), adapters ``a`` and ``b`` (other weights), ``out/``."""

    root: Path
    model: Path
    a: Path
    b: Path
    out: Path
    torch_model: Tiny

    @property
    def inputs(self) -> list[Path]:
        """Every file an error path must leave unchanged."""
        return sorted(p for p in self.root.rglob("*") if p.is_file() and self.out not in p.parents)


def build_template(folder: Path) -> None:
    torch.manual_seed(0)
    model = Tiny().eval()
    (folder / "m").mkdir(parents=True)
    tiny_onnx(model, folder / "m" / "model.onnx")
    make_adapter(model, folder / "a", seed=1, r=4, lora_alpha=8, target_modules=["k", "q"])
    make_adapter(model, folder / "b", seed=2, r=2, lora_alpha=4, target_modules=["k", "q"])
    torch.save(model.state_dict(), folder / "tiny.pt")


@pytest.fixture(scope="session")
def tiny_template(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    build_template(folder)
    return folder


@pytest.fixture
def tiny(tiny_template, tmp_path) -> Case:
    root = tmp_path / "case"
    shutil.copytree(tiny_template, root)
    (root / "out").mkdir()
    model = Tiny().eval()
    model.load_state_dict(torch.load(root / "tiny.pt"))
    return Case(root, root / "m" / "model.onnx", root / "a", root / "b", root / "out", model)


def peft_output(case: Case, adapter: Path, x: torch.Tensor) -> np.ndarray:
    """PEFT's own (unmerged) output of ``case``'s model with ``adapter``."""
    from peft import PeftModel
    import copy

    with torch.no_grad():
        return PeftModel.from_pretrained(copy.deepcopy(case.torch_model), str(adapter)).eval()(x).numpy()


def ort_output(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]


def hashes(paths) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


def leftovers(*folders: Path) -> list[Path]:
    """Files lorapass writes on the way (temporaries, backups, locks) under ``folders``."""
    return [p for f in folders if f.exists() for p in f.rglob("*") if ".lorapass-" in p.name]


def cli(capsys, args: list[str]) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def fails(capsys, case: Case, args: list, code: int = 2, *names: str) -> str:
    """Run the CLI expecting failure ``code``: one ``lorapass:`` line naming ``names``, no traceback, nothing
    written into ``case.out``, no temporary anywhere, every input unchanged."""
    before = hashes(case.inputs)
    existing = sorted(case.root.rglob("*"))
    status, err = cli(capsys, args)
    assert status == code, err
    assert err.startswith("lorapass: ") and "Traceback" not in err, err
    for name in names:
        assert str(name) in err, (name, err)
    assert hashes(case.inputs) == before
    assert sorted(case.root.rglob("*")) == existing  # nothing new, nothing removed
    assert leftovers(case.root) == []
    return err
