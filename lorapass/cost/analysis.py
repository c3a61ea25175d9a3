"""The analysis: roofline time of every operator on a device, phases, pipeline, memory, LoRA overhead.

Per operator on one device: time = max(FLOPs / (peak[dtype]·eff_compute), bytes / (bandwidth·eff_memory))
+ launches·kernel_overhead, bound = whichever term is larger; collectives (all-reduce after row-parallel
linears, all-to-all around experts, point-to-point between pipeline stages) are added after it, never
overlapped with compute.

Phases: ``prefill`` runs ``seq`` tokens of every sequence (TTFT = its pipeline time); ``decode`` is ``gen``
steps of one token each, costed at the average context seq + (gen+1)/2 (step i attends over seq+i+1 keys;
attention FLOPs and KV-cache bytes are linear in the context, so the average step is the step at the average
context); TPOT = one decode round; tokens/s = batch / TPOT. ``merge`` (strategy merge) is the one-time cost of
folding every adapter into its weight.

Memory per device (worst pipeline stage): resident weights of its share, adapters (dynamic only), KV cache for
seq+gen tokens (capped at a sliding window) of its sequences and KV heads, and the largest single-operator
working set of a prefill micro-batch as the activation peak.
"""

from __future__ import annotations

import os
import time as _time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorapass.cost import ops as O
from lorapass.cost.collectives import Placement, all_to_all, collective_time, p2p, p2p_link, ring_all_reduce
from lorapass.cost.hw import DTYPE_BYTES, HardwareSpec
from lorapass.cost.lora import apply_dynamic, merge_ops, select
from lorapass.cost.ops import GraphMeta, OpGraph
from lorapass.cost.parallel import (Layout, blocks, decode_microbatches, divisors, enumerate_layouts, partition,
                                    prefill_microbatches, validate)
from lorapass.errors import RuleError, SpecError
from lorapass.progress import bar


@dataclass(frozen=True)
class Workload:
    batch: int
    seq: int
    gen: int = 0

    def __post_init__(self) -> None:
        for name in ("batch", "seq"):
            if getattr(self, name) < 1:
                raise SpecError(f"{name}={getattr(self, name)} must be >= 1")
        if self.gen < 0:
            raise SpecError(f"gen={self.gen} must be >= 0")

    @property
    def decode_context(self) -> float:
        return self.seq + (self.gen + 1) / 2


class ModelSource:
    """A model to analyse: a ``models/*.yaml`` config or an ONNX file, expanded to operator graphs on demand."""

    def __init__(self, path: str | os.PathLike, *, attention: str | None = None, logits: str | None = None,
                 dtype: str | None = None, kv_dtype: str | None = None, prefix: str | None = None,
                 dims: dict[str, int] | None = None) -> None:
        self.path = Path(path)
        self.kind = "onnx" if self.path.suffix == ".onnx" else "config"
        self.attention, self.logits, self.dtype, self.kv_dtype = attention, logits, dtype, kv_dtype
        self.prefix, self.dims = prefix, dims
        self._cache: dict[tuple, OpGraph] = {}
        if self.kind == "config":
            from lorapass.cost.config import load_config

            if not self.path.is_file():
                raise SpecError(f"{self.path}: no such model config")
            self.config = load_config(self.path)
        else:
            if not self.path.is_file():
                from lorapass.errors import ModelError

                raise ModelError(f"{self.path}: no such ONNX file")
            given = [name for name, v in (("attention", attention), ("logits", logits), ("dtype", dtype)) if v]
            if given:
                raise SpecError(f"{self.path}: {', '.join(given)} only apply to a model config; an ONNX graph "
                                f"is costed as its nodes compute")

    @property
    def name(self) -> str:
        return self.config.name if self.kind == "config" else self.path.stem

    def graph(self, batch: float, q: float, kv: float) -> OpGraph:
        key = (batch, q, kv)
        if key not in self._cache:
            if self.kind == "config":
                from lorapass.cost.config import build_graph

                self._cache[key] = build_graph(self.config, batch, q, kv, attention=self.attention or "flash",
                                               logits=self.logits or "last", dtype=self.dtype,
                                               kv_dtype=self.kv_dtype, source=str(self.path))
            else:
                from lorapass.cost.onnx_ops import load_onnx_graph

                self._cache[key] = load_onnx_graph(self.path, int(batch), int(q), kv, prefix=self.prefix,
                                                   dims=self.dims, kv_dtype=self.kv_dtype)
        return self._cache[key]


