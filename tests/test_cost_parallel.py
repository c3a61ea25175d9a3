"""Collectives against the ring/tree formulas, and tensor, pipeline, expert, sequence and data parallelism."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from lorapass.cost import ops as O
from lorapass.cost.analysis import Analyser, ModelSource, Workload, evaluate_ops, sweep
from lorapass.cost.collectives import Placement, collective_time, p2p_link
from lorapass.cost.hw import load_spec
from lorapass.cost.parallel import Layout, enumerate_layouts, partition
from lorapass.rules import LoraRule

ROOT = Path(__file__).resolve().parents[1]
H100 = load_spec(ROOT / "hw_specs" / "h100.yaml")  # NVLink 450 GB/s, 3 us; IB 50 GB/s, 8 us; 8 per node
NVL, IB = H100.interconnect.intra_node, H100.interconnect.inter_node


def test_collective_formulas():
    s = 64e6
    assert collective_time("all_reduce", 8, s, NVL, "ring") == pytest.approx(2 * 7 * 3e-6 + 2 * 7 / 8 * s / 450e9)
    assert collective_time("all_reduce", 8, s, NVL, "tree") == pytest.approx(2 * 3 * 3e-6 + 2 * s / 450e9)
    assert collective_time("all_gather", 4, 1e9, NVL) == pytest.approx(3 * 3e-6 + 3 / 4 * 1e9 / 450e9)
    assert collective_time("reduce_scatter", 4, 1e9, NVL) == pytest.approx(3 * 3e-6 + 3 / 4 * 1e9 / 450e9)
    assert collective_time("all_to_all", 16, 2e6, IB) == pytest.approx(15 * 8e-6 + 15 / 16 * 2e6 / 50e9)
    assert collective_time("p2p", 2, 1e6, IB) == pytest.approx(8e-6 + 1e6 / 50e9)
    assert collective_time("all_reduce", 1, s, NVL) == 0
    # auto: the tree wins for small latency-bound messages, the ring for large ones
    small, large = 8e3, 1e9
    assert collective_time("all_reduce", 8, small, NVL) == pytest.approx(2 * 3 * 3e-6 + 2 * small / 450e9)
    assert collective_time("all_reduce", 8, large, NVL) == pytest.approx(2 * 7 * 3e-6 + 2 * 7 / 8 * large / 450e9)


def test_links_by_placement():
    assert Placement(8).link(H100) is NVL
    assert Placement(16).link(H100) is IB
    assert Placement(4, stride=2).link(H100) is NVL  # ranks 0,2,4,6
    assert Placement(4, stride=4).link(H100) is IB  # ranks 0,4,8,12
    assert p2p_link(H100, 7, 8) is IB and p2p_link(H100, 3, 4) is NVL


def _analyser(model: str, batch: int = 4, seq: int = 512, gen: int = 32, rules=None, strategy=None, spec=H100,
              algorithm="auto") -> Analyser:
    return Analyser(ModelSource(ROOT / "models" / model), spec, Workload(batch, seq, gen), rules, strategy, algorithm)


def test_tensor_parallel_all_reduces_follow_the_ring_formula():
    """Llama-2-7B TP 2, decode: one all-reduce of b*h*2 bytes per row-parallel linear (2 per layer) and the
    vocabulary-parallel embedding: 65 ring all-reduces."""
    an = _analyser("llama2-7b.yaml", batch=4, algorithm="ring")
    a = an.analyse(Layout(tp=2))
    ar = 2 * 1 / 2 * 3e-6 * 2 + 2 * 1 / 2 * (4 * 4096 * 2) / 450e9  # 2(N-1)a + 2(N-1)/N S/b, N=2
    assert a.phases["decode"].comm_time == pytest.approx(65 * ar)
    prefill_ar = 2 * 3e-6 + (4 * 512 * 4096 * 2) / 450e9
    assert a.phases["prefill"].comm_time == pytest.approx(65 * prefill_ar)


def test_lora_adds_no_collective_under_tp():
    """The LoRA output joins the base output before the all-reduce (row sites) or stays in the device's output
    shard (column sites): the communication is the base model's."""
    base = _analyser("llama2-7b.yaml").analyse(Layout(tp=4))
    lora = _analyser("llama2-7b.yaml", rules=LoraRule(target_modules="all-linear", r=64),
                     strategy="dynamic").analyse(Layout(tp=4))
    for phase in ("prefill", "decode"):
        assert lora.phases[phase].comm_time == pytest.approx(base.phases[phase].comm_time, rel=1e-12)  # summation order
        assert lora.phases[phase].time > base.phases[phase].time
    # A of a column site is replicated (full FLOPs), B split; A of a row site split, B replicated
    g = ModelSource(ROOT / "models/llama2-7b.yaml").graph(1, 8, 8)
    from lorapass.cost.lora import apply_dynamic, select

    lg = apply_dynamic(g, select(g, LoraRule(target_modules=["o_proj", "up_proj"], r=8, fuse_shared_inputs=False)))
    times = evaluate_ops(lg, H100, Layout(tp=4))
    by = {(op.kind, op.path): i for i, op in enumerate(lg.ops)}
    up, o = "model.layers.0.mlp.up_proj", "model.layers.0.self_attn.o_proj"
    assert times.flops[by[(O.GEMM_LORA_A, up)]] == 2 * 8 * 4096 * 8
    assert times.flops[by[(O.GEMM_LORA_B, up)]] == 2 * 8 * 8 * 11008 / 4
    assert times.flops[by[(O.GEMM_LORA_A, o)]] == 2 * 8 * 4096 * 8 / 4
    assert times.flops[by[(O.GEMM_LORA_B, o)]] == 2 * 8 * 8 * 4096
    assert times.comm[by[(O.GEMM, o)]] > 0 and times.comm[by[(O.GEMM_LORA_B, o)]] == 0


