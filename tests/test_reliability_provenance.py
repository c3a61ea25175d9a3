"""Provenance: the output records what was applied; LoRA is never applied twice without --force; a dynamic
graph's existing slots are never sites."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from importlib import metadata

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from reliability_case import cli, fails, ort_output, peft_output, tiny, tiny_template  # noqa: F401
from lorapass.onnx.load import load_model
from lorapass.onnx.sites import find_sites
from lorapass.provenance import KEY


def rewrite(case, model, out, *extra) -> list:
    return ["rewrite", model, "-o", out, *extra]


def records(path) -> list[dict]:
    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    return json.loads(meta[KEY])


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_merge_records_what_was_applied(tiny, capsys):
    out = tiny.out / "o.onnx"
    assert cli(capsys, rewrite(tiny, tiny.model, out, "--adapter", tiny.a))[0] == 0
    [record] = records(out)
    files = {"adapter_config.json": sha(tiny.a / "adapter_config.json"),
             "adapter_model.safetensors": sha(tiny.a / "adapter_model.safetensors")}
    digest = hashlib.sha256("".join(f"{k}:{v};" for k, v in sorted(files.items())).encode()).hexdigest()
    assert record == {"lorapass": metadata.version("lorapass"), "strategy": "merge", "rules": None, "targets": 2,
                      "adapters": [{"adapter": str(tiny.a.resolve()), "format": "peft", "weight": 1.0, "files": files,
                                    "sha256": digest}]}


def test_repeated_merge_of_the_same_adapter_is_refused_unless_forced(tiny, capsys):
    once, twice = tiny.out / "once.onnx", tiny.out / "twice.onnx"
    assert cli(capsys, rewrite(tiny, tiny.model, once, "--adapter", tiny.a))[0] == 0
    copied = tiny.root / "copy_of_a"  # the same adapter elsewhere: recognised by content
    shutil.copytree(tiny.a, copied)
    for adapter in (tiny.a, copied):
        fails(capsys, tiny, rewrite(tiny, once, twice, "--adapter", adapter), 2, once, "already merged", "--force")
    fails(capsys, tiny, rewrite(tiny, once, twice, "--adapter", tiny.a, "--strategy", "dynamic"), 2, "already merged")
    assert cli(capsys, rewrite(tiny, once, twice, "--adapter", copied, "--force"))[0] == 0
    assert [a["adapter"] for r in records(twice) for a in r["adapters"]] == [str(tiny.a.resolve()), str(copied.resolve())]
    # forced, the adapter is applied twice: PEFT with twice the alpha is the reference
    config = json.loads((tiny.a / "adapter_config.json").read_text())
    config["lora_alpha"] *= 2
    (copied / "adapter_config.json").write_text(json.dumps(config))
    x = torch.randn(3, 16)
    np.testing.assert_allclose(ort_output(twice, x), peft_output(tiny, copied, x), rtol=1e-5, atol=1e-5)


def test_another_adapter_may_be_merged_on_top(tiny, capsys):
    once, both = tiny.out / "once.onnx", tiny.out / "both.onnx"
    assert cli(capsys, rewrite(tiny, tiny.model, once, "--adapter", tiny.a))[0] == 0
    assert cli(capsys, rewrite(tiny, once, both, "--adapter", tiny.b))[0] == 0
    assert [a["files"]["adapter_model.safetensors"] for r in records(both) for a in r["adapters"]] == [
        sha(tiny.a / "adapter_model.safetensors"), sha(tiny.b / "adapter_model.safetensors")]


def test_rules_file_is_recorded(tiny, capsys):
    rules = tiny.root / "rules.yaml"
    rules.write_text("target_modules: [q]\nr: 2\nstrategy: dynamic\n")
    out = tiny.out / "o.onnx"
    assert cli(capsys, rewrite(tiny, tiny.model, out, "--rules", rules))[0] == 0
    [record] = records(out)
    assert record["strategy"] == "dynamic" and record["adapters"] == []
    assert record["rules"] == {"path": str(rules.resolve()), "sha256": sha(rules)}


@pytest.fixture
def dynamic(tiny, capsys):
    path = tiny.out / "dyn.onnx"
    assert cli(capsys, rewrite(tiny, tiny.model, path, "--adapter", tiny.a, "--strategy", "dynamic"))[0] == 0
    return path


def test_rewriting_a_dynamic_graph(tiny, dynamic, capsys):
    merged = tiny.out / "merged.onnx"
    fails(capsys, tiny, rewrite(tiny, dynamic, merged, "--adapter", tiny.b), 2, "dynamic LoRA slots", "--force")
    for extra in ([], ["--force"]):  # a second set of slots could not be addressed: refused even when forced
        fails(capsys, tiny, rewrite(tiny, dynamic, merged, "--adapter", tiny.b, "--strategy", "dynamic", *extra), 2,
              "a second set of slots is not supported")
    assert cli(capsys, rewrite(tiny, dynamic, merged, "--adapter", tiny.b, "--force"))[0] == 0
    # b is folded into the base weights; a still runs through the slots (their defaults): both apply once
    x = torch.randn(3, 16)
    from peft import PeftModel

    both = PeftModel.from_pretrained(copy.deepcopy(tiny.torch_model), str(tiny.a), adapter_name="a")
    both.load_adapter(str(tiny.b), adapter_name="b")
    both.base_model.set_adapter(["a", "b"])
    with torch.no_grad():
        expected = both.eval()(x).numpy()
    np.testing.assert_allclose(ort_output(merged, x), expected, rtol=1e-5, atol=1e-5)
    assert [r["strategy"] for r in records(merged)] == ["dynamic", "merge"]


def test_slots_of_a_dynamic_graph_are_never_sites(tiny, dynamic):
    base = find_sites(load_model(tiny.model)).sites
    graph = load_model(dynamic)
    slots = {v.name for v in graph.graph.inputs if ".lora_" in v.name}
    assert slots == {"k.lora_A", "k.lora_B", "q.lora_A", "q.lora_B"}
    assert slots <= set(graph.graph.initializers)  # with defaults
    found = find_sites(graph).sites
    assert [(s.path, s.weight) for s in found] == [(s.path, s.weight) for s in base]
    assert not {s.weight for s in found} & slots


def test_an_initializer_that_is_a_graph_input_is_no_weight():
    """The rule behind it (sites._const_2d): an overridable input may hold any value at run time."""
    w = ir.Value(name="w.weight", shape=ir.Shape([4, 4]), type=ir.TensorType(ir.DataType.FLOAT),
                 const_value=ir.Tensor(np.ones((4, 4), np.float32), name="w.weight"))
    x = ir.Value(name="x", shape=ir.Shape([2, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.Node("", "MatMul", [x, w], name="w_matmul")
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 17})
    model = ir.Model(graph, ir_version=9)
    assert [s.path for s in find_sites(model).sites] == ["w"]
    graph.inputs.append(w)
    assert find_sites(model).sites == []


def test_unreadable_provenance(tiny, capsys):
    once = tiny.out / "once.onnx"
    assert cli(capsys, rewrite(tiny, tiny.model, once, "--adapter", tiny.a))[0] == 0
    proto = onnx.load(once, load_external_data=False)
    next(p for p in proto.metadata_props if p.key == KEY).value = "{broken"
    onnx.save(proto, once)
    fails(capsys, tiny, rewrite(tiny, once, tiny.out / "again.onnx", "--adapter", tiny.b), 2, KEY, "--force")
    assert cli(capsys, rewrite(tiny, once, tiny.out / "again.onnx", "--adapter", tiny.b, "--force"))[0] == 0
    assert len(records(tiny.out / "again.onnx")) == 1


def test_dynamic_chain_of_targeted_sites(tiny, capsys):
    from builders import make_adapter

    make_adapter(tiny.torch_model, tiny.root / "qv", seed=3, r=2, lora_alpha=4, target_modules=["q", "v"])
    out = tiny.out / "dyn.onnx"
    assert cli(capsys, rewrite(tiny, tiny.model, out, "--adapter", tiny.root / "qv", "--strategy", "dynamic"))[0] == 0
    x = torch.randn(3, 16)
    np.testing.assert_allclose(ort_output(out, x), peft_output(tiny, tiny.root / "qv", x), rtol=1e-5, atol=1e-5)
