"""Parallel layouts: validation, how each operator splits, pipeline stages, and the layout sweep.

A layout is TP x PP x EP x DP devices (ranks ordered TP innermost, then EP, PP, DP):

- tensor (TP): column/row-parallel linears (Megatron); one all-reduce of the full output per row-parallel
  linear (and per vocabulary-parallel embedding / MoE combine). K/V projections split over min(TP, KV heads),
  replicating KV heads beyond. With sequence parallelism (``sp``) the operators on the full hidden state are
  split along the sequence and each all-reduce becomes a reduce-scatter plus an all-gather.
- pipeline (PP): contiguous runs of layers, balanced by their summed cost (prefill of the batch plus all decode
  steps) on the operator graph's layer blocks; stage boundaries send the tensors that cross them (found on the
  networkx graph view) point-to-point. Prefill with m micro-batches takes sum(t_s) + (m-1)·max(t_s);
  a decode round with m micro-batches in flight takes max(m·max(t_s), sum(t_s)).
- expert (EP): experts split over EP devices; attention and the other dense operators run data-parallel over
  the EP group (each device 1/EP of the group's sequences); dispatch and combine are all-to-alls.
- data (DP): independent replicas, each 1/DP of the batch; no communication in inference.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import product

import networkx as nx
import numpy as np

from lorapass.cost.ops import GraphMeta, OpGraph
from lorapass.errors import SpecError


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    sp: bool = False
    microbatches: int | None = None  # prefill micro-batches per replica; default chosen from pp

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.ep * self.dp

    def label(self) -> str:
        return f"TP{self.tp}xPP{self.pp}xEP{self.ep}xDP{self.dp}" + ("+SP" if self.sp else "")


def _field(meta: GraphMeta, hf_name: str, onnx_name: str) -> str:
    return hf_name if not meta.source.endswith(".onnx") else f"{onnx_name} (from the graph)"


def validate(meta: GraphMeta, layout: Layout, batch: int) -> None:
    """SpecError naming the model file and field a layout cannot split."""
    src = meta.source
    for name in ("tp", "pp", "ep", "dp"):
        if getattr(layout, name) < 1:
            raise SpecError(f"{src}: {name}={getattr(layout, name)} must be >= 1")
    tp = layout.tp
    if meta.num_heads % tp:
        raise SpecError(f"{src}: {_field(meta, 'num_attention_heads', 'attention heads')}={meta.num_heads} "
                        f"is not divisible by tp={tp}")
    kv = meta.num_kv_heads
    if kv % tp and tp % kv:
        raise SpecError(f"{src}: {_field(meta, 'num_key_value_heads', 'KV heads')}={kv} and tp={tp}: "
                        f"neither divides the other")
    if meta.intermediate_size and meta.intermediate_size % tp:
        raise SpecError(f"{src}: intermediate_size={meta.intermediate_size} is not divisible by tp={tp}")
    if layout.pp > max(meta.num_layers, 1):
        raise SpecError(f"{src}: {_field(meta, 'num_hidden_layers', 'layers')}={meta.num_layers} "
                        f"cannot fill pp={layout.pp} stages")
    if layout.ep > 1:
        if not meta.num_experts:
            raise SpecError(f"{src}: ep={layout.ep} needs a mixture-of-experts model (num_local_experts is not set)")
        if meta.num_experts % layout.ep:
            raise SpecError(f"{src}: num_local_experts={meta.num_experts} is not divisible by ep={layout.ep}")
    if batch % (layout.dp * layout.ep):
        raise SpecError(f"batch={batch} is not divisible by dp*ep={layout.dp * layout.ep}")
    per_device = batch // (layout.dp * layout.ep)
    if layout.microbatches is not None and (layout.microbatches < 1 or per_device % layout.microbatches):
        raise SpecError(f"microbatches={layout.microbatches} must divide the {per_device} sequences per device")


def prefill_microbatches(layout: Layout, per_device: int) -> int:
    """Given micro-batches, else 1 without pipelining, else the largest divisor of the sequences <= 2·pp."""
    if layout.microbatches:
        return layout.microbatches
    if layout.pp == 1:
        return 1
    return max(d for d in range(1, min(per_device, 2 * layout.pp) + 1) if per_device % d == 0)


def decode_microbatches(layout: Layout, per_device: int) -> int:
    """Sequence groups in flight while decoding: the largest divisor of the sequences <= pp."""
    return max(d for d in range(1, min(per_device, layout.pp) + 1) if per_device % d == 0)


# divisors (flops, weight read, activation in, activation out, kv, resident params) per mode;
# "t" = tp, "k" = min(tp, kv_heads), "s" = tp with sequence parallelism else 1
_MODES = {
    "col": ("t", "t", "1", "t", "1", "t"),
    "kv_col": ("k", "k", "1", "k", "1", "k"),
    "row": ("t", "t", "t", "1", "1", "t"),
    "heads": ("t", "t", "t", "t", "k", "t"),
    "kv_heads": ("k", "k", "k", "k", "k", "k"),
    "vocab": ("t", "t", "1", "t", "1", "t"),
    "embed": ("1", "t", "1", "1", "1", "t"),
    "replicated": ("s", "1", "s", "s", "1", "1"),
    "partial": ("1", "1", "1", "1", "1", "1"),
    "expert_col": ("t", "t", "1", "t", "1", "t"),
    "expert_row": ("t", "t", "t", "1", "1", "t"),
}
_COLUMNS = ("flops", "weight", "act_in", "act_out", "kv", "param")


def divisors(graph: OpGraph, layout: Layout) -> dict[str, np.ndarray]:
    """Per-operator divisors of each quantity under the layout's tensor (and sequence) parallelism."""
    key = ("div", layout.tp, layout.sp)
    cache = graph.__dict__.setdefault("_div_cache", {})
    if key in cache:
        return cache[key]
    tp = layout.tp
    values = {"t": float(tp), "k": float(min(tp, graph.meta.num_kv_heads or tp)), "s": float(tp if layout.sp else 1),
              "1": 1.0}
    table = {mode: [values[c] for c in cols] for mode, cols in _MODES.items()}
    rows = np.array([table.get(op.tp, table["replicated"]) for op in graph.ops], dtype=float).reshape(-1, 6)
    out = {name: rows[:, i] for i, name in enumerate(_COLUMNS)}
    cache[key] = out
    return out