# ---- LoRA ----

@dataclass
class LoraSetup:
    strategy: str  # "none" | "dynamic" | "merge" | "in-graph" (an already rewritten ONNX file)
    selection: dict[str, Any] = field(default_factory=dict)

    @property
    def sites(self) -> int:
        return len(self.selection)


def strip_lora(graph: OpGraph) -> OpGraph:
    """The base graph of a dynamic rewrite: every LoRA operator removed."""
    return OpGraph([op for op in graph.ops if not op.paths], graph.meta, graph.tensors)


def _strategy(rules: Any, strategy: str | None) -> str:
    if strategy is not None:
        if strategy not in ("merge", "dynamic"):
            raise RuleError(f"strategy must be merge or dynamic, not {strategy!r}")
        return strategy
    found = {r.strategy for r in getattr(rules, "rules", [rules])}
    if len(found) != 1:
        raise RuleError(f"rules ask for different strategies {sorted(found)}; choose one with --strategy")
    return found.pop()


# ---- evaluation ----

@dataclass
class OpTimes:
    flops: np.ndarray
    bytes: np.ndarray
    compute: np.ndarray
    memory: np.ndarray
    time: np.ndarray  # roofline time + launch overhead
    comm: np.ndarray
    param: np.ndarray
    act: np.ndarray


def evaluate_ops(graph: OpGraph, spec: HardwareSpec, layout: Layout, algorithm: str = "auto") -> OpTimes:
    """Per-device FLOPs, bytes, roofline and communication time of every operator under ``layout``."""
    a, d = graph.arrays(), divisors(graph, layout)
    flops = a["flops"] / d["flops"]
    weight = a["weight"] / d["weight"]
    param = a["param"] / d["param"]
    moe = a["experts"] > 0
    if moe.any():
        experts, top_k = a["experts"][moe], a["top_k"][moe]
        group_tokens = a["tokens"][moe] / top_k * layout.ep  # tokens routed in the EP group
        active = O.active_experts(experts, top_k, group_tokens) / layout.ep
        weight[moe] = active * a["expert_bytes"][moe] / layout.tp
        param[moe] = experts / layout.ep * a["expert_bytes"][moe] / layout.tp
    act = a["act_in"] / d["act_in"] + a["act_out"] / d["act_out"]
    nbytes = weight + act + a["kv"] / d["kv"]
    compute = flops / (spec.peak(graph.meta.dtype) * spec.efficiency.compute)
    memory = nbytes / (spec.bandwidth * spec.efficiency.memory)
    t = np.maximum(compute, memory) + a["launches"] * spec.kernel_overhead
    comm = np.zeros_like(t)
    if layout.tp > 1 and a["reduce"].any():
        link = Placement(layout.tp, 1).link(spec)
        out = a["act_out"][a["reduce"]]
        if layout.sp:  # reduce-scatter + all-gather: the ring all-reduce's two halves
            comm[a["reduce"]] = ring_all_reduce(layout.tp, out, link)
        else:
            comm[a["reduce"]] = collective_time("all_reduce", layout.tp, out, link, algorithm)
    if layout.ep > 1 and (a["a2a"] > 0).any():
        link = Placement(layout.ep, layout.tp).link(spec)
        sel = a["a2a"] > 0
        comm[sel] += all_to_all(layout.ep, a["a2a"][sel], link)
    return OpTimes(flops, nbytes, compute, memory, t, comm, param, act)


@dataclass
class Phase:
    """One phase on one device (pipeline included)."""

    name: str
    time: float  # seconds: prefill = TTFT, decode = one round (TPOT), merge = the whole merge
    compute_time: float  # per device (all micro-batches, mean over pipeline stages), summed over operators
    memory_time: float
    comm_time: float
    overhead_time: float
    flops: float  # per device, as compute_time
    bytes: float
    bound: str
    microbatches: int = 1
    bubble: float = 0.0
    stage_times: list[float] = field(default_factory=list)
    classes: dict[str, dict[str, float]] = field(default_factory=dict)
    ops: list[dict] | None = None

    def summary(self) -> dict:
        out = asdict(self)
        out.pop("ops")
        return out


