"""Strategy dynamic: LoRA branches as graph nodes, adapters as swappable ONNX Runtime inputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from builders import FAMILIES, eager, example_ids, make_adapter, rel_err, run_onnx
from lorapass.cli import main
from lorapass.onnx.load import load_model
from lorapass.onnx.sites import find_sites
from lorapass.ort_adapter import Session

TOL = 1e-4
CASES = [(f, True) for f in FAMILIES] + [(f, False) for f, fam in FAMILIES.items() if fam.torchscript]


def rules_file(tmp_path, adapter_dir, **overrides):
    """The adapter's own config as a rules YAML, with overrides (e.g. fusion off)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    keys = ("r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
            "rank_pattern", "alpha_pattern", "use_rslora")
    rule = {k: config[k] for k in keys if config.get(k) not in (None, {}, [])} | {"strategy": "dynamic"} | overrides
    path = tmp_path / "rules.yaml"
    path.write_text(json.dumps(rule))  # JSON is YAML
    return path


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("family,dynamo", CASES, ids=[f"{f}-{'dynamo' if d else 'torchscript'}" for f, d in CASES])
def test_dynamic_matches_peft(exported, tmp_path, family, dynamo, fuse):
    model, onnx_path = exported(family, dynamo)
    peft_model = make_adapter(model, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=list(FAMILIES[family].targets))
    out = tmp_path / "dynamic.onnx"
    args = ["rewrite", str(onnx_path), "--adapter", str(tmp_path / "adapter"), "--strategy", "dynamic", "-o", str(out)]
    if fuse:
        args += ["--rules", str(rules_file(tmp_path, tmp_path / "adapter", fuse_shared_inputs=True))]
    assert main(args) == 0
    ids = example_ids(batch=2, seq=9, seed=5)
    expected = eager(peft_model, ids)
    assert rel_err(run_onnx(out, ids), expected) <= TOL
    assert rel_err(eager(model, ids), expected) > 1e-3
    graph = onnx.load(out, load_external_data=False)
    concats = [n for n in graph.graph.node if n.op_type == "Concat" and n.name.endswith("/lora_A/Concat")]
    # one concatenated A per activation read by two or more targeted modules (q/k/v, gate/up, Falcon's parallel block)
    targeted = {name.removeprefix("base_model.model.") for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    readers: dict[str, set[str]] = {}
    for site in find_sites(load_model(onnx_path), wanted=targeted).sites:
        if site.path in targeted:
            readers.setdefault(site.input, set()).add(site.path)
    assert len(concats) == (sum(len(paths) > 1 for paths in readers.values()) if fuse else 0)


def test_adapter_inputs_are_named_by_module_path(exported, tmp_path):
    model, onnx_path = exported("llama")
    make_adapter(model, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    out = tmp_path / "dynamic.onnx"
    assert main(["rewrite", str(onnx_path), "--adapter", str(tmp_path / "adapter"), "--strategy", "dynamic", "-o", str(out)]) == 0
    graph = onnx.load(out, load_external_data=False)
    inputs = {i.name: i for i in graph.graph.input}
    for layer in (0, 1):
        for module, (fan_in, fan_out) in {"self_attn.q_proj": (32, 32), "mlp.down_proj": (48, 32)}.items():
            path = f"model.layers.{layer}.{module}"
            a, b = inputs[f"{path}.lora_A"], inputs[f"{path}.lora_B"]
            dims_a = [d.dim_value or d.dim_param for d in a.type.tensor_type.shape.dim]
            dims_b = [d.dim_value or d.dim_param for d in b.type.tensor_type.shape.dim]
            assert dims_a == [fan_in, f"{path}.r"] and dims_b == [f"{path}.r", fan_out]
    assert {i.name for i in graph.graph.input} - set(inputs) == set()
    assert [o.name for o in graph.graph.output] == ["output"]


@pytest.fixture(scope="module")
def ready(exported, tmp_path_factory):
    """A LoRA-ready Llama graph (rank-8 zero slots on q/k/v/o/gate/up/down) and its base."""
    model, onnx_path = exported("llama")
    out = tmp_path_factory.mktemp("ready") / "ready.onnx"
    assert main(["rewrite", str(onnx_path), "--strategy", "dynamic", "--target", "all-linear", "--rank", "8",
                 "-o", str(out)]) == 0
    return model, onnx_path, out


def test_lora_ready_graph_equals_base(ready):
    _, base, out = ready
    ids = example_ids(seed=6)
    np.testing.assert_array_equal(run_onnx(out, ids), run_onnx(base, ids))


def test_hot_swap_two_adapters_of_different_ranks_on_one_session(ready, tmp_path):
    model, base, out = ready
    first = make_adapter(model, tmp_path / "a1", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    second = make_adapter(model, tmp_path / "a2", seed=2, r=16, lora_alpha=16, use_rslora=True,
                          target_modules=["q_proj", "k_proj", "up_proj", "down_proj"],
                          rank_pattern={"down_proj": 2}, alpha_pattern={"k_proj": 3})
    for name in ("a1", "a2"):
        assert main(["export-adapter", str(tmp_path / name), "--model", str(out), "-o", str(tmp_path / f"{name}.onnx_adapter")]) == 0
    session = Session(out)
    session.add_adapter("a1", tmp_path / "a1.onnx_adapter")
    session.add_adapter("a2", tmp_path / "a2.onnx_adapter")
    ids = example_ids(seed=7)
    feeds = {"input_ids": ids.numpy()}
    for _ in range(2):  # swap back and forth on the same session
        assert rel_err(session.run(feeds, adapter="a1")[0], eager(first, ids)) <= TOL
        assert rel_err(session.run(feeds, adapter="a2")[0], eager(second, ids)) <= TOL
        np.testing.assert_array_equal(session.run(feeds)[0], run_onnx(base, ids))


def test_export_adapter_round_trip_holds_peft_weights_prescaled(ready, tmp_path):
    from safetensors.numpy import load_file

    model, _, out = ready
    make_adapter(model, tmp_path / "ad", r=4, lora_alpha=12, target_modules=["o_proj"])
    path = tmp_path / "ad.onnx_adapter"
    assert main(["export-adapter", str(tmp_path / "ad"), "--model", str(out), "-o", str(path)]) == 0
    params = {k: v.numpy() for k, v in ort.AdapterFormat.read_adapter(str(path)).get_parameters().items()}
    peft = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert set(params) == {f"model.layers.{i}.self_attn.o_proj.lora_{k}" for i in (0, 1) for k in "AB"}
    for i in (0, 1):
        key = f"base_model.model.model.layers.{i}.self_attn.o_proj"
        np.testing.assert_array_equal(params[f"model.layers.{i}.self_attn.o_proj.lora_A"], peft[f"{key}.lora_A.weight"].T)
        np.testing.assert_allclose(params[f"model.layers.{i}.self_attn.o_proj.lora_B"], peft[f"{key}.lora_B.weight"].T * 3.0,
                                   rtol=1e-6)


def test_export_adapter_rejects_modules_without_inputs(exported, tmp_path, capsys):
    model, onnx_path = exported("llama")
    out = tmp_path / "qv.onnx"
    assert main(["rewrite", str(onnx_path), "--strategy", "dynamic", "--target", "q_proj", "v_proj", "-o", str(out)]) == 0
    make_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    target = tmp_path / "ad.onnx_adapter"
    assert main(["export-adapter", str(tmp_path / "ad"), "--model", str(out), "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert "'model.layers.0.mlp.up_proj'" in err and "model.layers.0.mlp.up_proj.lora_A" in err
    assert not target.exists() and not list(tmp_path.glob(".ad.onnx_adapter*"))


def test_export_adapter_rejects_wrong_shapes(exported, tmp_path, capsys):
    import transformers as tf

    _, onnx_path = exported("llama")
    out = tmp_path / "q.onnx"
    assert main(["rewrite", str(onnx_path), "--strategy", "dynamic", "--target", "q_proj", "-o", str(out)]) == 0
    wide = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2))
    make_adapter(wide, tmp_path / "wide", r=4, lora_alpha=8, target_modules=["q_proj"])
    target = tmp_path / "wide.onnx_adapter"
    assert main(["export-adapter", str(tmp_path / "wide"), "--model", str(out), "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert "[48, 4]" in err and "model.layers.0.self_attn.q_proj.lora_A" in err
    assert not target.exists()


def test_session_rejects_unknown_adapter(ready):
    from lorapass.errors import AdapterError

    session = Session(ready[2])
    with pytest.raises(AdapterError, match="no adapter named 'x'"):
        session.run({"input_ids": example_ids().numpy()}, adapter="x")
