"""Operator FLOPs and bytes against hand-derived formulas: GEMM, attention, LoRA A/B/Add, merge, KV cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lorapass.cost import ops as O
from lorapass.cost.analysis import Analyser, ModelSource, Workload
from lorapass.cost.config import ModelConfig, build_graph, load_config, visible_pairs
from lorapass.cost.hw import load_spec
from lorapass.cost.lora import apply_dynamic, merge_ops, select
from lorapass.cost.parallel import Layout
from lorapass.rules import LoraRule, RuleSet

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(name="tiny", family="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                   dtype="bf16")


def test_gemm():
    # x[6,10] @ W[10,7] in bf16: 2*6*10*7 FLOPs; W 10*7*2 B, x 6*10*2 B read, y 6*7*2 B written
    op = O.gemm("l", "l", 6, 10, 7, 2, layer=0, tp="col", inputs=("x",), outputs=("y",))
    assert op.flops == 840
    assert (op.weight_bytes, op.act_in, op.act_out) == (140, 120, 84)
    assert op.bytes == 344 and op.intensity == pytest.approx(840 / 344)


def test_dense_attention():
    # b=2 sequences, q=k=5, h=4 heads, g=2 KV heads, d=8, bf16, KV cache
    qk, sm, av = O.attention_ops("a", 2, 5, 5, 4, 2, 8, 2, 2, layer=0, mode="dense", causal=True,
                                 inputs=("q", "k", "v"), output="o")
    scores = 2 * 4 * 5 * 5
    assert qk.flops == 2 * scores * 8 == av.flops == 3200
    assert sm.flops == 5 * scores
    assert qk.act_out == scores * 2 and sm.act_in == sm.act_out == scores * 2
    # K and V (2) of the 5-token context read once per KV head: 2 * b*g*k*d elements, 2 bytes each; the 5 new
    # tokens' K and V written to the cache: 2 * b*g*q*d elements
    read, write = 2 * (2 * 2 * 5 * 8) * 2, 2 * (2 * 2 * 5 * 8) * 2
    assert qk.kv_bytes + av.kv_bytes == read + write == 1280


def test_flash_attention_skips_masked_pairs():
    (op,) = O.attention_ops("a", 1, 6, 6, 2, 2, 4, 2, 2, layer=0, mode="flash", causal=True,
                            inputs=("q", "k", "v"), output="o")
    pairs = 6 * 7 / 2  # query i sees i keys
    assert op.flops == pytest.approx((4 * 4 + 5) * 2 * pairs)
    assert op.act_out == 1 * 2 * 6 * 4 * 2  # the output, never the scores


@pytest.mark.parametrize("q,k,window", [(7, 7, None), (1, 9, None), (7, 7, 3), (3, 10, 4), (10, 10, 16), (4, 4, 1)])
def test_visible_pairs_by_enumeration(q, k, window):
    expected = sum(1 for p in range(k - q + 1, k + 1) for j in range(1, p + 1) if not window or p - j < window)
    assert visible_pairs(q, k, True, window) == expected


def test_decode_at_average_context_equals_mean_of_steps():
    """gen decode steps over seq+1 .. seq+gen keys cost, on average, one step at seq + (gen+1)/2."""
    seq, gen = 100, 37
    steps = [build_graph(TINY, 3, 1, seq + i + 1) for i in range(gen)]
    mean = {key: np.mean([sum(getattr(op, key) for op in g.ops if op.kind == O.ATTENTION) for g in steps])
            for key in ("flops", "kv_bytes")}
    avg = build_graph(TINY, 3, 1, Workload(3, seq, gen).decode_context)
    for key, value in mean.items():
        assert sum(getattr(op, key) for op in avg.ops if op.kind == O.ATTENTION) == pytest.approx(value)


def test_active_experts_by_simulation():
    rng = np.random.default_rng(0)
    for tokens in (1, 3, 20):
        hits = [len({e for _ in range(tokens) for e in rng.choice(8, 2, replace=False)}) for _ in range(4000)]
        assert float(O.active_experts(8, 2, tokens)) == pytest.approx(np.mean(hits), rel=0.02)


def _site(graph, path):
    return next(op for op in graph.ops if op.path == path and op.kind == O.GEMM)


def test_lora_operators_per_site():
    """A: 2*t*in*r FLOPs reading r*in weights; B: 2*t*r*out reading r*out; ADD: t*out."""
    g = build_graph(TINY, 2, 5, 5)
    rule = LoraRule(target_modules=["o_proj"], r=4, strategy="dynamic")
    lora = apply_dynamic(g, select(g, rule))
    t, e = 10, 2
    a = next(op for op in lora.ops if op.kind == O.GEMM_LORA_A and op.path == "model.layers.0.self_attn.o_proj")
    b = next(op for op in lora.ops if op.kind == O.GEMM_LORA_B and op.path == "model.layers.0.self_attn.o_proj")
    add = next(op for op in lora.ops if op.kind == O.LORA_ADD and op.path == "model.layers.0.self_attn.o_proj")
    assert (a.flops, a.weight_bytes, a.act_in, a.act_out) == (2 * t * 64 * 4, 4 * 64 * e, t * 64 * e, t * 4 * e)
    assert (b.flops, b.weight_bytes, b.act_in, b.act_out) == (2 * t * 4 * 64, 4 * 64 * e, t * 4 * e, t * 64 * e)
    assert (add.flops, add.act_in, add.act_out) == (t * 64, 2 * t * 64 * e, t * 64 * e)
    assert len([op for op in lora.ops if op.kind in O.LORA_CLASSES]) == 2 * 3  # one site per layer
    assert len(lora.ops) == len(g.ops) + 6


def test_shared_input_sites_share_one_a_product():
    """As the rewrite's fuse_shared_inputs: q/k/v read one activation, so one A over their concatenated ranks."""
    g = build_graph(TINY, 1, 3, 3)
    rules = RuleSet(rules=[LoraRule(target_modules=["q_proj", "k_proj", "v_proj"], r=2, rank_pattern={"v_proj": 6},
                                    strategy="dynamic", fuse_shared_inputs=True)])
    lora = apply_dynamic(g, select(g, rules))
    a = [op for op in lora.ops if op.kind == O.GEMM_LORA_A and op.layer == 0]
    assert len(a) == 1 and a[0].flops == 2 * 3 * 64 * (2 + 2 + 6)
    assert a[0].paths == tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    unfused = apply_dynamic(g, select(g, RuleSet(rules=[LoraRule(target_modules=["q_proj", "k_proj", "v_proj"], r=2,
                                                                 rank_pattern={"v_proj": 6}, strategy="dynamic",
                                                                 fuse_shared_inputs=False)])))
    assert sum(op.flops for op in unfused.ops if op.kind == O.GEMM_LORA_A) == \
        sum(op.flops for op in lora.ops if op.kind == O.GEMM_LORA_A)