def _classes(graph: OpGraph, times: OpTimes, scale: float) -> dict[str, dict[str, float]]:
    """Per operator class: totals over the operators times ``scale`` (micro-batches / pipeline stages)."""
    a = graph.arrays()
    code, names = a["kind"], a["kinds"]
    k = len(names)

    def total(x: np.ndarray) -> np.ndarray:
        return np.bincount(code, weights=x, minlength=k)

    count = np.bincount(code, minlength=k)
    flops, nbytes, t, comm = total(times.flops), total(times.bytes), total(times.time), total(times.comm)
    compute, memory = total(times.compute), total(times.memory)
    whole = float((t + comm).sum()) or 1.0
    return {str(names[c]): {"count": int(count[c]), "flops": float(flops[c]) * scale, "bytes": float(nbytes[c]) * scale,
                            "time": float(t[c]) * scale, "comm_time": float(comm[c]) * scale,
                            "bound": "compute" if compute[c] >= memory[c] else "memory",
                            "share": float(t[c] + comm[c]) / whole}
            for c in range(k) if count[c]}


def _op_rows(graph: OpGraph, times: OpTimes, stage_of_op: np.ndarray) -> list[dict]:
    rows = []
    for i, op in enumerate(graph.ops):
        rows.append({
            "stage": int(stage_of_op[i]), "name": op.name, "class": op.kind, "path": op.path, "layer": op.layer,
            "tp": op.tp, "flops": float(times.flops[i]), "bytes": float(times.bytes[i]),
            "intensity": float(times.flops[i] / times.bytes[i]) if times.bytes[i] else None,
            "compute_s": float(times.compute[i]), "memory_s": float(times.memory[i]), "time_s": float(times.time[i]),
            "comm_s": float(times.comm[i]),
            "bound": "compute" if times.compute[i] >= times.memory[i] else "memory",
        })
    return rows


def _stage_times(graph: OpGraph, times: OpTimes, stage_of_block: np.ndarray, starts: list[int], spec: HardwareSpec,
                 layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    blk = blocks(graph, boundaries=layout.pp > 1)
    per_op = times.time + times.comm
    block_time = np.bincount(blk.index, weights=per_op, minlength=blk.count)
    stages = np.bincount(stage_of_block, weights=block_time, minlength=layout.pp).astype(float)
    per_rank = layout.tp * layout.ep
    for s in range(1, len(starts)):
        nbytes = blk.boundary_bytes[starts[s] - 1] / (layout.tp if layout.sp else 1)
        stages[s - 1] += p2p(nbytes, p2p_link(spec, (s - 1) * per_rank, s * per_rank))
    return stages, block_time


def _pipeline_time(stages: np.ndarray, m: int, decode: bool) -> float:
    return float(max(m * stages.max(), stages.sum()) if decode else stages.sum() + (m - 1) * stages.max())


def _phase(name: str, graph: OpGraph, times: OpTimes, stage_of_block: np.ndarray, starts: list[int],
           spec: HardwareSpec, layout: Layout, m: int, keep_ops: bool, decode: bool) -> Phase:
    stages, _ = _stage_times(graph, times, stage_of_block, starts, spec, layout)
    total = _pipeline_time(stages, m, decode)
    bubble = 1.0 - m * stages.sum() / (layout.pp * total) if total > 0 else 0.0
    scale = m / layout.pp  # per device: every micro-batch, averaged over the pipeline stages
    roof = np.maximum(times.compute, times.memory)
    shares = {"compute": float(roof[times.compute >= times.memory].sum()),
              "memory": float(roof[times.compute < times.memory].sum()), "communication": float(times.comm.sum())}
    blk = blocks(graph, boundaries=False)
    phase = Phase(name, float(total), float(times.compute.sum()) * scale, float(times.memory.sum()) * scale,
                  float(times.comm.sum()) * scale,
                  float((graph.arrays()["launches"] * spec.kernel_overhead).sum()) * scale,
                  float(times.flops.sum()) * scale, float(times.bytes.sum()) * scale, max(shares, key=shares.get), m,
                  float(max(0.0, bubble)), [float(x) for x in stages], _classes(graph, times, scale))
    if keep_ops:
        phase.ops = _op_rows(graph, times, stage_of_block[blk.index])
    return phase


@dataclass
class Memory:
    weights: float
    adapters: float
    kv_cache: float
    activations: float
    capacity: float

    @property
    def total(self) -> float:
        return self.weights + self.adapters + self.kv_cache + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "fits": self.fits}


