"""An ONNX export and the model config of the same architecture give the same operators; rewritten graphs too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers as tf
import yaml
from onnx import TensorProto, helper, numpy_helper

from builders import export
from lorapass.cost import ops as O
from lorapass.cost.analysis import Analyser, ModelSource, Workload, strip_lora
from lorapass.cost.config import build_graph, load_config
from lorapass.cost.hw import load_spec
from lorapass.cost.lora import apply_dynamic, select
from lorapass.cost.onnx_ops import load_onnx_graph
from lorapass.cost.parallel import Layout
from lorapass.errors import SpecError
from lorapass.rules import LoraRule

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(ONNX export of a tiny Llama, the models/-style config of the same architecture)."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    path = export(tf.LlamaForCausalLM(tf.LlamaConfig(**TINY)).eval(), folder / "model.onnx")
    cfg = folder / "tiny-llama.yaml"
    # the same fields as models/*.yaml (Hugging Face names), kept here: it is a test architecture
    cfg.write_text(yaml.safe_dump({"name": "tiny-llama", "family": "llama", "max_position_embeddings": 2048,
                                   "dtype": "fp32", **TINY}))
    return path, cfg


def _totals(graph, kinds):
    return {k: sum(op.flops for op in graph.ops if op.kind == k) for k in kinds}


@pytest.mark.parametrize("batch,seq", [(1, 1), (3, 11), (2, 64)])
def test_config_and_export_give_the_same_prefill_operators(tiny, batch, seq):
    onnx_path, cfg_path = tiny
    g_onnx = load_onnx_graph(onnx_path, batch, seq)
    g_cfg = build_graph(load_config(cfg_path), batch, seq, seq, attention="dense", logits="all")
    lin_onnx = {op.path: op for op in g_onnx.ops if op.kind == O.GEMM and op.path}
    lin_cfg = {op.path: op for op in g_cfg.ops if op.kind == O.GEMM}
    assert set(lin_onnx) == set(lin_cfg)  # the same module paths
    for path, op in lin_cfg.items():
        assert (lin_onnx[path].flops, lin_onnx[path].weight_bytes) == (op.flops, op.weight_bytes), path
    # hand formula: 2 * tokens * sum(in * out) over the 15 linears
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    assert sum(op.flops for op in lin_onnx.values()) == 2 * batch * seq * (2 * per_layer + 64 * 128)
    # dense attention: QK^T and PV 2*b*h*s*s*d each, softmax over b*h*s*s scores
    kinds = (O.ATTN_QK, O.ATTN_AV, O.SOFTMAX)
    assert _totals(g_onnx, kinds) == _totals(g_cfg, kinds)
    assert _totals(g_onnx, kinds)[O.ATTN_QK] == 2 * 2 * batch * 4 * seq * seq * 16
    meta = g_onnx.meta
    assert (meta.num_heads, meta.num_kv_heads, meta.head_dim, meta.num_layers) == (4, 2, 16, 2)


def test_config_and_export_give_the_same_decode_operators(tiny):
    """A decode step: the graph at seq 1 with the score axes stretched to the context."""
    onnx_path, cfg_path = tiny
    g_onnx = load_onnx_graph(onnx_path, 4, 1, 37.5)
    g_cfg = build_graph(load_config(cfg_path), 4, 1, 37.5, attention="dense", logits="all")
    kinds = (O.GEMM, O.ATTN_QK, O.ATTN_AV, O.SOFTMAX)
    assert _totals(g_onnx, kinds) == pytest.approx(_totals(g_cfg, kinds))
    assert _totals(g_onnx, kinds)[O.ATTN_AV] == 2 * 2 * 4 * 4 * 1 * 37.5 * 16
    # the K and V operands are KV-cache reads of the whole context
    qk = next(op for op in g_onnx.ops if op.kind == O.ATTN_QK)
    assert qk.kv_bytes == 4 * 4 * 16 * 37.5 * 4  # K expanded to 4 heads, fp32


def test_rules_select_the_same_sites_as_the_rewrite(tiny):
    from lorapass.onnx.load import load_model
    from lorapass.onnx.sites import find_sites
    from lorapass.plan import plan

    onnx_path, cfg_path = tiny
    rule = LoraRule(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1], r=4)
    report = find_sites(load_model(onnx_path))
    rewrite_targets = {t.site.path for t in plan(report.sites, rule, report.output_heads)}
    for graph in (load_onnx_graph(onnx_path, 1, 4), build_graph(load_config(cfg_path), 1, 4, 4)):
        assert set(select(graph, rule)) == rewrite_targets == {
            "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"}
    heads = LoraRule(target_modules="all-linear", r=4)
    assert "lm_head" not in select(load_onnx_graph(onnx_path, 1, 4), heads)


def test_dynamic_rewrite_is_recognised(tiny, tmp_path):
    """A graph rewritten with strategy dynamic: its LoRA MatMuls and Adds are the cost model's LoRA operators."""
    from lorapass.onnx.rewrite import rewrite

    onnx_path, cfg_path = tiny
    rule = LoraRule(target_modules="all-linear", r=4, rank_pattern={"o_proj": 8}, strategy="dynamic")
    out = tmp_path / "dynamic.onnx"
    result = rewrite(onnx_path, out, rules=rule)
    assert result.strategy == "dynamic"
    batch, seq = 2, 9
    g = load_onnx_graph(out, batch, seq)
    cfg_graph = build_graph(load_config(cfg_path), batch, seq, seq, attention="dense", logits="all")
    expected = apply_dynamic(cfg_graph, select(cfg_graph, rule))
    kinds = (O.GEMM_LORA_A, O.GEMM_LORA_B, O.LORA_ADD)
    assert _totals(g, kinds) == _totals(expected, kinds)
    t = batch * seq
    # by hand: B of every site 2*t*r*out, r=8 at o_proj, 4 elsewhere
    outs = 2 * (64 * 4 + 2 * 32 * 4 + 64 * 8 + 2 * 128 * 4 + 64 * 4)
    assert _totals(g, kinds)[O.GEMM_LORA_B] == 2 * t * outs
    paths = {op.path for op in g.ops if op.kind == O.GEMM_LORA_B}
    assert paths == {t.site.path for t in result.targets}
    base = strip_lora(g)
    assert _totals(base, (O.GEMM,)) == _totals(load_onnx_graph(onnx_path, batch, seq), (O.GEMM,))
    spec = load_spec(ROOT / "hw_specs" / "h100.yaml")
    a = Analyser(ModelSource(out), spec, Workload(batch, seq, 4)).analyse(Layout())
    assert a.strategy == "in-graph" and a.lora_sites == 14
    assert a.overhead["prefill"] > 0 and a.overhead["decode"] > 0
    with pytest.raises(Exception, match="already holds LoRA"):
        Analyser(ModelSource(out), spec, Workload(batch, seq, 4), rule)


