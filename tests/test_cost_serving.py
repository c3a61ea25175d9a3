"""Serving many adapters: every cost term against hand-computed values, the simulation's bookkeeping, the
workload schema's errors, and ``lorapass analyse --workload``.

Hand values use LLaMA-7B (hidden 4096, 32 layers, fp16 = 2 bytes) on the A10G spec (fp16 70 TFLOP/s at
efficiency 0.7, 600 GB/s at 0.8; host link 32 GB/s per direction at 0.7, 10 us per tensor).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from lorapass.cli import main as lorapass_main
from lorapass.cost.analysis import ModelSource, evaluate_ops
from lorapass.cost.hw import load_spec
from lorapass.cost.lora import apply_dynamic
from lorapass.cost.parallel import Layout
from lorapass.cost.serving import setup as serving_setup
from lorapass.cost.serving.advisor import advise, break_even
from lorapass.cost.serving.analyse import simulate_all
from lorapass.cost.serving.residency import Residency
from lorapass.cost.serving.simulate import _peak
from lorapass.cost.serving.trace import expected_distinct
from lorapass.cost.serving.workload import from_dict, load_workload
from lorapass.errors import SpecError
from lorapass.rules import LoraRule

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ROOT / "models" / "llama-7b.yaml"
A10G = load_spec(ROOT / "hw_specs" / "a10g.yaml")
H, L, E = 4096, 32, 2
QV = ["q_proj", "v_proj"]


def workload(**over) -> dict:
    base = {"adapters": {"count": 3, "ranks": [8, 16, 64], "target_modules": QV},
            "arrivals": {"kind": "poisson", "rate": 2.0}, "prompt": {"kind": "fixed", "value": 128},
            "output": {"kind": "fixed", "value": 32}, "requests": 40, "seed": 3}
    for key, value in over.items():  # a mapping without its own "kind" updates the default's keys
        partial = isinstance(base.get(key), dict) and isinstance(value, dict) and "kind" not in value
        base[key] = {**base[key], **value} if partial else value
    return base


@pytest.fixture(scope="module")
def llama():
    return ModelSource(LLAMA)


@pytest.fixture(scope="module")
def qv_setup(llama):
    return serving_setup.build(llama, A10G, from_dict(workload()))


# ---- cost terms ----

def test_adapter_bytes_and_bank_gather_with_k_distinct(qv_setup):
    ad, step = qv_setup.adapters, qv_setup.step
    per_rank = E * L * 2 * (H + H)  # bytes per unit of rank over the 64 q/v sites
    assert list(ad.bytes) == [8 * per_rank, 16 * per_rank, 64 * per_rank]
    assert ad.gather_bytes(np.array([0, 1, 2])) == (8 + 16 + 64) * per_rank == 92_274_688
    assert ad.gather_bytes(np.array([0, 2])) == 72 * per_rank
    assert ad.gather_bytes(np.array([0, 1, 2]), "padded", 64) == 3 * 64 * per_rank == 201_326_592
    # the step model's LoRA operators read exactly these weights (no tokens: no activations)
    zero = np.zeros(3)
    assert step.lora_bytes(np.arange(3), zero) == pytest.approx(92_274_688)
    assert step.lora_bytes(np.arange(3), zero, "padded") == pytest.approx(201_326_592)
    # with T = 16 tokens and S = sum_a t_a r_a, per layer and site: A reads x (T·H) and writes x·A (S), B reads
    # it (S) and writes T·H, the ADD reads two T·H and writes one
    t = np.array([5.0, 7.0, 4.0])
    big_t, big_s = 16, 8 * 5 + 16 * 7 + 64 * 4
    acts = E * L * 2 * (5 * big_t * H + 2 * big_s)
    assert step.lora_bytes(np.arange(3), t) == pytest.approx(92_274_688 + acts)


def test_padding_waste_for_mixed_ranks(qv_setup):
    ad = qv_setup.adapters
    assert ad.padding_waste(np.array([0, 1, 2]), 64) == pytest.approx(1 - (8 + 16 + 64) / (3 * 64))
    assert ad.padding_waste(np.array([2]), 64) == 0.0
    assert ad.padding_waste(np.array([0, 1]), 64) == pytest.approx(1 - 24 / 128)


def test_load_time_and_host_cache_lru(qv_setup):
    ad = qv_setup.adapters
    size = 16 * E * L * 2 * (H + H)  # rank-16 adapter: 16 MiB
    tensors = 2 * 64  # A and B on 64 sites
    hand = size / (32e9 * 0.7) + tensors * 10e-6
    assert A10G.host.load_time(size, tensors) == pytest.approx(hand) == pytest.approx(2.0290e-3, rel=1e-4)
    sizes = ad.bytes
    res = Residency(sizes, ad.tensors, A10G.host, slots=1, host_slots=2, storage_bw=2e9, overlap=False)
    idle = np.zeros(3, dtype=int)
    # cold host cache: the first copy also reads storage
    assert res.request(1, 0.0, idle) == pytest.approx(hand + size / 2e9)
    assert res.request(1, 0.0, idle) == 0.0  # resident: no copy
    res.request(0, 0.0, idle)  # evicts 1 from the single GPU slot
    assert 1 not in res.gpu and res.loads == 2
    assert res.request(1, 0.0, idle) == pytest.approx(hand)  # host cache hit: only the copy
    res.request(2, 0.0, idle)  # host cache (2 slots, LRU) drops adapter 0
    assert list(res.cached) == [1, 2] and res.host_misses == 3
    pinned = np.array([0, 0, 1])
    assert res.request(0, 0.0, pinned) is None  # the only slot holds an adapter a running request uses


def test_load_overlap_queues_copies_on_one_stream(qv_setup):
    ad = qv_setup.adapters
    res = Residency(ad.bytes, ad.tensors, A10G.host, slots=3, host_slots=None, storage_bw=2e9, overlap=True)
    idle = np.zeros(3, dtype=int)
    t0 = res.request(0, 1.0, idle)
    t1 = res.request(1, 1.0, idle)
    assert res.loading == {0: pytest.approx(1.0 + t0), 1: pytest.approx(1.0 + t0 + t1)}
    assert not res.ready(1, 1.0 + t0) and res.ready(1, 1.0 + t0 + t1)


def test_merge_time_reads_and_writes_every_targeted_weight(qv_setup):
    # per q/v site: 2·r·in·out FLOPs; W read and written + A and B read
    r = 16
    flops, nbytes = 2 * r * H * H, 2 * H * H * E + r * (H + H) * E
    site = max(flops / (70e12 * 0.7), nbytes / (0.6e12 * 0.8))
    assert qv_setup.step.merge_time(1) == pytest.approx(2 * L * site)


def test_step_model_is_the_analysers_roofline(qv_setup, llama):
    step = qv_setup.step
    for b, k in [(24, 700), (1, 33)]:
        graph = llama.graph(b, 1, k)
        assert step.decode_times(b, b * k)[0] == pytest.approx(evaluate_ops(graph, A10G, Layout()).time.sum())
        rule = LoraRule(target_modules=QV, r=64, fuse_shared_inputs=False)
        dyn = apply_dynamic(graph, {p: (rule, v) for p, v in rule.select(graph.linear_paths()).items()})
        lora = step.lora_time(np.array([2]), np.array([b]))
        assert step.decode_times(b, b * k)[0] + lora == pytest.approx(evaluate_ops(dyn, A10G, Layout()).time.sum())
    prompts = np.array([300, 300])
    assert step.prefill_time(prompts) == pytest.approx(evaluate_ops(llama.graph(2, 300, 300), A10G,
                                                                    Layout()).time.sum())
    # decode contexts grow by one token per sequence per step
    three = step.decode_times(4, 4 * 100, 3)
    assert three[2] == pytest.approx(step.decode_times(4, 4 * 102)[0])


def test_step_model_under_tensor_parallelism(llama):
    """With TP the steps carry the all-reduces after row-parallel linears, as the analyser costs them."""
    a100 = load_spec(ROOT / "hw_specs" / "a100.yaml")
    step = serving_setup.build(llama, a100, from_dict(workload()), tp=2).step
    for b, k in [(8, 500), (64, 1000)]:
        t = evaluate_ops(llama.graph(b, 1, k), a100, Layout(tp=2))
        assert step.decode_times(b, b * k)[0] == pytest.approx((t.time + t.comm).sum())
    t = evaluate_ops(llama.graph(2, 300, 300), a100, Layout(tp=2))
    assert step.prefill_time(np.array([300, 300])) == pytest.approx((t.time + t.comm).sum())


def test_kv_peak_admission_rule():
    # (tokens held, steps left): (10, 5) and (20, 1): after 1 step 11 + 21 = 32; later only the first: 15
    assert _peak([10, 20], [5, 1]) == 32
    assert _peak([100], [0]) == 100


def test_expected_distinct_formula():
    p = np.array([0.5, 0.3, 0.2])
    assert float(expected_distinct(p, 2)) == pytest.approx(0.75 + 0.51 + 0.36)
    assert list(expected_distinct(np.full(4, 0.25), np.array([1, 64]))) == pytest.approx([1.0, 4 * (1 - 0.75**64)])


def test_expected_distinct_matches_the_simulations_own_count(llama):
    """Running batches of the mixed policy are i.i.d. draws from the popularity: their distinct-adapter count
    averages to sum_i 1 - (1 - p_i)^B at the batch sizes the simulation ran."""
    wf = from_dict(workload(adapters={"count": 40, "ranks": [8]}, popularity={"kind": "zipf", "alpha": 1.1},
                            arrivals={"rate": 3.0}, prompt={"kind": "uniform", "low": 16, "high": 256},
                            output={"kind": "uniform", "low": 16, "high": 256}, requests=900))
    st = serving_setup.build(llama, A10G, wf)
    r = st.simulate("multi")
    observed = r.stats.distinct_sum / r.stats.rounds
    expected = r.stats.expected_sum / r.stats.rounds
    assert r.stats.running_sum / r.stats.rounds > 8  # batches large enough for the count to mean something
    assert observed == pytest.approx(expected, rel=0.05)


# ---- the simulation's bookkeeping ----

def test_one_request_times_are_its_iterations(llama):
    wf = from_dict(workload(requests=1, adapters={"count": 1, "ranks": [16]}, output={"value": 5}))
    st = serving_setup.build(llama, A10G, wf)
    r = st.simulate("merge", "drain")
    arrive = st.requests.arrival[0]
    step = st.step
    load = A10G.host.load_time(float(st.adapters.bytes[0]), int(st.adapters.tensors[0]))
    first = arrive + load + step.merge_time(0) + step.prefill_time(np.array([128]))
    assert r.first_token[0] == pytest.approx(first)
    assert r.finish[0] == pytest.approx(first + step.decode_times(1, 129, 4).sum())
    m = st.simulate("multi")
    first = arrive + load + step.prefill_time(np.array([128])) + step.lora_time(np.array([0]), np.array([128]))
    assert m.first_token[0] == pytest.approx(first)
    per_step = step.decode_times(1, 129, 4) + step.lora_time(np.array([0]), np.array([1]))
    assert m.finish[0] == pytest.approx(first + per_step.sum())


def test_slots_loads_and_stalls(llama):
    """Three adapters through one GPU slot: every adapter change is a copy; without overlap it stalls the
    batch, with overlap the GPU idles only while nothing else can run."""
    base = workload(server={"max_loras": 1, "load_overlap": False}, popularity={"kind": "uniform"})
    st = serving_setup.build(llama, A10G, from_dict(base))
    r = st.simulate("multi")
    assert r.loads >= 3 and r.stats.load_stall_s > 0 and r.stats.idle_load_s == 0
    assert r.stats.load_stall_s == pytest.approx(sum(
        A10G.host.load_time(float(st.adapters.bytes[a]), int(st.adapters.tensors[a])) for a in _copies(st, r)))
    assert r.stats.distinct_sum / r.stats.rounds <= 1.0 + 1e-9  # one slot: never two adapters in a batch
    over = serving_setup.build(llama, A10G, from_dict(workload(server={"max_loras": 1, "load_overlap": True},
                                                               popularity={"kind": "uniform"})))
    o = over.simulate("multi")
    assert o.stats.load_stall_s == 0 and o.stats.idle_load_s > 0
    assert np.all(np.isfinite(o.finish))


def _copies(st, r) -> list[int]:
    """Adapters in the order the simulation copied them (replayed from its admissions)."""
    order = np.argsort(r.first_token, kind="stable")
    ads = st.requests.adapter[order]
    return [int(a) for k, a in enumerate(ads) if k == 0 or a != ads[k - 1]][:r.loads]


def test_policies_on_one_adapter_and_on_many(llama):
    one = serving_setup.build(llama, A10G, from_dict(workload(adapters={"count": 1, "ranks": [64]})))
    res = {p: one.simulate(p, s) for p, s in [("merge", "drain"), ("dynamic", None), ("multi", None)]}
    ends = {p: float(np.nanmax(r.finish)) for p, r in res.items()}
    assert ends["merge"] < ends["multi"] == pytest.approx(ends["dynamic"])  # merged: no LoRA branch
    assert res["merge"].stats.switches == 1
    many = serving_setup.build(llama, A10G, from_dict(workload(adapters={"count": 8, "ranks": [16]},
                                                               arrivals={"rate": 4.0}, requests=120)))
    drain, mixed = many.simulate("merge", "drain"), many.simulate("multi")
    assert drain.stats.switches > 4 and np.nanmax(drain.finish) > np.nanmax(mixed.finish)
    assert all(np.all(np.isfinite(r.finish)) for r in (drain, mixed, many.simulate("merge", "threshold")))


def test_padded_bank_costs_more_than_grouped_and_reserves_slots(llama):
    grouped = serving_setup.build(llama, A10G, from_dict(workload(server={"max_loras": 3})))
    padded = serving_setup.build(llama, A10G, from_dict(workload(server={"max_loras": 3, "bank": "padded"})))
    ids, tokens = np.arange(3), np.array([3.0, 3.0, 3.0])
    assert padded.step.lora_time(ids, tokens) > grouped.step.lora_time(ids, tokens)
    assert padded.slot_bytes == 3 * 64 * E * L * 2 * (H + H)
    assert padded.kv_tokens < grouped.kv_tokens


def test_break_even_figures(qv_setup):
    st, step = qv_setup, qv_setup.step
    be = break_even(st, 12.0)
    hot = 0  # uniform popularity: the first adapter is "the hottest"
    switch = 2 * step.merge_time(hot) + A10G.host.load_time(float(st.adapters.bytes[hot]), 2 * 64)
    per_request = step.lora_time(np.array([hot]), np.array([128.0])) + 31 * step.lora_time(np.array([hot]),
                                                                                             np.array([12])) / 12
    assert be["switch_s"] == pytest.approx(switch) and be["lora_s_per_request"] == pytest.approx(per_request)
    assert be["requests_per_merge"] == pytest.approx(switch / per_request)
    # at the break-even share a merged batch of s*B sequences serves as many requests/s as the mixed batch of B
    ctx = 128 + 32 / 2
    n = be["merge_share"] * 12
    mixed = step.decode_times(12, 12 * ctx)[0] + step.lora_time(np.arange(3), np.full(3, 4.0))
    assert be["t_mixed_s"] == pytest.approx(mixed)
    assert n / step.decode_times(n, n * ctx)[0] == pytest.approx(12 / mixed, rel=1e-6)


def test_verdicts(llama):
    one = serving_setup.build(llama, A10G, from_dict(workload(adapters={"count": 1, "ranks": [64]})))
    assert advise(one, simulate_all(one, "all"))["verdict"] == "merge:drain"  # no LoRA branch, no switches
    many = serving_setup.build(llama, A10G, from_dict(workload(adapters={"count": 8, "ranks": [16]},
                                                               arrivals={"rate": 4.0}, requests=120)))
    advice = advise(many, simulate_all(many, "all"))
    assert advice["verdict"] in ("multi", "merge:threshold") and advice["ranking"][-1] in ("merge:drain", "dynamic")


def test_deterministic(llama):
    a = serving_setup.build(llama, A10G, from_dict(workload())).simulate("multi")
    b = serving_setup.build(llama, A10G, from_dict(workload())).simulate("multi")
    assert np.array_equal(a.finish, b.finish)
    c = serving_setup.build(llama, A10G, from_dict(workload(seed=4))).simulate("multi")
    assert not np.array_equal(a.finish, c.finish)


# ---- workload file ----

@pytest.mark.parametrize("change, message", [
    ({"popularity": {"kind": "zipf"}}, "popularity.zipf.alpha: missing required field"),
    ({"popularity": {"kind": "zipf", "alpha": 0}}, "popularity.zipf.alpha: Input should be greater than 0"),
    ({"arivals": {"kind": "poisson", "rate": 1}}, "arivals: unknown field"),
    ({"arrivals": {"kind": "poisson", "rate": -1}}, "arrivals.poisson.rate: Input should be greater than 0"),
    ({"prompt": {"kind": "uniform", "low": 9, "high": 3}}, "prompt.uniform: high 3 is below low 9"),
    ({"duration_s": 60}, "give exactly one of duration_s and requests"),
    ({"adapters": {"count": 2, "ranks": [8], "target_modules": QV, "rules": "r.yaml"}},
     "adapters: give exactly one of target_modules and rules"),
    ({"server": {"bank": "sparse"}}, "server.bank: Input should be 'grouped' or 'padded'"),
])
def test_workload_errors_name_the_key(tmp_path, change, message):
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump({**workload(), **change}))
    with pytest.raises(SpecError, match=message.replace("(", r"\(")) as err:
        load_workload(path)
    assert str(path) in str(err.value)


def test_popularity_weights_must_match_the_adapters(llama):
    wf = from_dict(workload(popularity={"kind": "weights", "weights": [1, 2]}), source="w.yaml")
    with pytest.raises(SpecError, match="popularity.weights: 2 weights for 3 adapters"):
        serving_setup.build(llama, A10G, wf)


def test_trace_file(tmp_path, llama):
    trace = tmp_path / "t.csv"
    trace.write_text("timestamp_s,prompt_tokens,output_tokens,adapter\n0.5,100,10,adapter-2\n0.1,50,4,0\n")
    wf = from_dict({"adapters": workload()["adapters"], "arrivals": {"kind": "trace", "file": "t.csv"}},
                   folder=tmp_path)
    st = serving_setup.build(llama, A10G, wf)
    assert list(st.requests.arrival) == [0.1, 0.5] and list(st.requests.adapter) == [0, 2]
    assert list(st.popularity) == [0.5, 0.0, 0.5]
    trace.write_text("timestamp_s,prompt_tokens,output_tokens,adapter\n0.5,x,10,0\n")
    with pytest.raises(SpecError, match=r"t.csv:2: prompt_tokens: 'x' is not a number"):
        serving_setup.build(llama, A10G, wf)
    trace.write_text("timestamp_s,prompt_tokens,output_tokens,adapter\n0.5,3,10,nine\n")
    with pytest.raises(SpecError, match=r"t.csv:2: adapter: 'nine' is neither an adapter name"):
        serving_setup.build(llama, A10G, wf)


def test_adapter_dirs(tmp_path, llama):
    """Adapter directories: their adapter_config.json (PEFT's keys) sets ranks, rank_pattern and targets."""
    configs = {"small": {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
               "wide": {"peft_type": "LORA", "r": 32, "lora_alpha": 16, "target_modules": "all-linear",
                        "rank_pattern": {"down_proj": 4}}}
    for name, config in configs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
    wf = from_dict({**workload(), "adapters": {"dirs": ["small", "wide"]}}, folder=tmp_path)
    st = serving_setup.build(llama, A10G, wf)
    ad = st.adapters
    assert ad.names == ["small", "wide"]
    assert ad.bytes[0] == 8 * E * L * 2 * (H + H)
    mlp = 2 * 32 * (H + 11008) + 4 * (11008 + H)  # gate, up at r 32; down at r 4
    assert ad.bytes[1] == E * L * (4 * 32 * (H + H) + mlp)


def test_capacity_errors(llama):
    with pytest.raises(SpecError, match="a request needs 4159 KV tokens, the pool holds 1000"):
        serving_setup.build(llama, A10G, from_dict(workload(prompt={"value": 4000}, output={"value": 160},
                                                             server={"kv_tokens": 1000, "max_batch_tokens": 8192})))
    with pytest.raises(SpecError, match="server.max_loras: a padded bank preallocates"):
        serving_setup.build(llama, A10G, from_dict(workload(server={"bank": "padded"})))
    with pytest.raises(SpecError, match="server.max_cpu_loras: 3 adapters need"):
        small = A10G.model_copy(update={"host": A10G.host.model_copy(update={"memory_gib": 0.01})})
        serving_setup.build(llama, small, from_dict(workload()))


# ---- hardware specs ----

@pytest.mark.parametrize("name, bf16, tb_s, gib, link", [("a10g.yaml", 70, 0.6, 24, 32),
                                                          ("l40s.yaml", 362.05, 0.864, 48, 32)])
def test_new_specs(name, bf16, tb_s, gib, link):
    spec = load_spec(ROOT / "hw_specs" / name)
    assert spec.peak("bf16") == pytest.approx(bf16 * 1e12) and spec.bandwidth == pytest.approx(tb_s * 1e12)
    assert spec.capacity == gib * 2**30 and spec.host.link.bandwidth == link * 1e9


def test_gpu_specs_carry_the_host_side():
    for path in sorted((ROOT / "hw_specs").glob("*.yaml")):
        spec = load_spec(path)
        assert spec.host is not None or spec.name.startswith("TPU"), path.name


# ---- command line ----

def test_cli_json_and_plot(tmp_path, capsys):
    w = tmp_path / "w.yaml"
    w.write_text(yaml.safe_dump(workload(adapters={"count": 4, "ranks": [8, 16]}, slo={"ttft_s": 1.0},
                                         server={"max_loras": 2})))
    png = tmp_path / "sweep.png"
    assert lorapass_main(["analyse", str(LLAMA), "--hw", str(ROOT / "hw_specs/a10g.yaml"), "--workload", str(w),
                          "--json", "--plot", str(png)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["policies"]) == {"merge:drain", "merge:threshold", "dynamic", "multi"}
    multi = data["policies"]["multi"]
    for key in ("throughput_req_s", "throughput_tok_s", "ttft_s", "tpot_s", "slo_attainment", "memory_gb"):
        assert key in multi
    assert {"weights", "kv_peak", "adapter_slots", "fragmentation"} <= set(multi["memory_gb"])
    assert data["advisor"]["verdict"] in data["policies"]
    assert {"requests_per_merge", "merge_share"} <= set(data["advisor"]["break_even"])
    assert {row["adapters"] for row in data["sweep"]} == {1, 2, 4}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_one_policy_table_and_errors(tmp_path, capsys):
    w = tmp_path / "w.yaml"
    w.write_text(yaml.safe_dump(workload()))
    hw = str(ROOT / "hw_specs/a10g.yaml")
    assert lorapass_main(["analyse", str(LLAMA), "--hw", hw, "--workload", str(w), "--policy", "multi"]) == 0
    out = capsys.readouterr().out
    assert "multi" in out and "merge:drain" not in out and "advisor: multi" in out
    assert lorapass_main(["analyse", str(LLAMA), "--hw", hw, "--workload", str(w), "--batch", "4"]) == 2
    assert "--batch do not apply" in capsys.readouterr().err
    assert lorapass_main(["analyse", str(LLAMA), "--hw", hw, "--policy", "multi"]) == 2
    assert "--policy chooses what --workload simulates" in capsys.readouterr().err
    w.write_text("adapters: [1, 2]\n")
    assert lorapass_main(["analyse", str(LLAMA), "--hw", hw, "--workload", str(w)]) == 2
    assert "adapters: Input should be a valid dictionary" in capsys.readouterr().err
    assert lorapass_main(["analyse", str(LLAMA), "--hw", str(ROOT / "hw_specs/tpu-v5e.yaml"), "--workload",
                          str(tmp_path / "missing.yaml")]) == 2
    assert "no such workload file" in capsys.readouterr().err
