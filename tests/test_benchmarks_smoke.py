"""The benchmarks run end to end (tiny sizes); their speed targets are judged by the benchmarks themselves."""

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


def test_runtime_bench_quick():
    report = run("runtime_bench.py", "--quick", "--repeat", "2")
    for phase in ("decode", "prefill"):
        p = report["phases"][phase]
        assert set(p["median_ms"]) == {"base", "merged", "dynamic", "dynamic_unfused", "peft_eager"}
        assert all(v > 0 for v in p["median_ms"].values())
        assert all(e <= 1e-4 for e in p["max_rel_error_vs_peft"].values())  # the variants compute PEFT's output


def test_merge_bench_small():
    report = run("merge_bench.py", "--layers", "1", "--repeat", "1", "--hidden", "256", "--intermediate", "512",
                 "--vocab", "1024")
    assert report["adapter"]["targets"] == 7
    assert report["merge_wall_s_median"] > 0 and report["copy_wall_s_median"] > 0
    assert 0 < report["peak_rss_bytes"] and report["bytes_written"] >= report["model"]["data_bytes"]
