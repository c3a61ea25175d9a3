"""Strategy merge on real exports: ONNX Runtime's output equals PEFT's eager output."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import onnx
import pytest
import torch

from builders import PEFT_CONFIGS, FAMILIES, build, eager, example_ids, export, make_adapter, rel_err, run_onnx
from lorapass.cli import main

TOL = 1e-4
CASES = [(f, True) for f in FAMILIES] + [(f, False) for f, fam in FAMILIES.items() if fam.torchscript]


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("family,dynamo", CASES, ids=[f"{f}-{'dynamo' if d else 'torchscript'}" for f, d in CASES])
def test_merge_matches_peft(exported, tmp_path, family, dynamo):
    model, onnx_path = exported(family, dynamo)
    peft_model = make_adapter(model, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=list(FAMILIES[family].targets))
    ids = example_ids(batch=2, seq=9, seed=3)  # a different shape from the export's example
    expected, base = eager(peft_model, ids), eager(model, ids)
    before = digest(onnx_path.parent)
    out = tmp_path / "merged.onnx"
    assert main(["rewrite", str(onnx_path), "--adapter", str(tmp_path / "adapter"), "--strategy", "merge", "-o", str(out)]) == 0
    actual = run_onnx(out, ids)
    assert rel_err(actual, expected) <= TOL
    assert rel_err(base, expected) > 1e-3  # the adapter really changes the output
    assert digest(onnx_path.parent) == before  # the input is never modified
    src, dst = onnx.load(onnx_path, load_external_data=False), onnx.load(out, load_external_data=False)
    assert [i.name for i in dst.graph.input] == [i.name for i in src.graph.input]
    assert [o.name for o in dst.graph.output] == [o.name for o in src.graph.output]


@pytest.mark.parametrize("config", list(PEFT_CONFIGS.values()), ids=list(PEFT_CONFIGS))
def test_merge_follows_peft_config_semantics(exported, tmp_path, config):
    model, onnx_path = exported("llama")
    peft_model = make_adapter(model, tmp_path / "adapter", **config)
    ids = example_ids(seed=4)
    out = tmp_path / "merged.onnx"
    assert main(["rewrite", str(onnx_path), "--adapter", str(tmp_path / "adapter"), "-o", str(out)]) == 0
    assert rel_err(run_onnx(out, ids), eager(peft_model, ids)) <= TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_match_peft_merge(tmp_path, dtype):
    """fp16/bf16: merged weights equal PEFT's own merge_and_unload (compute in fp32, cast back) to one ulp."""
    from lorapass.onnx.load import load_model
    from lorapass.onnx.sites import find_sites

    model = build("llama").to(dtype)
    onnx_path = export(model, tmp_path / "model.onnx")
    peft_model = make_adapter(model, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    merged_torch = peft_model.merge_and_unload()
    out = tmp_path / "merged.onnx"
    assert main(["rewrite", str(onnx_path), "--adapter", str(tmp_path / "adapter"), "-o", str(out)]) == 0
    graph = load_model(out)
    report = find_sites(graph)
    checked = 0
    for site in report.sites:
        w = graph.graph.initializers[site.weight].const_value.numpy()
        assert str(w.dtype) == str(dtype).removeprefix("torch.")
        w = (w.T if site.layout == "in_out" else w).astype(np.float32)
        ref = merged_torch.get_submodule(site.path).weight.detach().float().numpy()
        ulp = np.abs(ref) * (2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7) + 1e-6
        assert np.all(np.abs(w - ref) <= ulp), site.path
        checked += site.path.endswith(("q_proj", "down_proj"))
    assert checked == 4


@pytest.fixture(scope="module")
def llama_fp16(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama_fp16")
    model = build("llama").to(torch.float16)
    return model, export(model, folder / "model.onnx")


def test_a_merge_beyond_float16_range_is_refused_by_name(llama_fp16, tmp_path, capsys):
    """A huge alpha on an fp16 model: the merged weight would hold inf; refused, naming the weight, nothing written."""
    model, onnx_path = llama_fp16
    make_adapter(model, tmp_path / "adapter", r=2, lora_alpha=2e7, target_modules=["down_proj"])
    out = tmp_path / "out" / "merged.onnx"
    out.parent.mkdir()
    assert main(["rewrite", str(onnx_path), "--adapter", str(tmp_path / "adapter"), "--strategy", "merge",
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "down_proj" in err and "float16's range" in err and "Traceback" not in err
    assert list(out.parent.iterdir()) == []


def test_a_large_but_representable_merge_takes_the_checked_path_and_matches_peft(llama_fp16, tmp_path):
    """A delta too large for the unchecked fast fold's bound (but within range) is merged exactly all the same."""
    from lorapass.onnx.load import load_model
    from lorapass.onnx.sites import find_sites

    model, onnx_path = llama_fp16
    peft_model = make_adapter(model, tmp_path / "adapter", r=2, lora_alpha=4e4, target_modules=["down_proj"])
    merged_torch = peft_model.merge_and_unload()
    out = tmp_path / "merged.onnx"
    assert main(["rewrite", str(onnx_path), "--adapter", str(tmp_path / "adapter"), "--strategy", "merge",
                 "-o", str(out)]) == 0
    graph = load_model(out)
    checked = 0
    for site in find_sites(graph).sites:
        if not site.path.endswith("down_proj"):
            continue
        w = graph.graph.initializers[site.weight].const_value.numpy()
        w = (w.T if site.layout == "in_out" else w).astype(np.float32)
        ref = merged_torch.get_submodule(site.path).weight.detach().float().numpy()
        assert np.isfinite(w).all() and np.abs(ref).max() > 65504 / 64  # past the fast path's bound
        assert np.all(np.abs(w - ref) <= np.abs(ref) * 2.0 ** -10 + 1e-6), site.path
        checked += 1
    assert checked == 2


def test_external_data_layout_kept_and_untouched_tensors_byte_identical(exported, tmp_path):
    _, onnx_path = exported("llama")
    make_adapter(exported("llama")[0], tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    out = tmp_path / "out" / "merged.onnx"
    assert main(["rewrite", str(onnx_path), "--adapter", str(tmp_path / "adapter"), "-o", str(out)]) == 0
    src = {t.name: t for t in onnx.load(onnx_path, load_external_data=False).graph.initializer}
    dst = {t.name: t for t in onnx.load(out, load_external_data=False).graph.initializer}
    assert set(src) == set(dst)
    src_data, dst_data = (onnx_path.parent / "model.onnx.data").read_bytes(), (out.parent / "merged.onnx.data").read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged.onnx", "merged.onnx.data"]
    changed = 0
    for name, t in src.items():
        info_s = {e.key: e.value for e in t.external_data}
        info_d = {e.key: e.value for e in dst[name].external_data}
        assert bool(info_s) == bool(info_d), name  # inline stays inline, external stays external
        if not info_s:
            continue
        assert info_d["location"] == "merged.onnx.data" and info_d["offset"] == info_s["offset"]
        off, n = int(info_s["offset"]), int(info_s["length"])
        changed += src_data[off:off + n] != dst_data[off:off + n]
    assert changed == 2  # the two q_proj weights, nothing else


def test_weight_shared_by_two_sites_is_copied_not_corrupted(tmp_path):
    """A deduplicated initializer read by two sites: merging one must leave the other's weight alone."""
    import json

    import onnx_ir as ir
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    x = ir.Value(name="x", shape=ir.Shape(["b", 8]), type=ir.TensorType(ir.DataType.FLOAT))
    wv = ir.Value(name="shared", shape=ir.Shape([8, 6]), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.Tensor(w, name="shared"))
    a = ir.Node("", "MatMul", [x, wv], name="/blocks.0/proj/MatMul")
    b = ir.Node("", "MatMul", [x, wv], name="/blocks.1/proj/MatMul")
    out = ir.Node("", "Concat", [a.outputs[0], b.outputs[0]], [ir.AttrInt64("axis", 1)], name="/Concat")
    out.outputs[0].name = "y"
    graph = ir.Graph([x], out.outputs, nodes=[a, b, out], initializers=[wv], opset_imports={"": 18})
    ir.save(ir.Model(graph, ir_version=10), tmp_path / "m.onnx")
    lora_a, lora_b = rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal((6, 2)).astype(np.float32)
    (tmp_path / "ad").mkdir()
    save_file({"base_model.model.blocks.0.proj.lora_A.weight": lora_a, "base_model.model.blocks.0.proj.lora_B.weight": lora_b},
              str(tmp_path / "ad" / "adapter_model.safetensors"))
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["blocks.0.proj"]}))
    assert main(["rewrite", str(tmp_path / "m.onnx"), "--adapter", str(tmp_path / "ad"), "-o", str(tmp_path / "o.onnx")]) == 0
    import onnxruntime as ort

    xs = rng.standard_normal((3, 8)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "o.onnx")).run(None, {"x": xs})[0]
    merged = w + (lora_b @ lora_a * 2.0).T
    np.testing.assert_allclose(y[:, :6], xs @ merged, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[:, 6:], xs @ w, rtol=1e-5, atol=1e-5)


def test_two_weighted_adapters_merge_as_the_sum_of_their_deltas(exported, tmp_path):
    """``--adapter A --adapter B:0.5``: W + s_A·ΔA + 0.5·s_B·ΔB, against PEFT with both adapters active."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model, onnx_path = exported("llama")
    make_adapter(model, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    make_adapter(model, tmp_path / "b", seed=2, r=2, lora_alpha=8, target_modules=["v_proj", "down_proj"])
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "a"), adapter_name="a")
    peft_model.load_adapter(str(tmp_path / "b"), adapter_name="b")
    peft_model.base_model.set_adapter(["a", "b"])
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and "b" in module.scaling:
            module.scaling["b"] *= 0.5
    ids = example_ids(seed=8)
    out = tmp_path / "merged.onnx"
    assert main(["rewrite", str(onnx_path), "--adapter", str(tmp_path / "a"), "--adapter", f"{tmp_path / 'b'}:0.5",
                 "--strategy", "merge", "-o", str(out)]) == 0
    expected = eager(peft_model.eval(), ids)
    assert rel_err(run_onnx(out, ids), expected) <= TOL
    assert rel_err(eager(model, ids), expected) > 1e-3