# ---- pipeline ----

@dataclass
class Blocks:
    """Operators grouped into layer blocks (pre-layer operators join the first, post-layer the last)."""

    index: np.ndarray  # block of each operator, 0..n-1
    count: int
    boundary_bytes: np.ndarray  # bytes crossing the boundary after block j (length count-1)


def graph_view(graph: OpGraph) -> nx.DiGraph:
    """Operators as nodes, an edge per tensor from its producer to each consumer (attribute ``bytes``)."""
    g = nx.DiGraph()
    producer: dict[str, int] = {}
    for i, op in enumerate(graph.ops):
        g.add_node(i)
        for name in op.outputs:
            producer[name] = i
    for i, op in enumerate(graph.ops):
        for name in op.inputs:
            j = producer.get(name)
            if j is not None and j != i:
                g.add_edge(j, i, tensor=name, bytes=graph.tensors.get(name, 0.0))
    return g


def blocks(graph: OpGraph, boundaries: bool = True) -> Blocks:
    """Layer blocks of the graph and the bytes crossing each boundary between them (cached on the graph).

    The crossing bytes come from the networkx view; ``boundaries=False`` skips them (one pipeline stage)."""
    cache = graph.__dict__.setdefault("_div_cache", {})
    if "blocks" not in cache:
        layers = sorted({op.layer for op in graph.ops if op.layer is not None})
        rank = {layer: k for k, layer in enumerate(layers)}
        n = max(len(layers), 1)
        index = np.zeros(len(graph.ops), dtype=int)
        seen_layer = False
        for i, op in enumerate(graph.ops):
            if op.layer is not None:
                index[i] = rank[op.layer]
                seen_layer = True
            else:
                index[i] = 0 if not seen_layer else n - 1
        cache["blocks"] = Blocks(index, n, np.zeros(0))
    out = cache["blocks"]
    if boundaries and out.count > 1 and len(out.boundary_bytes) != out.count - 1:
        out.boundary_bytes = _crossing(graph, out.index, out.count)
    return out


def _crossing(graph: OpGraph, index: np.ndarray, n: int) -> np.ndarray:
    """Bytes of the tensors produced before each block boundary and consumed after it (each tensor once)."""
    g = graph_view(graph)
    if not nx.is_directed_acyclic_graph(g):
        raise SpecError(f"{graph.meta.source}: the operator graph has a cycle")
    last_use: dict[str, tuple[int, int, float]] = {}
    for u, v, data in g.edges(data=True):
        bu, bv = index[u], index[v]
        if bv > bu:
            name = data["tensor"]
            prev = last_use.get(name)
            if prev is None or bv > prev[1]:
                last_use[name] = (bu, bv, data["bytes"])
    crossing = np.zeros(n + 1)
    for bu, bv, nbytes in last_use.values():
        crossing[bu] += nbytes
        crossing[bv] -= nbytes
    return np.cumsum(crossing)[: n - 1]


def partition(costs: np.ndarray, stages: int) -> list[int]:
    """Contiguous split of ``costs`` into ``stages`` groups minimising the largest group sum (exact DP).

    Returns the start index of every stage."""
    n = len(costs)
    if stages <= 1:
        return [0]
    if stages >= n:
        return list(range(n))[:stages]
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    span = prefix[None, :] - prefix[:, None]  # span[i, j] = cost of blocks i..j-1
    lower = np.tril(np.ones((n + 1, n + 1), dtype=bool))  # i >= j: not a stage
    best = np.where(np.arange(n + 1) == 0, 0.0, np.inf)
    args = []
    for _ in range(stages):
        cand = np.where(lower, np.inf, np.maximum(best[:, None], span))  # [i, j]
        arg = np.argmin(cand, axis=0)
        best = cand[arg, np.arange(n + 1)]
        args.append(arg)
    starts, j = [], n
    for arg in reversed(args):
        i = int(arg[j])
        starts.append(i)
        j = i
    return starts[::-1]


def enumerate_layouts(meta: GraphMeta, devices: int, batch: int, sp: bool = False) -> list[Layout]:
    """Every TP x PP x EP (x DP filling the rest) layout of ``devices`` that :func:`validate` accepts."""
    out = []
    divs = [d for d in range(1, devices + 1) if devices % d == 0]
    for tp, pp, ep in product(divs, divs, divs):
        if devices % (tp * pp * ep):
            continue
        layout = Layout(tp=tp, pp=pp, ep=ep, dp=devices // (tp * pp * ep), sp=sp and tp > 1)
        try:
            validate(meta, layout, batch)
        except SpecError:
            continue
        out.append(layout)
    return out


__all__ = ["Layout", "validate", "divisors", "blocks", "partition", "enumerate_layouts", "graph_view",
           "prefill_microbatches", "decode_microbatches", "replace"]
