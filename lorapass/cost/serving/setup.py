"""Everything one serving analysis shares between policies: model, device, adapters, step model, requests, pool."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lorapass.cost.analysis import ModelSource
from lorapass.cost.hw import DTYPE_BYTES, HardwareSpec
from lorapass.cost.serving import adapters as adapter_set
from lorapass.cost.serving.adapters import AdapterSet
from lorapass.cost.serving.simulate import SimResult, Simulation
from lorapass.cost.serving.step import StepModel
from lorapass.cost.serving.trace import Requests, generate, popularity
from lorapass.cost.serving.workload import TraceArrivals, WorkloadFile
from lorapass.errors import SpecError


@dataclass
class Setup:
    source: ModelSource
    spec: HardwareSpec
    wf: WorkloadFile
    adapters: AdapterSet
    step: StepModel
    requests: Requests
    popularity: np.ndarray  # of each adapter (from the trace's own counts when arrivals are a trace)
    kv_tokens: int
    activation_bytes: float
    slot_bytes: float  # a padded bank's preallocated slots

    def simulate(self, policy: str, switch: str | None = None) -> SimResult:
        w = self.wf.workload
        merge = w.merge if switch is None else w.merge.model_copy(update={"switch": switch})
        return Simulation(self.step, self.adapters, self.requests, w.server, merge, policy, self.spec.host,
                          self.kv_tokens, self.popularity).run()


def build(source: ModelSource, spec: HardwareSpec, wf: WorkloadFile, tp: int = 1) -> Setup:
    """Resolve adapters, requests and the KV pool; SpecError naming the key when something cannot work."""
    w, server = wf.workload, wf.workload.server
    if spec.host is None:
        raise SpecError(f"{spec.name}: host: missing (the serving simulation needs the host link and memory)")
    probe = source.graph(1, 1, 1)
    features = probe.site_features()

    ad = adapter_set.build(wf, probe.linear_paths(), probe.meta.output_heads, features,
                           DTYPE_BYTES[probe.meta.dtype])
    if server.max_lora_rank is not None and server.max_lora_rank < ad.max_rank:
        raise SpecError(f"{wf.source}: server.max_lora_rank {server.max_lora_rank} is below the largest adapter "
                        f"rank {ad.max_rank}")
    if server.bank == "padded" and server.max_loras is None:
        raise SpecError(f"{wf.source}: server.max_loras: a padded bank preallocates max_loras slots; give it")
    kernel = None if server.kernel_overhead_us is None else server.kernel_overhead_us * 1e-6
    step = StepModel(source, spec, ad, tp=tp, kernel_overhead=kernel, bank=server.bank,
                     slot_rank=server.max_lora_rank)
    reqs = generate(wf, ad.names)
    if isinstance(w.arrivals, TraceArrivals):
        p = np.bincount(reqs.adapter, minlength=len(ad)) / len(reqs)
    else:
        p = popularity(w.popularity, len(ad), wf.source)
    slots = (server.max_loras or 0) * ad.gather_bytes(np.zeros(1), "padded", step.slot_rank) \
        if server.bank == "padded" else 0.0
    act = step.activation_bytes(server.max_batch_tokens)
    if server.kv_tokens is not None:
        pool = server.kv_tokens
    else:
        free = spec.capacity * server.memory_utilization - step.weight_bytes - act - slots
        pool = int(math.floor(free / step.kv_bytes_per_token))
        if pool <= 0:
            raise SpecError(f"{source.name} does not fit {spec.name}: weights {step.weight_bytes / 1e9:.1f} GB + "
                            f"activations + adapter slots leave no KV cache (server.memory_utilization "
                            f"{server.memory_utilization})")
    longest = int((reqs.prompt + reqs.output - 1).max())
    if longest > pool:
        raise SpecError(f"{wf.source}: a request needs {longest} KV tokens, the pool holds {pool} "
                        f"(server.kv_tokens / memory_utilization, or shorter prompt/output)")
    if int(reqs.prompt.max()) > server.max_batch_tokens:
        raise SpecError(f"{wf.source}: server.max_batch_tokens {server.max_batch_tokens} is below the longest "
                        f"prompt ({int(reqs.prompt.max())} tokens)")
    host_slots = len(ad) if server.max_cpu_loras is None else min(server.max_cpu_loras, len(ad))
    need = float(np.sort(ad.bytes)[::-1][:host_slots].sum())
    if need > spec.host.capacity:
        raise SpecError(f"{wf.source}: server.max_cpu_loras: {host_slots} adapters need {need / 2**30:.1f} GiB of "
                        f"host memory, {spec.name} has host.memory_gib {spec.host.memory_gib:g}")
    return Setup(source, spec, wf, ad, step, reqs, p, pool, act, slots)