def kv_cache_bytes(meta: GraphMeta, layers: int, sequences: float, context: float, kv_heads: float) -> float:
    """2 (K and V) · layers · kv_heads · head_dim · context · sequences · bytes per element."""
    if not meta.causal:
        return 0.0
    if meta.sliding_window:
        context = min(context, meta.sliding_window)
    return 2.0 * layers * kv_heads * meta.head_dim * context * sequences * DTYPE_BYTES[meta.kv_dtype]


@dataclass
class Analysis:
    model: str
    hardware: str
    layout: Layout
    workload: Workload
    strategy: str
    lora_sites: int
    phases: dict[str, Phase]
    base: dict[str, float]  # phase -> time without LoRA
    memory: Memory
    ttft: float
    tpot: float | None
    tokens_per_s: float | None
    e2e: float
    stages: list[list[int]]  # layer indices of every pipeline stage
    dtype: str = "bf16"

    @property
    def overhead(self) -> dict[str, float]:
        """LoRA time over the base model's, in % of base, per phase."""
        return {k: 100.0 * (self.phases[k].time - t) / t for k, t in self.base.items() if t > 0 and k in self.phases}

    def to_dict(self, ops: bool = False) -> dict:
        phases = {}
        for k, p in self.phases.items():
            phases[k] = p.summary()
            if ops and p.ops is not None:
                phases[k]["ops"] = p.ops
        return {
            "model": self.model, "hardware": self.hardware, "dtype": self.dtype,
            "layout": asdict(self.layout) | {"label": self.layout.label(), "devices": self.layout.devices},
            "workload": asdict(self.workload), "strategy": self.strategy, "lora_sites": self.lora_sites,
            "ttft_s": self.ttft, "tpot_s": self.tpot, "tokens_per_s": self.tokens_per_s, "e2e_s": self.e2e,
            "lora_overhead_pct": self.overhead, "memory": self.memory.to_dict(), "stages": self.stages,
            "phases": phases, "base_phase_times_s": self.base,
        }


def _layer_lists(graph: OpGraph, stage_of_block: np.ndarray) -> list[list[int]]:
    layers = sorted({op.layer for op in graph.ops if op.layer is not None})
    out: list[list[int]] = [[] for _ in range(int(stage_of_block.max()) + 1)]
    for k, layer in enumerate(layers):
        out[int(stage_of_block[k])].append(layer)
    return out


