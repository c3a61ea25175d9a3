"""The sweep benchmark runs and reports its wall time as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_prints_json():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "analyse_bench.py"), "--devices", "8,16"],
                         capture_output=True, text=True, check=True, timeout=120)
    data = json.loads(out.stdout)
    assert data["model"] == "Llama-2-70B" and data["lora"] == {"rank": 16, "targets": "all-linear",
                                                               "strategy": "dynamic", "sites": 7 * 80}
    assert data["device_counts"] == 2 and data["layouts_ranked"] > 0
    assert set(data["best_per_device_count"]) == {"8", "16"}
    assert 0 < data["wall_time_s"] < 30 and data["goal_s"] == 2.0
