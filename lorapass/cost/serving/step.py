"""Per-iteration cost of a serving engine, from the analyser's own operators and roofline.

Every operator's per-device FLOPs and bytes (``evaluate_ops`` on the graphs ``ModelSource`` builds) are affine
in a few batch features, so the step model evaluates the operator list once at a handful of basis shapes,
solves for the coefficients, and checks them at one more shape (a model whose costs are not affine is refused):

- decode (one new token per sequence): [1, sequences, sum of contexts] (contexts capped at a sliding window);
- prefill: [1, sequences, prompt tokens, attention pairs] (pairs = sum of the visible query-key pairs);
- the LoRA operators ``apply_dynamic`` inserts, per operator o, in [T_o, rho_o, sum_a t_a rho_a,o] where T_o
  are the tokens whose adapter has o, rho_o the rank rows the bank kernel reads (sum over the distinct adapters
  of their rank at o: grouped; distinct adapters x slot rank: padded) and t_a the tokens of adapter a. Every
  site has its own A (no shared-input fusion), as S-LoRA's per-projection kernels run.

A step's time is sum over operators of max(FLOPs / (peak * eff), bytes / (bandwidth * eff)) + launches * kernel
overhead, plus the all-reduce after row-parallel linears under tensor parallelism (as ``evaluate_ops``). The
bank kernel is one launch per LoRA operator whatever the number of adapters (Punica's SGMV / vLLM's BGMV).
A merge (or unmerge) is ``merge_ops`` of the adapter's sites, costed the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorapass.cost import ops as O
from lorapass.cost.analysis import ModelSource, evaluate_ops, kv_cache_bytes
from lorapass.cost.collectives import Placement, collective_time
from lorapass.cost.config import visible_pairs
from lorapass.cost.hw import HardwareSpec
from lorapass.cost.lora import apply_dynamic, merge_ops
from lorapass.cost.ops import OpGraph
from lorapass.cost.parallel import Layout
from lorapass.cost.serving.adapters import AdapterSet
from lorapass.errors import SpecError

_DECODE_BASIS = [(1, 1), (2, 1), (1, 2)]  # (sequences, context)
_PREFILL_BASIS = [(1, 1), (2, 1), (1, 2), (1, 3)]  # (sequences, prompt length)
_LORA_BASIS = [(1, 1), (2, 1), (1, 2)]  # (tokens, rank)


class _Params:
    """What ``apply_dynamic``/``merge_ops`` read of a selection: the rule's ``fuse_shared_inputs`` (False: the
    bank kernels run one A per site, as S-LoRA's per-projection shrink) and the site's rank ``r``."""

    fuse_shared_inputs = False

    def __init__(self, r: int) -> None:
        self.r = r


@dataclass
class _Terms:
    """Operators collapsed to unique coefficient rows: per-device FLOPs and bytes = features @ coefficients."""

    flops: np.ndarray  # [features, ops]
    bytes: np.ndarray
    launches: np.ndarray  # [ops]
    reduce: np.ndarray  # [features, ops] all-reduced bytes (0 where the operator is not all-reduced)
    count: np.ndarray  # [ops] operators sharing the row

    def times(self, x: np.ndarray, peak: float, bw: float, overhead: float, comm) -> np.ndarray:
        """Seconds for each feature row of ``x`` ([steps, features])."""
        t = np.maximum((x @ self.flops) / peak, (x @ self.bytes) / bw) + self.launches * overhead
        if comm is not None and self.reduce.any():
            t = t + comm(x @ self.reduce) * (self.reduce.any(axis=0))
        return t @ self.count


def _unique(columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique columns of ``columns`` and how often each occurs."""
    uniq, counts = np.unique(np.round(columns, 9), axis=1, return_counts=True)
    return uniq, counts.astype(float)


