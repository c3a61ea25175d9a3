"""The int4 KV-cache decode case of benchmarks/runtime_bench.py runs on a tiny model; its JSON has every figure.

Speed targets are judged by the benchmark itself (a full run), never here."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import runtime_bench  # noqa: E402


def test_int4_kv_decode_case_reports_both_overheads():
    report = runtime_bench.kv_decode_int4_case(quick=True, rounds=2, blocks=1)
    med = report["median_ms"]
    assert set(med) == {"base", "dynamic", "slots_with_adapter", "fp32_base", "fp32_dynamic"} and min(med.values()) > 0
    assert report["int4_dynamic_over_int4_base"] == round(med["dynamic"] / med["base"], 3)
    assert report["fp32_dynamic_over_fp32_base"] == round(med["fp32_dynamic"] / med["fp32_base"], 3)
    assert report["int4_overhead_minus_fp32_overhead"] == round(
        med["dynamic"] / med["base"] - med["fp32_dynamic"] / med["fp32_base"], 3)
    assert set(report["targets_met"]) == {"int4_dynamic_over_int4_base"} and report["targets"]["int4_dynamic_over_int4_base"] == 1.15
    assert "int4" in report["model"]["precision"] and report["adapter"]["r"] == 16
