"""benchmarks/multi_bench.py --quick runs end to end on a tiny Llama; its JSON has every field, and the mixed run's
rows are the per-adapter runs' outputs. Speed targets are judged by the benchmark itself (a full run), never here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "multi_bench.py"
VARIANTS = {"multi", "dynamic_same_adapter", "dynamic_per_adapter", "base"}


def test_multi_bench_quick_json():
    out = subprocess.run([sys.executable, str(BENCH), "--quick", "--repeat", "2"], check=False,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["adapters"]["count"] == 4 and report["batch"]["lora_ids"] == [1, 2, 3, 4, 1, 2, 3, 4]
    for phase, shape in (("decode", [8, 1]), ("prefill", [8, 16])):
        p = report["phases"][phase]
        assert p["shape"] == shape and p["runs"] > 0
        assert set(p["median_ms"]) == set(p["cpu_median_ms"]) == VARIANTS
        assert all(v > 0 for v in p["median_ms"].values())
        assert all(0 < lo <= hi for lo, hi in p["ratio_range_over_blocks"].values())
        assert p["multi_over_dynamic_same_adapter"] > 0 and p["multi_over_dynamic_per_adapter"] > 0
        assert all(isinstance(v, bool) for v in p["targets_met"].values())
        assert 0 <= p["max_rel_error_multi_vs_per_adapter"] <= 1e-5  # every row is its own adapter's output
    profile = report["phases"]["decode"]["ort_profile"]
    assert {"Gather", "MatMul", "Add"} <= set(profile["multi"]["lora_by_op"])
    assert set(profile["dynamic"]["lora_by_op"]) == {"MatMul", "Add"}