class StepModel:
    """Iteration times of one replica of ``source`` on ``spec`` with tensor parallelism ``tp``."""

    def __init__(self, source: ModelSource, spec: HardwareSpec, adapters: AdapterSet, *, tp: int = 1,
                 kernel_overhead: float | None = None, bank: str = "grouped", slot_rank: int | None = None,
                 algorithm: str = "auto") -> None:
        self.source, self.spec, self.adapters, self.bank = source, spec, adapters, bank
        self.layout = Layout(tp=tp)
        self.overhead = spec.kernel_overhead if kernel_overhead is None else kernel_overhead
        probe = source.graph(1, 1, 1)
        self.meta = probe.meta
        if not self.meta.causal:
            raise SpecError(f"{source.name}: serving simulates decoding; an encoder-only model has no decode")
        if any(op.kind == O.GEMM_EXPERT for op in probe.ops):
            raise SpecError(f"{source.name}: the serving simulation costs dense models only (GEMM_EXPERT "
                            f"operators: expert loads are not affine in the batch)")
        if any(op.kind in O.LORA_CLASSES for op in probe.ops):
            raise SpecError(f"{source.name}: the graph already holds LoRA operators; give the base model")
        self.peak = spec.peak(self.meta.dtype) * spec.efficiency.compute
        self.bw = spec.bandwidth * spec.efficiency.memory
        link = Placement(tp, 1).link(spec)
        self._comm = (lambda nbytes: collective_time("all_reduce", tp, nbytes, link, algorithm)) if tp > 1 else None
        self.window = self.meta.sliding_window
        self.slot_rank = slot_rank or adapters.max_rank
        self.decode_terms = self._fit_base(_DECODE_BASIS, (3, 5), self._decode_graph, self._decode_x)
        self.prefill_terms = self._fit_base(_PREFILL_BASIS, (3, 7), self._prefill_graph, self._prefill_x)
        self._fit_lora()
        base = evaluate_ops(probe, spec, self.layout)
        self.weight_bytes = float(base.param.sum())
        kv_heads = self.meta.num_kv_heads / min(tp, self.meta.num_kv_heads)
        self.kv_bytes_per_token = kv_cache_bytes(self.meta, self.meta.num_layers, 1, 1, kv_heads)
        self._merge_cache: dict[tuple, float] = {}

    # ---- basis fits ----
    def _decode_graph(self, b: int, k: int) -> OpGraph:
        return self.source.graph(b, 1, k)

    def _prefill_graph(self, b: int, q: int) -> OpGraph:
        return self.source.graph(b, q, q)

    @staticmethod
    def _decode_x(b: int, k: int) -> list[float]:
        return [1.0, b, b * k]

    def _prefill_x(self, b: int, q: int) -> list[float]:
        return [1.0, b, b * q, b * self._pairs(np.array([q]))]

    def _pairs(self, prompts: np.ndarray) -> float:
        if self.window and prompts.max() > self.window:
            return float(sum(visible_pairs(q, q, True, self.window) for q in prompts))
        return float((prompts * (prompts + 1) / 2).sum())

    def _quantities(self, graph: OpGraph) -> tuple[np.ndarray, ...]:
        t = evaluate_ops(graph, self.spec, self.layout)
        a = graph.arrays()
        reduce = np.where(a["reduce"], a["act_out"], 0.0) if self.layout.tp > 1 else np.zeros(len(graph.ops))
        return t.flops, t.bytes, reduce, a["launches"]

    def _fit_base(self, basis, check, graph_at, x_at) -> _Terms:
        x = np.array([x_at(*p) for p in basis], dtype=float)
        rows = [self._quantities(graph_at(*p)) for p in basis]
        coef = [np.linalg.solve(x, np.stack([r[i] for r in rows])) for i in range(3)]
        launches = rows[0][3]
        probe = self._quantities(graph_at(*check))
        xc = np.array(x_at(*check), dtype=float)
        for i, name in enumerate(("FLOPs", "bytes")):
            if not np.allclose(xc @ coef[i], probe[i], rtol=1e-6, atol=1e-3):
                raise SpecError(f"{self.source.name}: operator {name} are not affine in the batch features; "
                                f"the serving simulation cannot cost this graph")
        stacked = np.vstack([coef[0], coef[1], coef[2], launches[None, :]])
        uniq, count = _unique(stacked)
        f = x.shape[1]
        return _Terms(uniq[:f], uniq[f:2 * f], uniq[3 * f], uniq[2 * f:3 * f], count)

    def _fit_lora(self) -> None:
        ad = self.adapters
        col = {p: k for k, p in enumerate(ad.sites)}

        def graph(t: int, r: int) -> OpGraph:
            g = self.source.graph(t, 1, 1)
            return apply_dynamic(g, {p: (_Params(r), _Params(r)) for p in ad.sites})

        first = graph(1, 1)
        lora_idx = [i for i, op in enumerate(first.ops) if op.kind in O.LORA_CLASSES]
        ops = [first.ops[i] for i in lora_idx]
        members = np.zeros((len(ad.sites), len(ops)))  # site -> op membership
        for j, op in enumerate(ops):
            for p in op.paths:
                members[col[p], j] = 1.0
        is_add = np.array([op.kind == O.LORA_ADD for op in ops])
        width = members.sum(axis=0)  # rank rows per unit rank: |fused members| for A, 1 for B

        def quantities(t: int, r: int):
            q = self._quantities(graph(t, r))
            return [v[lora_idx] for v in q]

        x = np.array([[t, r, t * r] for t, r in _LORA_BASIS], dtype=float)
        rows = [quantities(t, r) for t, r in _LORA_BASIS]
        coef = []
        for i in range(3):
            y = np.stack([r[i] for r in rows])  # [basis, ops]; rank feature scaled per op by its width
            c = np.empty((3, len(ops)))
            for j in range(len(ops)):
                xj = x.copy()
                xj[:, 1:] *= width[j]
                c[:, j] = np.linalg.solve(xj, y[:, j])
            coef.append(c)
        check = quantities(3, 3)
        for i, name in enumerate(("FLOPs", "bytes")):
            pred = np.array([np.array([3, 3 * w, 9 * w]) @ coef[i][:, j] for j, w in enumerate(width)])
            if not np.allclose(pred, check[i], rtol=1e-6, atol=1e-3):
                raise SpecError(f"{self.source.name}: LoRA operator {name} are not affine in tokens and rank")
        # per-adapter rank rows of every LoRA operator (ADD: 1 where the adapter has the site)
        rho = ad.rank.astype(float) @ members
        rho[:, is_add] = (ad.rank > 0).astype(float) @ members[:, is_add]
        pad = np.where(is_add, 1.0, self.slot_rank * width)
        stacked = np.vstack([coef[0], coef[1], coef[2], rows[0][3][None, :], pad[None, :], rho])
        uniq, count = _unique(stacked)
        self._lora = _Terms(uniq[0:3], uniq[3:6], uniq[9], uniq[6:9], count)
        self._pad = uniq[10]
        self._rho = uniq[11:]  # [adapters, unique ops]
        self._profile = np.unique(self._rho, axis=0, return_inverse=True)[1].reshape(-1)  # adapters alike in cost
        self._single: dict[tuple, float] = {}

    # ---- iteration times ----
    def decode_times(self, sequences, contexts, steps: int = 1) -> np.ndarray:
        """Base-model seconds of ``steps`` consecutive decode steps (contexts grow by one token per sequence per
        step); ``sequences`` and ``contexts`` (summed over the sequences) may be arrays of runs: [runs, steps]."""
        n = np.asarray(sequences, dtype=float)[..., None]
        c = np.asarray(contexts, dtype=float)[..., None]
        x = np.empty(np.broadcast_shapes(n.shape, (steps,)) + (3,))
        x[..., 0] = 1.0
        x[..., 1] = n
        x[..., 2] = c + np.arange(steps, dtype=float) * n
        t = self.decode_terms.times(x, self.peak, self.bw, self.overhead, self._comm)
        return np.where(n > 0, t, 0.0)

    def prefill_time(self, prompts: np.ndarray) -> float:
        """Base-model seconds of one prefill iteration over these prompts."""
        if len(prompts) == 0:
            return 0.0
        x = np.array([[1.0, len(prompts), float(prompts.sum()), self._pairs(prompts)]])
        return float(self.prefill_terms.times(x, self.peak, self.bw, self.overhead, self._comm)[0])

    def lora_time(self, adapters: np.ndarray, tokens: np.ndarray, bank: str | None = None) -> float:
        """Seconds of the LoRA bank operators for distinct ``adapters`` with ``tokens`` rows each."""
        if len(adapters) == 0:
            return 0.0
        if len(adapters) == 1:
            key = (int(self._profile[adapters[0]]), float(tokens[0]), bank or self.bank)
            if key not in self._single:
                self._single[key] = self._lora_time(adapters, tokens, bank)
            return self._single[key]
        return self._lora_time(adapters, tokens, bank)

    def lora_features(self, adapters: np.ndarray, tokens: np.ndarray, bank: str | None = None) -> np.ndarray:
        """[T_o, rho_o, sum_a t_a rho_a,o] of every (unique) LoRA operator for this batch composition."""
        t = np.asarray(tokens, dtype=float)
        if (bank or self.bank) == "padded":
            total = t.sum()
            return np.stack([np.full_like(self._pad, total), len(adapters) * self._pad, total * self._pad])
        rho = self._rho[np.asarray(adapters, dtype=int)]
        return np.stack([t @ (rho > 0), rho.sum(axis=0), t @ rho])

    def lora_bytes(self, adapters: np.ndarray, tokens: np.ndarray, bank: str | None = None) -> float:
        """Bytes the LoRA operators of one step move per device (weights gathered + activations)."""
        x = self.lora_features(adapters, tokens, bank)
        return float((x * self._lora.bytes).sum(axis=0) @ self._lora.count)

    def _lora_time(self, adapters: np.ndarray, tokens: np.ndarray, bank: str | None) -> float:
        x = self.lora_features(adapters, tokens, bank)
        flops = (x * self._lora.flops).sum(axis=0)
        nbytes = (x * self._lora.bytes).sum(axis=0)
        t_op = np.maximum(flops / self.peak, nbytes / self.bw) + self._lora.launches * self.overhead
        if self._comm is not None and self._lora.reduce.any():
            t_op = t_op + self._comm((x * self._lora.reduce).sum(axis=0)) * self._lora.reduce.any(axis=0)
        return float(t_op @ self._lora.count)

    def merge_time(self, adapter: int) -> float:
        """Seconds to fold one adapter into its weights (unmerging costs the same: W is read and written)."""
        row = self.adapters.rank[adapter]
        key = tuple(row)
        if key not in self._merge_cache:
            g = self.source.graph(1, 1, 1)
            sel = {p: (_Params(int(r)), _Params(int(r))) for p, r in zip(self.adapters.sites, row) if r > 0}
            mg = OpGraph(merge_ops(g, sel), g.meta, {})
            t = evaluate_ops(mg, self.spec, self.layout)
            launches = mg.arrays()["launches"]
            self._merge_cache[key] = float((np.maximum(t.flops / self.peak, t.bytes / self.bw)
                                            + launches * self.overhead).sum())
        return self._merge_cache[key]

    def activation_bytes(self, tokens: int) -> float:
        """Largest single-operator working set of a prefill of ``tokens`` tokens (per device)."""
        g = self.source.graph(1, tokens, tokens)
        return float(evaluate_ops(g, self.spec, self.layout).act.max())
