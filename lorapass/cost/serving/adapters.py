"""The adapter set of a workload, and the cost terms that depend only on adapters.

Each adapter has a rank per targeted site (a row of :attr:`AdapterSet.rank`, zero where it does not target the
site), resolved with the same ``select`` the rewrite uses. Cost terms (``e`` bytes per weight element):

- adapter bytes = e * sum_sites r * (d_in + d_out); its host->device load copies 2 tensors (A, B) per site:
  size / (link bandwidth * link efficiency) + tensors * link latency (:meth:`lorapass.cost.hw.Host.load_time`);
- bank gather of a batch with distinct adapters D: grouped kernels (Punica SGMV, S-LoRA) read every distinct
  adapter's A and B once, e * sum_{a in D} sum_s r_a,s (d_in + d_out); a padded bank (vLLM) reads |D| slots of
  the slot rank R on every site of the union: e * |D| * R * sum_s (d_in + d_out);
- padding waste of a padded bank = 1 - grouped / padded gather bytes (1 - sum_{a in D} r_a / (|D| * R) when
  the adapters target the same sites).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from lorapass.cost.serving.workload import WorkloadFile
from lorapass.errors import SpecError


@dataclass
class AdapterSet:
    names: list[str]
    sites: list[str]  # union of targeted module paths, in graph order
    d_in: np.ndarray  # per site
    d_out: np.ndarray
    rank: np.ndarray  # [adapters, sites], 0 = not targeted
    elem_bytes: float

    def __len__(self) -> int:
        return len(self.names)

    @cached_property
    def bytes(self) -> np.ndarray:
        """Bytes of every adapter's A and B matrices."""
        return self.elem_bytes * (self.rank @ (self.d_in + self.d_out))

    @cached_property
    def tensors(self) -> np.ndarray:
        """Tensors (A and B per targeted site) a load copies, per adapter."""
        return 2 * (self.rank > 0).sum(axis=1)

    @property
    def max_rank(self) -> int:
        return int(self.rank.max())

    def gather_bytes(self, distinct: np.ndarray, bank: str = "grouped", slot_rank: int | None = None) -> float:
        """Adapter weight bytes one step reads for a batch whose distinct adapters are ``distinct``."""
        if bank == "padded":
            r = slot_rank or self.max_rank
            return self.elem_bytes * len(distinct) * r * float((self.d_in + self.d_out).sum())
        return float(self.bytes[np.asarray(distinct, dtype=int)].sum())

    def padding_waste(self, distinct: np.ndarray, slot_rank: int | None = None) -> float:
        """Fraction of the padded bank's gathered bytes that are zero padding: 1 - grouped / padded bytes
        (= 1 - sum r / (k * R) when the adapters target the same sites)."""
        padded = self.gather_bytes(distinct, "padded", slot_rank)
        return 1.0 - self.gather_bytes(distinct) / padded if padded else 0.0


def build(wf: WorkloadFile, paths: list[str], output_heads: tuple[str, ...], features: dict[str, tuple[int, int]],
          elem_bytes: float) -> AdapterSet:
    """The workload's adapters on a graph with these linear ``paths`` (``features``: path -> (in, out))."""
    from lorapass.rules import LoraRule, RuleSet

    spec = wf.workload.adapters
    if spec.dirs is not None:
        folders = [wf.path(d) for d in spec.dirs]
        rules = [LoraRule.from_peft_config(d) for d in folders]
        names = [d.name for d in folders]
        chosen = [_ranks(r.select(paths, output_heads)) for r in rules]
    else:
        if spec.rules is not None:
            ruleset = RuleSet.from_yaml(wf.path(spec.rules))
            base = _ranks({p: v[1] for p, v in ruleset.select(paths, list(output_heads)).items()})
            chosen = [base] * spec.count
        else:
            rule = LoraRule(name="workload", target_modules=spec.target_modules, r=1)
            sites = list(rule.select(paths, output_heads))
            chosen = [{p: r for p in sites} for r in _adapter_ranks(wf, spec.count)]
        names = [f"adapter-{k}" for k in range(spec.count)]
    if len(set(names)) != len(names):
        raise SpecError(f"{wf.source}: adapters.dirs: two adapter directories share a name")
    sites = [p for p in paths if any(p in c for c in chosen)]
    col = {p: k for k, p in enumerate(sites)}
    rank = np.zeros((len(names), len(sites)), dtype=np.int64)
    for a, c in enumerate(chosen):
        for p, r in c.items():
            rank[a, col[p]] = r
    d_in = np.array([features[p][0] for p in sites], dtype=float)
    d_out = np.array([features[p][1] for p in sites], dtype=float)
    return AdapterSet(names, sites, d_in, d_out, rank, elem_bytes)


def _ranks(selection: dict) -> dict[str, int]:
    return {p: params.r for p, params in selection.items()}


def _adapter_ranks(wf: WorkloadFile, count: int) -> list[int]:
    spec = wf.workload.adapters
    ranks = list(spec.ranks)
    if spec.rank_weights is None:
        return [ranks[k % len(ranks)] for k in range(count)]  # round-robin, as S-LoRA assigns them
    w = np.array(spec.rank_weights, dtype=float)
    if w.sum() <= 0:
        raise SpecError(f"{wf.source}: adapters.rank_weights: all weights are zero")
    rng = np.random.default_rng([wf.workload.seed, 1])
    return [int(r) for r in rng.choice(ranks, size=count, p=w / w.sum())]
