"""Exporter dialects, packing and existing LoRA branches in site discovery, on real builder and torch exports."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from builders import eager, example_ids, make_adapter, rel_err, run_onnx, torch_linears
from genai import first_logits
from lorapass.cli import main
from lorapass.errors import UnsupportedError
from lorapass.onnx.load import load_model
from lorapass.onnx.rewrite import rewrite
from lorapass.onnx.sites import find_sites
from lorapass.rules import LoraRule

PROMPT = np.array([[5, 17, 33, 8, 61, 40, 12]], np.int64)


def peft_logits(peft_model) -> np.ndarray:
    with torch.no_grad():
        return peft_model(input_ids=torch.tensor(PROMPT)).logits.numpy()


def test_genai_names_are_peft_module_paths_and_qkv_rows_come_from_genai_config(genai, capsys):
    model, _ = genai.model("llama")
    out = genai.build("llama")
    report = find_sites(load_model(out / "model.onnx"))
    assert report.dialect == "genai" and report.unresolved == []
    expected = torch_linears(model)
    assert {s.path: (s.in_features, s.out_features) for s in report.sites if s.kind != "embedding"} == expected
    config = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    q, kv = config["num_attention_heads"] * config["head_size"], config["num_key_value_heads"] * config["head_size"]
    rows = {s.path.rpartition(".")[2]: s.layout for s in report.sites if s.packed == "model.layers.0.self_attn.qkv_proj"}
    assert rows == {"q_proj": f"rows 0:{q} of in_out", "k_proj": f"rows {q}:{q + kv} of in_out",
                    "v_proj": f"rows {q + kv}:{q + 2 * kv} of in_out"}
    assert main(["inspect", str(out / "model.onnx")]) == 0
    text = capsys.readouterr().out
    assert "dialect genai" in text and "part of model.layers.1.self_attn.qkv_proj" in text


def test_phi3_packed_modules_kept_whole_or_joined_over_split_nodes(genai):
    model, _ = genai.model("phi3")
    expected = torch_linears(model)
    for extra in ({}, {"fuse_qkv": "false"}):
        report = find_sites(load_model(genai.build("phi3", **extra) / "model.onnx"))
        assert {s.path: (s.in_features, s.out_features) for s in report.sites if s.kind != "embedding"} == expected
        qkv = next(s for s in report.sites if s.path == "model.layers.0.self_attn.qkv_proj")
        assert len(qkv.joins) == (3 if extra else 0) and qkv.packed is None
        gate_up = next(s for s in report.sites if s.path == "model.layers.0.mlp.gate_up_proj")
        assert [rows for _, rows in gate_up.joins] == [80, 80]  # the builder always splits gate_up_proj


def _bare_copy(out, folder):
    """The builder's model.onnx without its genai_config.json: the dialect is still detected from the naming."""
    folder.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(out / name, folder / name)
    return folder / "model.onnx"


def test_without_genai_config_rows_come_from_the_adapter(genai, tmp_path):
    model, _ = genai.model("qwen2")
    out = genai.build("qwen2")
    bare = _bare_copy(out, tmp_path / "bare")
    report = find_sites(load_model(bare))
    assert report.dialect == "genai"
    kept = [node for node, reason in report.unsupported if "rows are unknown" in reason]
    assert kept == ["/model/layers.0/attn/qkv_proj/MatMul", "/model/layers.1/attn/qkv_proj/MatMul"]
    peft_model = make_adapter(model, tmp_path / "ad", r=4, lora_alpha=2, target_modules=["k_proj", "v_proj"])
    (tmp_path / "out").mkdir()
    rewrite(bare, tmp_path / "out" / "model.onnx", adapter=str(tmp_path / "ad"), strategy="merge")
    shutil.copy(out / "genai_config.json", tmp_path / "out")  # only for the test's feeds (head size)
    assert rel_err(first_logits(tmp_path / "out" / "model.onnx", PROMPT), peft_logits(peft_model)) <= 1e-4