def test_merge_cost_per_site():
    """2*r*in*out FLOPs, reading and writing W (and reading A and B), once per site."""
    g = build_graph(TINY, 1, 1, 1)
    sel = select(g, LoraRule(target_modules=["down_proj"], r=8))
    merges = merge_ops(g, sel)
    assert [m.path for m in merges] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    for m in merges:
        assert m.flops == 2 * 8 * 128 * 64
        assert m.weight_bytes == 2 * 128 * 64 * 2 + 8 * (128 + 64) * 2


def test_merge_has_no_per_token_cost_and_dynamic_reports_overhead():
    spec = load_spec(ROOT / "hw_specs" / "h100.yaml")
    src = ModelSource(ROOT / "models" / "llama2-7b.yaml")
    w = Workload(4, 512, 64)
    rule = LoraRule(target_modules="all-linear", r=16)
    base = Analyser(src, spec, w).analyse(Layout())
    merged = Analyser(src, spec, w, rule, "merge").analyse(Layout())
    dynamic = Analyser(src, spec, w, rule, "dynamic").analyse(Layout())
    assert merged.phases["prefill"].time == base.phases["prefill"].time
    assert merged.phases["decode"].time == base.phases["decode"].time
    assert merged.lora_sites == dynamic.lora_sites == 7 * 32
    m = merged.phases["merge"]
    assert m.flops == pytest.approx(2 * 16 * sum(op.in_features * op.out_features for op in src.graph(1, 1, 1).ops
                                                  if op.kind == O.GEMM and op.path != "lm_head"))
    over = dynamic.overhead
    for phase in ("prefill", "decode"):
        assert over[phase] == pytest.approx(100 * (dynamic.phases[phase].time - base.phases[phase].time)
                                            / base.phases[phase].time)
        assert over[phase] > 0


def test_kv_cache_memory():
    """2 * layers * kv_heads * head_dim * (seq+gen) * batch * bytes, for the whole model on one device."""
    spec = load_spec(ROOT / "hw_specs" / "h100.yaml")
    a = Analyser(ModelSource(ROOT / "models" / "llama2-70b.yaml"), spec, Workload(8, 2048, 256)).analyse(Layout())
    assert a.memory.kv_cache == 2 * 80 * 8 * 128 * (2048 + 256) * 8 * 2
    assert a.memory.weights == load_config(ROOT / "models/llama2-70b.yaml").param_count() * 2
    assert not a.memory.fits  # 138 GB of bf16 weights on one 80 GB H100
    tp8 = Analyser(ModelSource(ROOT / "models" / "llama2-70b.yaml"), spec, Workload(8, 2048, 256)).analyse(Layout(tp=8))
    assert tp8.memory.kv_cache == a.memory.kv_cache / 8 and tp8.memory.fits


def test_roofline_time_and_bound():
    """One GEMM op alone: time = max(FLOPs/(peak*eff), bytes/(bw*eff))."""
    from lorapass.cost.analysis import evaluate_ops
    from lorapass.cost.ops import GraphMeta, OpGraph

    spec = load_spec(ROOT / "hw_specs" / "a100.yaml")
    meta = GraphMeta("g", "g", 1, 4096, 32, 32, 128, dtype="bf16")
    for t in (1, 4096):
        op = O.gemm("l", "l", t, 4096, 4096, 2, layer=0, tp="col", inputs=("x",), outputs=("y",))
        times = evaluate_ops(OpGraph([op], meta), spec, Layout())
        compute = 2 * t * 4096 * 4096 / (312e12 * 0.7)
        memory = (4096 * 4096 + 2 * t * 4096) * 2 / (2.039e12 * 0.8)
        assert times.time[0] == pytest.approx(max(compute, memory))
        assert (times.compute[0] >= times.memory[0]) == (t == 4096)  # decode GEMV memory-bound, prefill compute


def test_phase_classes_cover_every_operator():
    spec = load_spec(ROOT / "hw_specs" / "h100.yaml")
    a = Analyser(ModelSource(ROOT / "models" / "mixtral-8x7b.yaml"), spec, Workload(2, 128, 16),
                 LoraRule(target_modules="all-linear", r=8), "dynamic").analyse(Layout(tp=2))
    for phase in a.phases.values():
        assert sum(r["share"] for r in phase.classes.values()) == pytest.approx(1.0)
        assert sum(r["count"] for r in phase.classes.values()) == len(phase.ops)
        assert {"GEMM", "GEMM_EXPERT", "GEMM_LORA_A", "GEMM_LORA_B", "ADD", "ATTENTION"} <= set(phase.classes)
