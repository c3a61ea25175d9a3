"""Benchmark: wall time of the serving simulation (goal: a 10-minute workload at 10 req/s in < 5 s per policy).

Two workloads on LLaMA-2-7B / A100-80GB, 10 req/s for 600 s (6000 requests), prompts lognormal (median 256,
max 2048), outputs lognormal (median 128, max 1024), zipf(1.0) popularity, ranks 8/16/32/64 on q, k, v, o:

- ``adapters_100``: 100 adapters, 32 GPU slots, every adapter in host memory;
- ``adapters_2000``: 2000 adapters, 32 GPU slots, a 500-adapter host cache (LRU, cold start).

Each policy (merge drain and threshold, dynamic, multi) is simulated ``--repeat`` times; the JSON gives the
median wall and CPU time per policy (CPU time is what a quiet machine's wall time would be), the set-up time (step-model fit, request draw) and what each run predicted.

    python benchmarks/serving_bench.py [--repeat 3] [--duration 600] [--rate 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorapass.cost.analysis import ModelSource  # noqa: E402
from lorapass.cost.hw import load_spec  # noqa: E402
from lorapass.cost.serving import setup as serving_setup  # noqa: E402
from lorapass.cost.serving.analyse import runs  # noqa: E402
from lorapass.cost.serving.metrics import label, summarize  # noqa: E402
from lorapass.cost.serving.workload import from_dict  # noqa: E402

GOAL_S = 5.0


def workload(adapters: int, host_cache: int | None, duration: float, rate: float) -> dict:
    return {"adapters": {"count": adapters, "ranks": [8, 16, 32, 64],
                         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "popularity": {"kind": "zipf", "alpha": 1.0},
            "arrivals": {"kind": "poisson", "rate": rate},
            "prompt": {"kind": "lognormal", "median": 256, "sigma": 1.0, "max": 2048},
            "output": {"kind": "lognormal", "median": 128, "sigma": 1.0, "max": 1024},
            "duration_s": duration, "slo": {"ttft_s": 1.0, "tpot_s": 0.05}, "seed": 0,
            "server": {"max_loras": 32, "max_cpu_loras": host_cache, "max_running": 256}}


def measure(name: str, data: dict, repeat: int) -> dict:
    start = time.perf_counter()
    st = serving_setup.build(ModelSource(ROOT / "models" / "llama2-7b.yaml"), load_spec(ROOT / "hw_specs/a100.yaml"),
                             from_dict(data, source=name))
    setup_s = time.perf_counter() - start
    out = {"requests": len(st.requests), "adapters": len(st.adapters), "setup_s": round(setup_s, 3), "policies": {}}
    for policy, switch in runs("all", "drain"):
        walls, cpus = [], []
        for _ in range(repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            result = st.simulate(policy, switch)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        s = summarize(st, result)
        out["policies"][label(policy, switch)] = {
            "wall_s_median": round(statistics.median(walls), 3), "wall_s_runs": [round(w, 3) for w in walls],
            "cpu_s_median": round(statistics.median(cpus), 3),
            "throughput_req_s": round(s["throughput_req_s"], 3), "ttft_p99_s": round(s["ttft_s"]["p99"], 3),
            "tpot_p50_s": round(s["tpot_s"]["p50"], 4), "slo_attainment": round(s["slo_attainment"], 3),
            "decode_iterations": s["batch"]["decode_iterations"], "miss_rate": round(s["adapters"]["miss_rate"], 4)}
    worst = max(p["wall_s_median"] for p in out["policies"].values())
    out["worst_policy_wall_s"] = worst
    out["meets_goal"] = worst < GOAL_S
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--rate", type=float, default=10.0)
    args = p.parse_args(argv)
    result = {"benchmark": "serving simulation", "model": "Llama-2-7B", "hardware": "A100-SXM4-80GB",
              "duration_s": args.duration, "rate_req_s": args.rate, "goal_s": GOAL_S,
              "adapters_100": measure("adapters_100", workload(100, None, args.duration, args.rate), args.repeat),
              "adapters_2000": measure("adapters_2000", workload(2000, 500, args.duration, args.rate), args.repeat)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