def test_rows_of_the_config_and_the_adapter_must_agree(genai, tmp_path, capsys):
    model, _ = genai.model("llama")
    src = genai.build("llama")
    folder = tmp_path / "wrong"
    shutil.copytree(src, folder)
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["decoder"].update(num_attention_heads=6, num_key_value_heads=1)  # 96 + 16 + 16 = 128 rows still
    (folder / "genai_config.json").write_text(json.dumps(config))
    make_adapter(model, tmp_path / "ad", r=4, lora_alpha=2, target_modules=["k_proj"])
    out = tmp_path / "out" / "model.onnx"
    assert main(["rewrite", str(folder / "model.onnx"), "--adapter", str(tmp_path / "ad"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.k_proj" in err and "has 32 output rows" in err and "genai_config.json" in err
    assert not out.exists()


def test_alias_maps_another_exporters_names(exported, tmp_path, capsys):
    model, onnx_path = exported("opt", dynamo=False)
    peft_model = make_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "out_proj"])
    tensors = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))  # an adapter trained on "attn" modules
    save_file({k.replace("self_attn", "attn"): v for k, v in tensors.items()}, str(tmp_path / "ad" / "adapter_model.safetensors"))
    out = tmp_path / "merged.onnx"
    args = ["rewrite", str(onnx_path), "--adapter", str(tmp_path / "ad"), "--prefix", "m", "-o", str(out)]
    assert main(args) == 2
    assert "closest site: 'model.decoder.layers.0.self_attn.q_proj'" in capsys.readouterr().err
    assert main(args + ["--alias", "self_attn=attn"]) == 0
    capsys.readouterr()
    ids = example_ids()
    assert rel_err(run_onnx(out, ids), eager(peft_model, ids)) <= 1e-4
    rules = tmp_path / "rules.yaml"
    rules.write_text("target_modules: [q_proj]\nr: 4\nlora_alpha: 8\naliases: {self_attn: attn}\n")
    assert main(["inspect", str(onnx_path), "--rules", str(rules), "--prefix", "m", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dialect"] == "torch+alias"
    assert sorted(s["path"] for s in report["sites"] if s["target"]) == [f"model.decoder.layers.{i}.attn.q_proj" for i in (0, 1)]
    assert main(["inspect", str(onnx_path), "--alias", "self_attn"]) == 2
    assert "expected GRAPH=PEFT" in capsys.readouterr().err


def test_the_builders_lora_branches_are_never_sites(genai, tmp_path, capsys):
    model, _ = genai.model("phi3")
    make_adapter(model, tmp_path / "ad", r=4, lora_alpha=2, target_modules=["qkv_proj", "down_proj"])
    out = genai.build("phi3", adapter_path=str(tmp_path / "ad"))
    report = find_sites(load_model(out / "model.onnx"))
    assert {s.path: (s.in_features, s.out_features) for s in report.sites if s.kind != "embedding"} == torch_linears(model)
    with_lora = {s.path for s in report.sites if s.lora}
    assert with_lora == {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.qkv_proj", "mlp.down_proj")}
    assert all("lora_" not in s.node for s in report.sites)
    dest = tmp_path / "again" / "model.onnx"
    assert main(["rewrite", str(out / "model.onnx"), "--target", "all-linear", "--strategy", "dynamic", "-o", str(dest)]) == 2
    err = capsys.readouterr().err
    assert "already have a LoRA branch" in err and "model.layers.0.self_attn.qkv_proj" in err and not dest.exists()


def test_lorapass_slots_are_marked_and_never_get_a_second_set(genai, tmp_path, capsys):
    out = genai.build("mistral")
    first = tmp_path / "first" / "model.onnx"
    rewrite(out / "model.onnx", first, rules=LoraRule(name="slots", target_modules=["q_proj", "v_proj"], r=4,
                                                       strategy="dynamic"))
    report = find_sites(load_model(first))
    marked = sorted(s.path for s in report.sites if s.lora)  # k_proj too: its rows are in the packed node's slot
    assert marked == [f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "kqv"]
    assert main(["inspect", str(first)]) == 0
    assert "(has LoRA: lorapass slot)" in capsys.readouterr().out
    with pytest.raises(UnsupportedError, match="already has lorapass dynamic LoRA slots"):
        rewrite(first, tmp_path / "second" / "model.onnx", strategy="dynamic",
                rules=LoraRule(name="slots", target_modules=["o_proj"], r=4))


def test_genai_folder_carried_with_a_new_model_name(genai, tmp_path):
    import onnxruntime_genai as og
    model, _ = genai.model("llama")
    peft_model = make_adapter(model, tmp_path / "ad", r=4, lora_alpha=2, target_modules="all-linear")
    src = genai.build("llama")
    out = tmp_path / "out" / "merged.onnx"
    rewrite(src / "model.onnx", out, adapter=str(tmp_path / "ad"), strategy="merge")
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == ["genai_config.json", "merged.onnx", "merged.onnx.data", "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((out.parent / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "merged.onnx"
    assert json.loads((src / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "model.onnx"
    gen_params = og.GeneratorParams(og_model := og.Model(str(out.parent)))
    gen = og.Generator(og_model, gen_params)
    gen.append_tokens(PROMPT.astype(np.int32))
    assert rel_err(np.asarray(gen.get_output("logits")), peft_logits(peft_model)) <= 1e-4


def test_a_split_module_is_edited_as_one_weight(genai):
    """A Joined view: additive edits go to each node's rows; ``update(fn)`` sees the whole module (here a fn
    coupling the parts: scaled by the module's largest entry), as a kind editing a packed module needs."""
    from lorapass.onnx.storage import commit

    graph = load_model(genai.build("phi3", fuse_qkv="false") / "model.onnx")
    site = next(s for s in find_sites(graph).sites if s.path == "model.layers.0.self_attn.qkv_proj")
    rng = np.random.default_rng(0)
    up, down = rng.standard_normal((site.out_features, 2)).astype(np.float32), rng.standard_normal((2, 64)).astype(np.float32)
    before = site.storage.read()
    site.storage.add(up, down)
    site.storage.update(lambda w: w / np.abs(w).max())
    assert commit(site.storage.stores, graph.graph) == 3
    after = np.concatenate([view.store.value.const_value.numpy().T for view in site.storage.parts])
    expected = (before + up @ down) / np.abs(before + up @ down).max()
    np.testing.assert_allclose(after, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family,extra", [("llama", {}), ("phi3", {"fuse_qkv": "false"})], ids=["packed", "split"])
def test_verify_merges_packed_and_split_sites_independently(genai, tmp_path, family, extra):
    from genai import feeds
    from lorapass.verify import verify

    model, _ = genai.model(family)
    make_adapter(model, tmp_path / "ad", r=4, lora_alpha=2, target_modules="all-linear")
    base = genai.build(family, **extra) / "model.onnx"
    inputs = feeds(base, PROMPT)
    for strategy in ("merge", "dynamic"):
        out = tmp_path / strategy / "model.onnx"
        rewrite(base, out, adapter=str(tmp_path / "ad"), strategy=strategy)
        report = verify(base, out, tmp_path / "ad", inputs=inputs)
        assert report.passed and all(o.changed_from_base > 1e-2 for o in report.outputs if o.name == "logits")
