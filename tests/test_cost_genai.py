"""The cost model on onnxruntime-genai builder graphs: packed q/k/v rows selected and priced module by module, as
the rewrite's packed slot computes them, and the builder's KV-cache dims bound without --dims."""

from __future__ import annotations

import pytest

from genai import SIZES
from lorapass.cost import ops as O
from lorapass.cost.lora import adapter_bytes, apply_dynamic, merge_ops, select
from lorapass.cost.onnx_ops import load_onnx_graph
from lorapass.onnx.rewrite import rewrite
from lorapass.rules import LoraRule

HIDDEN, HEADS, KV_HEADS = SIZES["hidden_size"], SIZES["num_attention_heads"], 2  # the llama family's kv heads
HEAD = HIDDEN // HEADS
ROWS = {"q_proj": HEADS * HEAD, "k_proj": KV_HEADS * HEAD, "v_proj": KV_HEADS * HEAD}
RULE = LoraRule(name="qv", target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8, strategy="dynamic")


@pytest.fixture(scope="module")
def built(genai):
    return genai.build("llama") / "model.onnx"


def test_packed_qkv_is_three_modules_of_the_config_shapes(built):
    graph = load_onnx_graph(built, batch=2, q_len=5)  # dims bound from the graph and genai_config.json
    packed = [op for op in graph.ops if op.blocks]
    assert len(packed) == SIZES["num_hidden_layers"]
    for op in packed:
        assert [(p.rsplit(".", 1)[1], rows) for p, rows in op.blocks] == list(ROWS.items())
        assert op.flops == 2.0 * 2 * 5 * HIDDEN * sum(ROWS.values())
    paths = graph.linear_paths()
    assert "model.layers.0.self_attn.q_proj" in paths and "model.layers.0.self_attn.qkv_proj" not in paths


def test_lora_on_packed_rows_costs_what_the_rewritten_graph_runs(built, tmp_path):
    base = load_onnx_graph(built, batch=1, q_len=7)
    selection = select(base, RULE)
    assert {p.rsplit(".", 1)[1] for p in selection} == {"q_proj", "v_proj", "down_proj"}
    predicted = {(op.kind, op.path): op.flops for op in apply_dynamic(base, selection).ops if op.kind in O.LORA_CLASSES}
    # the packed slot: one A of rank r_q + r_v, one B over all q/k/v rows, one Add
    qkv = "model.layers.0.self_attn.qkv_proj"
    assert predicted[(O.GEMM_LORA_A, qkv)] == 2.0 * 7 * HIDDEN * 8
    assert predicted[(O.GEMM_LORA_B, qkv)] == 2.0 * 7 * 8 * sum(ROWS.values())
    slots = rewrite(built, tmp_path / "slots" / "model.onnx", rules=RULE, progress=False).output
    found = {(op.kind, op.path): op.flops for op in load_onnx_graph(slots, batch=1, q_len=7).ops
             if op.kind in O.LORA_CLASSES}
    assert found == predicted
    merged = {op.path: op for op in merge_ops(base, selection)}
    q = "model.layers.0.self_attn.q_proj"
    assert merged[q].out_features == ROWS["q_proj"] and merged[q].flops == 2.0 * 4 * HIDDEN * ROWS["q_proj"]
    inter = SIZES["intermediate_size"]
    per_layer = 4 * (HIDDEN + ROWS["q_proj"]) + 4 * (HIDDEN + ROWS["v_proj"]) + 4 * (inter + HIDDEN)
    assert adapter_bytes(base, selection) == 4.0 * SIZES["num_hidden_layers"] * per_layer  # fp32


def test_decode_binds_the_cache_length(built):
    short, long = (load_onnx_graph(built, batch=1, q_len=1, kv_len=k) for k in (33, 65))
    attention = [[op.flops for op in g.ops if op.kind == O.ATTENTION] for g in (short, long)]
    assert attention[0] and all(b == pytest.approx(a * 65 / 33) for a, b in zip(*attention))


def test_fused_attention_names_the_heads_tensor_parallelism_splits(built, capsys):
    from pathlib import Path

    from lorapass.cli import main

    meta = load_onnx_graph(built, batch=1, q_len=4).meta
    assert (meta.num_heads, meta.num_kv_heads, meta.head_dim) == (HEADS, KV_HEADS, HEAD)
    hw = str(Path(__file__).resolve().parents[1] / "hw_specs" / "h100.yaml")
    assert main(["analyse", str(built), "--hw", hw, "--tp", "2", "--batch", "2", "--seq", "16", "--gen", "4",
                 "--target", "all-linear", "--strategy", "merge"]) == 0
    assert "LoRA merge on 14 sites" in capsys.readouterr().out  # 2 layers x q, k, v, o, gate, up, down