def test_tp_splits_weights_and_flops():
    an = _analyser("llama2-7b.yaml")
    one, four = an.analyse(Layout()), an.analyse(Layout(tp=4))
    # every linear and the embedding split 4 ways; the norms (replicated) are 2*4096*32+4096 parameters
    norms = (2 * 32 + 1) * 4096 * 2
    assert four.memory.weights == pytest.approx((one.memory.weights - norms) / 4 + norms)
    gemm = lambda a: a.phases["prefill"].classes["GEMM"]["flops"]  # noqa: E731
    assert gemm(four) == pytest.approx(gemm(one) / 4)


def test_sequence_parallel_splits_norms_and_keeps_ring_volume():
    an = _analyser("llama2-7b.yaml", algorithm="ring")
    tp, sp = an.analyse(Layout(tp=4)), an.analyse(Layout(tp=4, sp=True))
    for phase in ("prefill", "decode"):
        assert sp.phases[phase].comm_time == pytest.approx(tp.phases[phase].comm_time)  # RS + AG == ring AR
        assert sp.phases[phase].classes["NORM"]["flops"] == pytest.approx(tp.phases[phase].classes["NORM"]["flops"] / 4)
    assert sp.phases["prefill"].time < tp.phases["prefill"].time


def test_partition_is_optimal():
    rng = np.random.default_rng(3)
    for n, k in [(7, 3), (9, 4), (6, 6), (8, 2), (5, 1)]:
        costs = rng.uniform(0.1, 5, n)
        starts = partition(costs, k)
        got = max(costs[a:b].sum() for a, b in zip(starts, [*starts[1:], n]))
        best = min(max(costs[a:b].sum() for a, b in zip((0, *cuts), (*cuts, n)))
                   for cuts in itertools.combinations(range(1, n), k - 1))
        assert got == pytest.approx(best)


def test_pipeline_follows_gpipe():
    """Balanced stages: prefill with m micro-batches over p stages takes (m + p - 1) stage times, and the
    bubble is (p - 1) / (m + p - 1)."""
    an = _analyser("llama2-7b.yaml", batch=8, seq=1024, gen=16)
    for pp, m in [(2, 8), (4, 4), (4, 8)]:
        a = an.analyse(Layout(pp=pp, microbatches=m))
        stage = max(a.phases["prefill"].stage_times)
        assert a.phases["prefill"].time == pytest.approx((m + pp - 1) * stage, rel=0.01)
        assert a.phases["prefill"].bubble == pytest.approx((pp - 1) / (m + pp - 1), abs=0.03)
        # 32 layers balanced (the output head's decode weight reads may shift one layer off the last stage)
        assert sorted(sum(a.stages, [])) == list(range(32))
        assert all(abs(len(s) - 32 // pp) <= 1 for s in a.stages)
        # decode: m groups in flight; a round is max(m * slowest stage, one trip through all stages)
        d = a.phases["decode"]
        assert d.time == pytest.approx(max(d.microbatches * max(d.stage_times), sum(d.stage_times)))


def test_expert_parallel_mixtral():
    an = _analyser("mixtral-8x7b.yaml", batch=8, seq=256, gen=16)
    one, ep8 = an.analyse(Layout()), an.analyse(Layout(ep=8))
    experts = 32 * 8 * 3 * 4096 * 14336 * 2
    assert one.memory.weights - ep8.memory.weights == pytest.approx(experts * 7 / 8)
    # decode: 1 sequence per device, each token to 2 experts: dispatch and combine of 1*2*4096*2 bytes per layer
    a2a = 7 * 3e-6 + 7 / 8 * (1 * 2 * 4096 * 2) / 450e9
    assert ep8.phases["decode"].comm_time == pytest.approx(32 * 2 * a2a)
    with pytest.raises(Exception, match="ep=3"):
        an.analyse(Layout(ep=3))


def test_data_parallel_replicas_scale_throughput():
    a1 = _analyser("llama2-7b.yaml", batch=4).analyse(Layout())
    a2 = _analyser("llama2-7b.yaml", batch=8).analyse(Layout(dp=2))
    assert a2.tpot == pytest.approx(a1.tpot) and a2.tokens_per_s == pytest.approx(2 * a1.tokens_per_s)


def test_enumerate_and_sweep():
    an = _analyser("llama2-70b.yaml", batch=8)
    layouts = enumerate_layouts(an.meta, 8, 8)
    assert sorted((x.tp, x.pp, x.dp) for x in layouts) == sorted(
        (tp, pp, 8 // (tp * pp)) for tp in (1, 2, 4, 8) for pp in (1, 2, 4, 8) if tp * pp <= 8)
    s = sweep(an.source, H100, [1, 8], an.workload, analyser=an)
    assert len(s.results) == len(layouts) + 1
    fits = [a.memory.fits for a in s.results]
    assert fits == sorted(fits, reverse=True) and not s.results[-1].memory.fits  # 1 H100 cannot hold 70B
    ranked = [a.tokens_per_s for a in s.results if a.memory.fits]
    assert ranked == sorted(ranked, reverse=True)