@pytest.mark.parametrize("family,config", [
    ("gpt2", dict(family="gpt2", hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=96, max_position_embeddings=64, tie_word_embeddings=True)),
    ("bert", dict(family="bert", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=96, max_position_embeddings=64)),
])
def test_other_families_match_their_export(exported, tmp_path, family, config):
    _, onnx_path = exported(family)
    path = tmp_path / f"{family}.yaml"
    path.write_text(yaml.safe_dump({"name": family, "dtype": "fp32", **config}))
    g_onnx = load_onnx_graph(onnx_path, 2, 5)
    g_cfg = build_graph(load_config(path), 2, 5, 5, attention="dense", logits="all")
    lin = lambda g: {op.path: op.flops for op in g.ops if op.kind == O.GEMM and op.path}  # noqa: E731
    assert lin(g_onnx) == lin(g_cfg)
    kinds = (O.ATTN_QK, O.ATTN_AV)
    assert _totals(g_onnx, kinds) == _totals(g_cfg, kinds)


def test_unbound_symbolic_dimension_is_named(tmp_path):
    table = numpy_helper.from_array(np.ones((10, 4), np.float32), "emb.weight")
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "proj.weight")
    nodes = [helper.make_node("Gather", ["emb.weight", "ids"], ["h"]),
             helper.make_node("MatMul", ["h", "proj.weight"], ["y"]),
             helper.make_node("MatMul", ["side", "proj.weight"], ["y2"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
                                           helper.make_tensor_value_info("side", TensorProto.FLOAT, ["extra", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)], [table, w])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(SpecError, match="extra"):
        load_onnx_graph(path, 2, 3)
    g = load_onnx_graph(path, 2, 3, dims={"extra": 5})
    assert sum(op.flops for op in g.ops if op.kind == O.GEMM) == 2 * (2 * 3 + 5) * 4 * 3
