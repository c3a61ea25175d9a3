"""``lorapass analyse MODEL --hw SPEC --workload W.yaml``: simulate the policies, advise, sweep adapter counts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lorapass.cost.analysis import ModelSource
from lorapass.cost.hw import HardwareSpec
from lorapass.cost.serving import setup as serving_setup
from lorapass.cost.serving.advisor import advise
from lorapass.cost.serving.metrics import label, summarize
from lorapass.cost.serving.workload import TraceArrivals, WeightPopularity, WorkloadFile
from lorapass.errors import SpecError

RUNS = ("merge", "dynamic", "multi", "all")


def runs(policy: str, switch: str) -> list[tuple[str, str | None]]:
    """(policy, merge switch rule) pairs ``--policy`` asks for; ``all`` runs both merge rules."""
    if policy not in RUNS:
        raise SpecError(f"--policy must be one of {', '.join(RUNS)}, not {policy!r}")
    if policy == "all":
        return [("merge", "drain"), ("merge", "threshold"), ("dynamic", None), ("multi", None)]
    return [(policy, switch if policy == "merge" else None)]


@dataclass
class ServingReport:
    model: str
    hardware: str
    workload: str
    adapters: int
    requests: int
    kv_pool_tokens: int
    policies: dict[str, dict]
    advisor: dict
    sweep: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"model": self.model, "hardware": self.hardware, "workload": self.workload,
                "adapters": self.adapters, "requests": self.requests, "kv_pool_tokens": self.kv_pool_tokens,
                "policies": self.policies, "advisor": self.advisor, "sweep": self.sweep,
                "wall_s": self.seconds}


def simulate_all(st: serving_setup.Setup, policy: str) -> dict[str, dict]:
    return {label(p, sw): summarize(st, st.simulate(p, sw)) for p, sw in runs(policy, st.wf.workload.merge.switch)}


def sweep_counts(total: int) -> list[int]:
    """Adapter counts of the plot: powers of two up to the workload's count, and the count itself."""
    counts, c = [], 1
    while c < total:
        counts.append(c)
        c *= 2
    return counts + [total]


def sweep(source: ModelSource, spec: HardwareSpec, wf: WorkloadFile, policy: str, tp: int = 1,
          counts: list[int] | None = None) -> list[dict]:
    """Throughput and p99 TTFT of every policy at several adapter counts (generated adapters only)."""
    w = wf.workload
    if w.adapters.count is None or isinstance(w.arrivals, TraceArrivals) or \
            isinstance(w.popularity, WeightPopularity) or w.adapters.dirs is not None:
        raise SpecError(f"{wf.source}: the adapter-count sweep (--plot) needs generated adapters (adapters.count) "
                        f"with uniform, zipf or power popularity and generated arrivals")
    rows = []
    for c in counts or sweep_counts(w.adapters.count):
        changed = w.model_copy(update={"adapters": w.adapters.model_copy(update={"count": c})})
        st = serving_setup.build(source, spec, WorkloadFile(changed, wf.folder, wf.source), tp)
        for name, s in simulate_all(st, policy).items():
            rows.append({"adapters": c, "policy": name, "throughput_req_s": s["throughput_req_s"],
                         "ttft_p99_s": s["ttft_s"]["p99"], "goodput_req_s": s["goodput_req_s"]})
    return rows


def analyse_serving(source: ModelSource, spec: HardwareSpec, wf: WorkloadFile, policy: str = "all", tp: int = 1,
                    with_sweep: bool = False) -> ServingReport:
    start = time.perf_counter()
    st = serving_setup.build(source, spec, wf, tp)
    summaries = simulate_all(st, policy)
    report = ServingReport(source.name, spec.name, wf.source, len(st.adapters), len(st.requests), st.kv_tokens,
                           summaries, advise(st, summaries))
    if with_sweep:
        report.sweep = sweep(source, spec, wf, policy, tp)
    report.seconds = time.perf_counter() - start
    return report
