"""PEFT's LoRA beyond A/B pairs on real exports: DoRA, embedding LoRA, LoRA bias, modules_to_save, SEQ_CLS heads and
trainable tokens, merged and dynamic, against PEFT's own unmerged eager output; dynamic graphs hot-swap a second
adapter through export-adapter + ONNX Runtime's LoraAdapter, and DoRA graphs run a plain LoRA adapter file."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import onnx
import pytest
import torch
import transformers as tf
from builders import VOCAB, eager, example_ids, export, rel_err, run_onnx
from variants import make_variant

from lorapass.cli import main
from lorapass.ort_adapter import Session
from lorapass.verify import verify

TOL = 1e-4


def _tiny(cls, **extra):
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra)
    return cls(config).eval()


EXTRA_MODELS = {"seqcls": lambda: _tiny(tf.LlamaForSequenceClassification, num_labels=3, pad_token_id=0)}
"""Models the shared builders do not make (GPT-2 is the tied-embedding case: its lm_head shares wte)."""


@pytest.fixture(scope="module")
def model(exported, tmp_path_factory):
    """``model(name)`` -> (torch model, ONNX path): a shared builder family (``bert-ts`` is the TorchScript
    export) or one of EXTRA_MODELS, each exported once."""
    cache = {}

    def get(name: str):
        if name in EXTRA_MODELS:
            if name not in cache:
                made = EXTRA_MODELS[name]()
                cache[name] = (made, export(made, tmp_path_factory.mktemp(name) / "model.onnx"))
            return cache[name]
        family, _, exporter = name.partition("-")
        return exported(family, dynamo=exporter != "ts")

    return get


def rewrite(base, adapter, strategy, out, *extra) -> None:
    assert main(["rewrite", str(base), "--adapter", str(adapter), "--strategy", strategy, "-o", str(out), *extra]) == 0


def export_adapter(adapter, graph, out):
    assert main(["export-adapter", str(adapter), "--model", str(graph), "-o", str(out)]) == 0
    return out


CASES = {  # name -> (model, LoraConfig keywords of the case, keywords of its hot-swapped second adapter)
    "dora-llama-all-linear": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True),
                              dict(r=2, lora_alpha=4, target_modules="all-linear", use_dora=True)),
    "dora-qwen2-rslora-rank-pattern": ("qwen2", dict(r=8, lora_alpha=16, use_rslora=True, use_dora=True,
                                                     target_modules=["q_proj", "v_proj", "o_proj"],
                                                     rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 4}),
                                       dict(r=4, lora_alpha=4, use_dora=True, target_modules=["q_proj", "v_proj", "o_proj"])),
    "dora-gpt2-conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True, fan_in_fan_out=True),
                         dict(r=2, lora_alpha=2, target_modules=["c_attn", "c_fc"], use_dora=True, fan_in_fan_out=True)),
    "dora-bert-torchscript": ("bert-ts", dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], use_dora=True),
                              dict(r=2, lora_alpha=8, target_modules=["query", "value", "dense"], use_dora=True)),
    "embedding-untied": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
                         dict(r=2, lora_alpha=4, target_modules=["embed_tokens"])),  # q_proj back to the base
    "embedding-tied": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["wte", "c_proj"]),
                       dict(r=8, lora_alpha=8, target_modules=["wte", "c_proj"])),
    "embedding-dora": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "down_proj"], use_dora=True),
                       dict(r=2, lora_alpha=8, target_modules=["embed_tokens", "down_proj"], use_dora=True)),
    "lora-bias-no-base-bias": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], lora_bias=True),
                               dict(r=2, lora_alpha=8, target_modules=["q_proj", "down_proj"], lora_bias=True)),
    "bias-all-norms": ("opt", dict(r=4, lora_alpha=8, target_modules=["v_proj"], bias="all"),  # LayerNorm biases too
                       dict(r=2, lora_alpha=8, target_modules=["v_proj"], bias="all")),
    "bias-all-norms-torchscript": ("bert-ts", dict(r=4, lora_alpha=8, target_modules=["query"], bias="all"),
                                   dict(r=2, lora_alpha=8, target_modules=["query"], bias="all")),
    "modules-to-save-norm": ("opt", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                         modules_to_save=["final_layer_norm"]),
                             dict(r=2, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["final_layer_norm"])),
    "modules-to-save-rmsnorm": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["norm"]),
                                dict(r=2, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["norm"])),
    "modules-to-save-lm-head": ("llama", dict(r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["lm_head"]),
                                dict(r=2, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["lm_head"])),
    "seq-cls-score": ("seqcls", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"),
                      dict(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")),
    "trainable-tokens": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[3, 5, 7]),
                         dict(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[5, 60])),
    "trainable-tokens-tied": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn"], trainable_token_indices=[2, 9]),
                              dict(r=4, lora_alpha=8, target_modules=["c_attn"], trainable_token_indices=[9, 40, 41])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_variant_matches_peft_merged_and_dynamic_with_hot_swap(model, tmp_path, case):
    family, config, second_config = CASES[case]
    torch_model, base = model(family)
    first = make_variant(torch_model, tmp_path / "first", seed=1, **config)
    ids = example_ids(batch=2, seq=9, seed=3)
    expected = eager(first, ids)
    assert rel_err(eager(torch_model, ids), expected) > 1e-3  # the adapter changes the output

    merged, dynamic = tmp_path / "merged.onnx", tmp_path / "dynamic.onnx"
    rewrite(base, tmp_path / "first", "merge", merged)
    assert rel_err(run_onnx(merged, ids), expected) <= TOL
    rewrite(base, tmp_path / "first", "dynamic", dynamic)
    assert rel_err(run_onnx(dynamic, ids), expected) <= TOL  # the graph's defaults are the adapter
    assert verify(base, merged, tmp_path / "first").passed  # the independent numpy reference agrees

    # hot swap through ONNX Runtime adapter files: the second adapter, then the first again
    second = make_variant(torch_model, tmp_path / "second", seed=2, **second_config)
    session = Session(dynamic)
    for name in ("first", "second"):
        session.add_adapter(name, export_adapter(tmp_path / name, dynamic, tmp_path / f"{name}.onnx_adapter"))
    feeds = {"input_ids": ids.numpy()}
    assert rel_err(session.run(feeds, adapter="second")[0], eager(second, ids)) <= TOL
    assert rel_err(session.run(feeds, adapter="first")[0], expected) <= TOL
    if config.get("use_dora"):  # a plain LoRA adapter file runs on the DoRA graph (factor 1)
        plain = make_variant(torch_model, tmp_path / "plain", seed=3, **(second_config | {"use_dora": False}))
        session.add_adapter("plain", export_adapter(tmp_path / "plain", dynamic, tmp_path / "plain.onnx_adapter"))
        assert rel_err(session.run(feeds, adapter="plain")[0], eager(plain, ids)) <= TOL
        factors = [t for t in onnx.load(dynamic).graph.initializer if t.name.endswith(".dora_factor")]
        assert factors and max(np.abs(onnx.numpy_helper.to_array(t) - 1).max() for t in factors) > 1e-2  # DoRA != LoRA


def test_lora_ready_dora_slots_hot_swap_dora_embedding_and_plain_adapters(model, tmp_path):
    """``--target ... --dora``: zero slots with unit factors equal the base; a DoRA adapter (linear and embedding)
    and a plain one covering other modules swap on one session, each matching PEFT."""
    torch_model, base = model("llama")
    ready = tmp_path / "ready.onnx"
    targets = ["q_proj", "k_proj", "v_proj", "down_proj", "embed_tokens"]
    assert main(["rewrite", str(base), "--strategy", "dynamic", "--target", *targets, "--rank", "8", "--dora",
                 "-o", str(ready)]) == 0
    ids = example_ids(seed=6)
    np.testing.assert_array_equal(run_onnx(ready, ids), run_onnx(base, ids))
    dora = make_variant(torch_model, tmp_path / "dora", seed=7, r=4, lora_alpha=8, use_dora=True,
                        target_modules=["q_proj", "v_proj", "embed_tokens"])
    plain = make_variant(torch_model, tmp_path / "plain", seed=8, r=16, lora_alpha=16, target_modules=["k_proj", "down_proj"])
    session = Session(ready)
    for name in ("dora", "plain"):
        session.add_adapter(name, export_adapter(tmp_path / name, ready, tmp_path / f"{name}.onnx_adapter"))
    feeds = {"input_ids": ids.numpy()}
    for _ in range(2):
        assert rel_err(session.run(feeds, adapter="dora")[0], eager(dora, ids)) <= TOL
        assert rel_err(session.run(feeds, adapter="plain")[0], eager(plain, ids)) <= TOL


def test_dora_adapter_needs_dora_slots(model, tmp_path, capsys):
    torch_model, base = model("llama")
    ready = tmp_path / "ready.onnx"
    assert main(["rewrite", str(base), "--strategy", "dynamic", "--target", "q_proj", "-o", str(ready)]) == 0
    make_variant(torch_model, tmp_path / "dora", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    out = tmp_path / "dora.onnx_adapter"
    assert main(["export-adapter", str(tmp_path / "dora"), "--model", str(ready), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "q_proj.lora_magnitude_vector" in err and "--dora" in err and not out.exists()


def test_saved_base_embedding_equal_is_reported_different_is_applied(model, tmp_path, capsys):
    """PEFT saves the whole base table with an embedding LoRA and loads it back into the model: equal to the graph's
    it changes nothing (inspect says so); a different one replaces the graph's table, as PEFT's load does."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    torch_model, base = model("llama")
    make_variant(torch_model, tmp_path / "ad", seed=2, r=4, lora_alpha=8, target_modules=["embed_tokens"])
    assert main(["inspect", str(base), "--adapter", str(tmp_path / "ad"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["adapter_modules"]["model.embed_tokens"]
    assert info["kind"] == "embedding lora" and info["saved_base_weight"].startswith("equal")
    file = tmp_path / "ad" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[key] = tensors[key] + 0.5 * torch.randn(tensors[key].shape, generator=torch.Generator().manual_seed(0))
    save_file(tensors, str(file))
    assert main(["inspect", str(base), "--adapter", str(tmp_path / "ad"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["adapter_modules"]["model.embed_tokens"]
    assert info["saved_base_weight"].startswith("differs") and info["elements"] == VOCAB * 32 + 4 * (VOCAB + 32)
    loaded = PeftModel.from_pretrained(copy.deepcopy(torch_model), str(tmp_path / "ad")).eval()
    ids = example_ids(seed=9)
    for strategy in ("merge", "dynamic"):
        rewrite(base, tmp_path / "ad", strategy, tmp_path / f"{strategy}.onnx")
        assert rel_err(run_onnx(tmp_path / f"{strategy}.onnx", ids), eager(loaded, ids)) <= TOL


def test_inspect_reports_replaced_modules_and_token_rows(model, tmp_path, capsys):
    torch_model, base = model("llama")
    make_variant(torch_model, tmp_path / "ad", seed=3, r=4, lora_alpha=8, target_modules=["q_proj"],
                 modules_to_save=["lm_head"], trainable_token_indices=[4, 8])
    assert main(["inspect", str(base), "--adapter", str(tmp_path / "ad")]) == 0
    out = capsys.readouterr().out
    assert f"adapter module 'lm_head': replaced module, {VOCAB * 32} elements" in out  # the head ships whole
    assert "adapter module 'model.embed_tokens': trainable tokens, 64 elements" in out and "[4, 8]" in out
    assert re.search(r"^lm_head\s.*ad: replaced module$", out, re.M)  # a site although all-linear skips heads


@pytest.mark.parametrize("edit,message", [
    (lambda c, t: c.update(peft_type="LOHA"), "peft_type='LOHA' is not supported"),
    (lambda c, t: c.update(trainable_token_indices=[3, VOCAB]), f"out of range: [{VOCAB}]"),
    (lambda c, t: t.update({"base_model.model.model.layers.0.mlp.act_fn.weight": torch.ones(32)}),
     "'model.layers.0.mlp.act_fn' matches no site"),  # SiLU holds no weight (a norm's would be applied: PEFT loads it)
    (lambda c, t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.hada_w1_a": torch.ones(32, 4)}),
     "hada_w1_a' is not a LoRA tensor"),
], ids=["loha", "token-out-of-range", "non-site-module", "loha-key"])
def test_unsupported_variants_are_refused_by_name(model, tmp_path, capsys, edit, message):
    from safetensors.torch import load_file, save_file

    torch_model, base = model("llama")
    make_variant(torch_model, tmp_path / "ad", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"],
                 trainable_token_indices=[3, 5])
    config_file, file = tmp_path / "ad" / "adapter_config.json", tmp_path / "ad" / "adapter_model.safetensors"
    config, tensors = json.loads(config_file.read_text()), load_file(str(file))
    edit(config, tensors)
    config_file.write_text(json.dumps(config))
    save_file(tensors, str(file))
    out = tmp_path / "out.onnx"
    assert main(["rewrite", str(base), "--adapter", str(tmp_path / "ad"), "-o", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_analyser_costs_dora_factor_and_merge_norm():
    """DoRA dynamic: one more per-output multiply per site (t·out FLOPs, the factor [out] read); DoRA merge: the norm
    and rescale add 3·in·out FLOPs; the adapter grows by the factors."""
    from lorapass.cost import ops as O
    from lorapass.cost.config import ModelConfig, build_graph
    from lorapass.cost.lora import adapter_bytes, apply_dynamic, merge_ops, select
    from lorapass.rules import LoraRule

    tiny = ModelConfig(name="tiny", family="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                       dtype="bf16")
    g, t, e = build_graph(tiny, 2, 5, 5), 10, 2
    plain, dora = (LoraRule(target_modules=["down_proj"], r=4, strategy="dynamic", use_dora=d) for d in (False, True))
    lora_ops = {rule.use_dora: apply_dynamic(g, select(g, rule)).ops for rule in (plain, dora)}
    extra = [op for op in lora_ops[True] if op.name.endswith(".dora_mul")]
    assert len(lora_ops[True]) == len(lora_ops[False]) + 2 and len(extra) == 2  # one per layer's down_proj
    assert all((op.kind, op.flops, op.weight_bytes) == (O.LORA_ADD, t * 64, 64 * e) for op in extra)
    merges = {rule.use_dora: merge_ops(g, select(g, rule)) for rule in (plain, dora)}
    for m_plain, m_dora in zip(merges[False], merges[True]):
        assert m_dora.flops - m_plain.flops == 3 * 128 * 64 and m_dora.weight_bytes == m_plain.weight_bytes
    assert adapter_bytes(g, select(g, dora)) - adapter_bytes(g, select(g, plain)) == 2 * 64 * e


def test_multi_refuses_kinds_its_banks_cannot_carry(model, tmp_path, capsys):
    """Mixed-adapter banks hold A/B pairs (and LoRA biases) only; DoRA (PEFT refuses it in mixed batches too) and
    embedding LoRA (PEFT runs it per sub-batch) are refused by key, each with its own reason."""
    torch_model, base = model("llama")
    for name, extra, why in (("dora", {"use_dora": True, "target_modules": ["q_proj"]},
                              "PEFT refuses DoRA in mixed batches too"),
                             ("embedding", {"target_modules": ["embed_tokens", "q_proj"]},
                              "PEFT runs this per sub-batch")):
        make_variant(torch_model, tmp_path / name, seed=4, r=4, lora_alpha=8, **extra)
        out = tmp_path / f"{name}.onnx"
        assert main(["rewrite", str(base), "--strategy", "multi", "--adapter", str(tmp_path / name), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert "not an additive low-rank delta" in err and why in err and not out.exists()


def test_a_weight_on_an_adapter_that_replaces_tensors_is_refused_by_module(model, tmp_path, capsys):
    """``PATH:WEIGHT`` scales LoRA deltas; a copied head (modules_to_save) or trained bias cannot be scaled, so a
    weighted adapter holding one is refused by name instead of applied unweighted."""
    torch_model, base = model("llama")
    make_variant(torch_model, tmp_path / "ad", seed=6, r=4, lora_alpha=8, target_modules=["v_proj"],
                 modules_to_save=["lm_head"])
    out = tmp_path / "out.onnx"
    assert main(["rewrite", str(base), "--adapter", f"{tmp_path / 'ad'}:0.5", "--strategy", "merge", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "lm_head" in err and "cannot scale" in err and not out.exists()
    assert main(["rewrite", str(base), "--adapter", f"{tmp_path / 'ad'}:1", "--strategy", "merge", "-o", str(out)]) == 0