class Analyser:
    """Analyses one model under many layouts, reusing its operator graphs."""

    def __init__(self, source: ModelSource, spec: HardwareSpec, workload: Workload, rules: Any = None,
                 strategy: str | None = None, algorithm: str = "auto") -> None:
        self.source, self.spec, self.workload, self.algorithm = source, spec, workload, algorithm
        probe = source.graph(1, workload.seq, workload.seq)
        self.meta = probe.meta
        from lorapass.cost.onnx_ops import has_lora

        if has_lora(probe):
            if rules is not None:
                raise RuleError(f"{source.path}: the graph already holds LoRA operators; "
                                "do not pass rules or an adapter")
            paths = {p for op in probe.ops for p in op.paths if op.kind == O.GEMM_LORA_B}
            self.lora = LoraSetup("in-graph", {p: None for p in paths})
        elif rules is None:
            if strategy is not None:
                raise RuleError(f"strategy {strategy!r} needs LoRA rules or an adapter (--rules / --adapter)")
            self.lora = LoraSetup("none")
        else:
            self.lora = LoraSetup(_strategy(rules, strategy), select(probe, rules))
        self._graphs: dict[tuple, tuple[OpGraph, OpGraph]] = {}

    def graphs(self, batch: float, q: float, kv: float) -> tuple[OpGraph, OpGraph]:
        """(graph as run, base graph without LoRA) for one shape."""
        key = (batch, q, kv)
        if key not in self._graphs:
            g = self.source.graph(batch, q, kv)
            if self.lora.strategy == "in-graph":
                run, base = g, strip_lora(g)
            elif self.lora.strategy == "dynamic":
                run, base = apply_dynamic(g, self.lora.selection), g
            else:
                run, base = g, g
            self._graphs[key] = (run, base)
        return self._graphs[key]

    def analyse(self, layout: Layout, keep_ops: bool = True) -> Analysis:
        w, spec = self.workload, self.spec
        validate(self.meta, layout, w.batch)
        per_device = w.batch // (layout.dp * layout.ep)
        m_p = prefill_microbatches(layout, per_device)
        m_d = decode_microbatches(layout, per_device)
        has_decode = w.gen > 0 and self.meta.causal
        pre_run, pre_base = self.graphs(per_device / m_p, w.seq, w.seq)
        t_pre = evaluate_ops(pre_run, spec, layout, self.algorithm)
        blk = blocks(pre_run, boundaries=False)
        cost = np.bincount(blk.index, weights=t_pre.time + t_pre.comm, minlength=blk.count) * m_p
        if has_decode:
            dec_run, dec_base = self.graphs(per_device / m_d, 1, w.decode_context)
            t_dec = evaluate_ops(dec_run, spec, layout, self.algorithm)
            cost = cost + np.bincount(blocks(dec_run, boundaries=False).index, weights=t_dec.time + t_dec.comm,
                                      minlength=blk.count) * m_d * w.gen
        starts = partition(cost, layout.pp)
        stage_of_block = np.searchsorted(np.array(starts), np.arange(blk.count), side="right") - 1
        phases = {"prefill": _phase("prefill", pre_run, t_pre, stage_of_block, starts, spec, layout, m_p, keep_ops,
                                    decode=False)}
        base = {}
        with_base = self.lora.strategy in ("dynamic", "in-graph")
        if with_base:  # the base model on the same stages
            tb = evaluate_ops(pre_base, spec, layout, self.algorithm)
            stages, _ = _stage_times(pre_base, tb, stage_of_block, starts, spec, layout)
            base["prefill"] = _pipeline_time(stages, m_p, False)
        if has_decode:
            phases["decode"] = _phase("decode", dec_run, t_dec, stage_of_block, starts, spec, layout, m_d, keep_ops,
                                      decode=True)
            if with_base:
                tb = evaluate_ops(dec_base, spec, layout, self.algorithm)
                stages, _ = _stage_times(dec_base, tb, stage_of_block, starts, spec, layout)
                base["decode"] = _pipeline_time(stages, m_d, True)
        if self.lora.strategy == "merge":
            phases["merge"] = self._merge_phase(pre_run, stage_of_block, layout, keep_ops)
        memory = self._memory(pre_run, t_pre, stage_of_block, layout, per_device)
        ttft = phases["prefill"].time
        tpot = phases["decode"].time if has_decode else None
        return Analysis(
            model=self.source.name, hardware=spec.name, layout=layout, workload=w, strategy=self.lora.strategy,
            lora_sites=self.lora.sites, phases=phases, base=base, memory=memory, ttft=ttft, tpot=tpot,
            tokens_per_s=w.batch / tpot if tpot else None, e2e=ttft + (w.gen * tpot if tpot else 0.0),
            stages=_layer_lists(pre_run, stage_of_block), dtype=self.meta.dtype)

    def _merge_phase(self, graph: OpGraph, stage_of_block: np.ndarray, layout: Layout, keep_ops: bool) -> Phase:
        merges = merge_ops(graph, self.lora.selection)
        mg = OpGraph(merges, graph.meta, {})
        times = evaluate_ops(mg, self.spec, layout, self.algorithm)
        layers = sorted({op.layer for op in graph.ops if op.layer is not None})
        rank = {layer: k for k, layer in enumerate(layers)}
        block = np.array([rank.get(op.layer, 0 if op.layer is None and k == 0 else len(layers) - 1)
                          for k, op in enumerate(merges)], dtype=int).reshape(-1)
        stage = stage_of_block[block] if len(block) else np.zeros(0, dtype=int)
        per_stage = np.bincount(stage, weights=times.time, minlength=layout.pp) if len(block) else np.zeros(1)
        roof = np.maximum(times.compute, times.memory)
        compute_bound = roof[times.compute >= times.memory].sum() >= roof[times.compute < times.memory].sum()
        bound = "compute" if compute_bound else "memory"
        scale = 1.0 / layout.pp  # per device: mean over the pipeline stages, which merge in parallel
        phase = Phase("merge", float(per_stage.max()), float(times.compute.sum()) * scale,
                      float(times.memory.sum()) * scale, 0.0, float(times.time.sum() - roof.sum()) * scale,
                      float(times.flops.sum()) * scale, float(times.bytes.sum()) * scale, bound, 1, 0.0,
                      [float(x) for x in per_stage], _classes(mg, times, scale))
        if keep_ops:
            phase.ops = _op_rows(mg, times, stage)
        return phase

    def _memory(self, graph: OpGraph, times: OpTimes, stage_of_block: np.ndarray, layout: Layout,
                per_device: int) -> Memory:
        blk = blocks(graph, boundaries=False)
        stage_of_op = stage_of_block[blk.index]
        lora = graph.arrays()["lora"]
        weights = np.bincount(stage_of_op, weights=np.where(lora, 0.0, times.param), minlength=layout.pp)
        adapters = np.bincount(stage_of_op, weights=np.where(lora, times.param, 0.0), minlength=layout.pp)
        acts = np.zeros(layout.pp)
        np.maximum.at(acts, stage_of_op, times.act)
        if self.lora.strategy == "merge":
            adapters[:] = 0.0
        layers_per_stage = np.bincount(stage_of_block, minlength=layout.pp)
        kv_heads = self.meta.num_kv_heads / min(layout.tp, self.meta.num_kv_heads)
        w = self.workload
        kv = np.array([kv_cache_bytes(graph.meta, int(n), per_device, w.seq + w.gen, kv_heads)
                       for n in layers_per_stage])
        total = weights + adapters + kv + acts
        s = int(np.argmax(total))
        return Memory(float(weights[s]), float(adapters[s]), float(kv[s]), float(acts[s]), self.spec.capacity)


