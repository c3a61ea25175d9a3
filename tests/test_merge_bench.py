"""merge_bench and startup_bench run end to end at a tiny size; their speed targets are judged by the benchmarks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_merge_bench_small():
    """The merge-vs-copy part; the PEFT route (a torch export per round, ~20 s even tiny) runs in the benchmark only."""
    report = run("merge_bench.py", "--layers", "1", "--repeat", "2", "--hidden", "256", "--intermediate", "512",
                 "--vocab", "1024", "--peft-shape", "none")
    merge = report["merge"]
    assert merge["adapter"]["targets"] == 7
    assert len(merge["merge_wall_s"]) == len(merge["copy_wall_s"]) == len(merge["merge_cpu_s"]) == 2
    assert merge["merge_wall_s_median"] > 0 and merge["copy_wall_s_median"] > 0 and merge["merge_over_copy"] > 0
    assert 0 < merge["peak_rss_bytes"] and merge["bytes_written"] >= merge["model"]["data_bytes"]
    assert "vs_peft" not in report and len(report["load_average_start"]) == 3


def test_startup_bench(exported, tmp_path):
    from builders import make_adapter

    model, onnx_path = exported("llama")  # a tiny Llama like the quick start's (building that one takes longer)
    make_adapter(model, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    report = run("startup_bench.py", "--model", str(onnx_path), "--adapter", str(tmp_path / "adapter"), "--repeat", "1")
    assert set(report["targets_s"]) == {"help", "inspect", "merge"} <= set(report["median_s"])
    assert all(v > 0 for v in report["median_s"].values()) and set(report["targets_met"]) == set(report["targets_s"])
