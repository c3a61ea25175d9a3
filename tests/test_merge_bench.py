"""merge_bench runs end to end at a tiny size; its speed targets are judged by the benchmark itself."""

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
    report = run("merge_bench.py", "--layers", "1", "--repeat", "1", "--hidden", "256", "--intermediate", "512",
                 "--vocab", "1024")
    assert report["adapter"]["targets"] == 7
    assert report["merge_wall_s_median"] > 0 and report["copy_wall_s_median"] > 0
    assert 0 < report["peak_rss_bytes"] and report["bytes_written"] >= report["model"]["data_bytes"]