def analyse(source: ModelSource | str | os.PathLike, spec: HardwareSpec, layout: Layout, workload: Workload,
            rules: Any = None, strategy: str | None = None, algorithm: str = "auto", keep_ops: bool = True) -> Analysis:
    """One model, one device type, one layout."""
    if not isinstance(source, ModelSource):
        source = ModelSource(source)
    return Analyser(source, spec, workload, rules, strategy, algorithm).analyse(layout, keep_ops)


OBJECTIVES = ("throughput", "ttft", "tpot", "e2e")


def rank_key(objective: str):
    def key(a: Analysis):
        fits = 0 if a.memory.fits else 1
        if objective == "throughput":
            value = -(a.tokens_per_s or 1.0 / a.ttft)
        elif objective == "ttft":
            value = a.ttft
        elif objective == "tpot":
            value = a.tpot if a.tpot is not None else a.ttft
        else:
            value = a.e2e
        return (fits, value, a.layout.devices)
    return key


@dataclass
class Sweep:
    results: list[Analysis]
    skipped: dict[str, str]
    seconds: float
    objective: str


def sweep(source: ModelSource | str | os.PathLike, spec: HardwareSpec, devices: int | list[int], workload: Workload,
          rules: Any = None, strategy: str | None = None, algorithm: str = "auto", sp: bool = False,
          objective: str = "throughput", analyser: Analyser | None = None) -> Sweep:
    """Every valid TP x PP x EP layout (DP filling the rest) of each device count, best first."""
    if objective not in OBJECTIVES:
        raise SpecError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    start = _time.perf_counter()
    if analyser is None:
        if not isinstance(source, ModelSource):
            source = ModelSource(source)
        analyser = Analyser(source, spec, workload, rules, strategy, algorithm)
    counts = [devices] if isinstance(devices, int) else list(devices)
    results, skipped = [], {}
    for n in counts:
        for layout in bar(enumerate_layouts(analyser.meta, n, workload.batch, sp=sp), desc=f"{n} devices", unit="layout"):
            try:
                results.append(analyser.analyse(layout, keep_ops=False))
            except SpecError as exc:
                skipped[layout.label()] = str(exc)
    results.sort(key=rank_key(objective))
    return Sweep(results, skipped, _time.perf_counter() - start, objective)
