"""benchmarks/diffusion_bench.py --small runs end to end on the tests' tiny SD1.x UNet: every module of its kohya
file binds to a site of the export, and the JSON carries the figures the full run is judged by (never here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "diffusion_bench.py"


def test_diffusion_bench_small_json():
    out = subprocess.run([sys.executable, str(BENCH), "--small", "--repeat", "2", "--steps", "1"], check=False,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["adapter"]["modules"] == report["adapter"]["targets"] > 0  # nothing of the file left unbound
    assert len(report["merge_wall_s"]) == len(report["copy_wall_s"]) == 2
    assert report["merge_over_copy"] > 0 and report["dynamic_over_base_step"] > 0
    assert all(t > 0 for t in report["merge_wall_s"] + report["step_s"]["base"] + report["step_s"]["dynamic"])
    assert report["merge_over_copy_target"] == 1.5 and report["dynamic_over_base_step_target"] == 1.15
    floors = report["merge_floors"]
    assert floors["setup_s_median"] > 0 and floors["fold_thread_s_median"] > 0
    assert floors["setup_s_median"] + floors["fold_thread_s_median"] < max(report["merge_wall_s"]) * 3
