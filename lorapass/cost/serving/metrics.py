"""What a simulation run measured: throughput, latency percentiles, SLO attainment, memory, adapter traffic.

TTFT = first token (end of the request's prefill iteration) - arrival; TPOT = (finish - first token) /
(output - 1) over requests with more than one output token; throughput = requests (and output tokens) /
makespan, the time from the start of the trace to the last completion (S-LoRA's definition). SLO attainment is
the share of requests meeting every given SLO; goodput = throughput * attainment.
"""

from __future__ import annotations

import numpy as np

from lorapass.cost.serving.setup import Setup
from lorapass.cost.serving.simulate import SimResult


def label(policy: str, switch: str | None) -> str:
    return f"{policy}:{switch}" if switch else policy


def _pct(x: np.ndarray) -> dict[str, float | None]:
    x = x[np.isfinite(x)]
    if not x.size:
        return {"p50": None, "p99": None, "mean": None}
    return {"p50": float(np.percentile(x, 50)), "p99": float(np.percentile(x, 99)), "mean": float(x.mean())}


def summarize(setup: Setup, r: SimResult) -> dict:
    """The run's figures as plain numbers (seconds, GB = 1e9 bytes)."""
    req, st, step = r.requests, r.stats, setup.step
    ttft = r.first_token - req.arrival
    decoding = req.output > 1
    tpot = np.where(decoding, (r.finish - r.first_token) / np.maximum(req.output - 1, 1), np.nan)
    makespan = float(np.nanmax(r.finish))
    slo = setup.wf.workload.slo
    ok = np.ones(len(req), dtype=bool)
    if slo.ttft_s is not None:
        ok &= ttft <= slo.ttft_s
    if slo.tpot_s is not None:
        ok &= ~decoding | (tpot <= slo.tpot_s)
    attainment = float(ok.mean()) if (slo.ttft_s or slo.tpot_s) else None
    thr = len(req) / makespan
    kv = step.kv_bytes_per_token
    padded = setup.wf.workload.server.bank == "padded" and r.switch != "drain"  # slots preallocated
    slots = setup.slot_bytes if padded else st.peak_adapter_bytes
    rounds = max(st.rounds, 1.0)
    return {
        "policy": label(r.policy, r.switch),
        "requests": len(req),
        "makespan_s": makespan,
        "throughput_req_s": thr,
        "throughput_tok_s": float(req.output.sum()) / makespan,
        "ttft_s": _pct(ttft),
        "tpot_s": _pct(tpot),
        "e2e_s": _pct(r.finish - req.arrival),
        "slo_attainment": attainment,
        "goodput_req_s": thr * attainment if attainment is not None else thr,
        "batch": {"mean_running": st.running_sum / rounds,
                  "mean_decode_batch": st.batch_sum / max(st.decode_steps, 1.0),
                  "peak_running": st.peak_running, "decode_iterations": st.decode_steps, "prefills": st.prefills},
        "adapters": {"distinct_per_batch": st.distinct_sum / rounds,
                     "expected_distinct_per_batch": st.expected_sum / rounds,
                     "miss_rate": float(r.missed.mean()), "loads": r.loads,
                     "host_miss_rate": r.host_misses / r.loads if r.loads else 0.0},
        "switches": st.switches,
        "stalls_s": {"merge_switch": st.switch_s, "load": st.load_stall_s, "idle_on_load": st.idle_load_s},
        "utilization": st.busy_s / makespan,
        "merge_threshold": float(np.median(r.threshold)) if r.threshold else None,
        "memory_gb": {
            "capacity": setup.spec.capacity / 1e9,
            "weights": step.weight_bytes / 1e9,
            "activations": setup.activation_bytes / 1e9,
            "kv_pool": r.kv_tokens * kv / 1e9,
            "kv_peak": st.peak_kv_tokens * kv / 1e9,
            "adapter_slots": slots / 1e9,
            "fragmentation": (st.peak_kv_blocks_waste * kv + (slots - st.peak_adapter_bytes if padded else 0.0))
            / 1e9,
            "host_adapter_cache": r.peak_host_bytes / 1e9,
        },
    }
