"""Benchmark: full layout sweep of Llama-2-70B with dynamic LoRA r=16 (all linear layers) on 8-64 H100s.

Every device count from 8 to 64, every valid TP x PP x EP layout (DP filling the rest), both phases, LoRA
overhead against the base model, memory per device. Prints one JSON object: the wall time (goal < 2 s), how
many layouts were ranked, and the best layout per device count.

    python benchmarks/analyse_bench.py [--devices 8-64] [--batch 64] [--seq 2048] [--gen 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorapass.cost.analysis import Analyser, ModelSource, Workload, sweep  # noqa: E402
from lorapass.cost.cli import _devices  # noqa: E402
from lorapass.cost.hw import load_spec  # noqa: E402
from lorapass.rules import LoraRule  # noqa: E402

GOAL_S = 2.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="8-64")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--gen", type=int, default=256)
    args = p.parse_args(argv)

    start = time.perf_counter()
    spec = load_spec(ROOT / "hw_specs" / "h100.yaml")
    rule = LoraRule(name="all-linear-r16", target_modules="all-linear", r=16, lora_alpha=32, strategy="dynamic")
    workload = Workload(args.batch, args.seq, args.gen)
    analyser = Analyser(ModelSource(ROOT / "models" / "llama2-70b.yaml"), spec, workload, rule)
    counts = _devices(args.devices)
    result = sweep(analyser.source, spec, counts, workload, analyser=analyser)
    wall = time.perf_counter() - start

    best: dict[int, dict] = {}
    for a in result.results:  # ranked best first
        n = a.layout.devices
        if n not in best and a.memory.fits:
            best[n] = {"layout": a.layout.label(), "tokens_per_s": round(a.tokens_per_s, 1),
                       "ttft_s": round(a.ttft, 4), "tpot_s": round(a.tpot, 5),
                       "lora_overhead_pct": {k: round(v, 2) for k, v in a.overhead.items()},
                       "memory_gb": round(a.memory.total / 1e9, 2)}
    top = result.results[0]
    print(json.dumps({
        "benchmark": "analyse sweep",
        "model": "Llama-2-70B", "hardware": spec.name, "lora": {"rank": 16, "targets": "all-linear",
                                                                "strategy": "dynamic", "sites": analyser.lora.sites},
        "workload": {"batch": args.batch, "seq": args.seq, "gen": args.gen},
        "device_counts": len(counts), "layouts_ranked": len(result.results),
        "layouts_fitting": sum(a.memory.fits for a in result.results),
        "wall_time_s": round(wall, 4), "sweep_time_s": round(result.seconds, 4), "goal_s": GOAL_S,
        "within_goal": wall < GOAL_S,
        "best": {"layout": top.layout.label(), "devices": top.layout.devices,
                 "tokens_per_s": round(top.tokens_per_s, 1)},
        "best_per_device_count": {str(k): v for k, v in sorted(best.items())},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
