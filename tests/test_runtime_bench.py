"""benchmarks/runtime_bench.py --quick runs end to end on a tiny Llama; its JSON has every field, all positive.

Speed targets are judged by the benchmark itself (a full run), never here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "runtime_bench.py"
VARIANTS = {"base", "merged", "dynamic", "dynamic_unfused", "dynamic_dora", "peft_eager"}


def test_runtime_bench_quick_json():
    out = subprocess.run([sys.executable, str(BENCH), "--quick", "--repeat", "2"], check=False,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["model"]["params"] > 0 and report["adapter"]["r"] == 16
    assert report["ort"]["intra_op_num_threads"] == 2 and "no KV cache" in report["decode_note"]
    assert report["blocks"] >= 2 and all(n > 0 for n in report["repeat"].values())
    assert set(report["targets"]) == {"merged_over_base", "dynamic_over_base_decode", "dynamic_over_base_prefill",
                                      "peft_eager_over_ort_dynamic", "dora_over_lora_dynamic_decode"}
    for phase, shape in (("decode", [1, 1]), ("prefill", [1, 32])):
        p = report["phases"][phase]
        assert p["shape"] == shape
        assert set(p["median_ms"]) == VARIANTS and all(v > 0 for v in p["median_ms"].values())
        assert p["reference_median_ms"]["torch_eager_base"] > 0
        for ratio in ("merged_over_base", "dynamic_over_base", "dynamic_unfused_over_base", "fused_over_unfused",
                      "peft_eager_over_ort_dynamic", "peft_eager_over_ort_dynamic_unfused",
                      "torch_eager_base_over_ort_base", "peft_eager_over_torch_eager_base", "dora_over_lora_dynamic"):
            assert p[ratio] > 0, ratio
        assert set(p["ratio_range_over_blocks"]) == VARIANTS - {"base"} | {"torch_eager_base"}
        assert all(0 < lo <= hi for lo, hi in p["ratio_range_over_blocks"].values())
        assert set(p["targets_met"]) == {"merged_over_base", "dynamic_over_base", "dynamic_unfused_over_base",
                                         "peft_eager_over_ort_dynamic"} | ({"dora_over_lora_dynamic"} if phase == "decode" else set())
        assert 0 < p["dora_over_lora_range_over_blocks"][0] <= p["dora_over_lora_range_over_blocks"][1]
        assert all(isinstance(v, bool) for v in p["targets_met"].values())
        assert all(0 <= e <= 1e-4 for e in p["max_rel_error_vs_peft"].values())  # every variant computes PEFT's output
        fused, unfused = p["ort_profile"]["dynamic"], p["ort_profile"]["dynamic_unfused"]
        assert 0 < fused["lora_ms_per_run"] < fused["kernel_ms_per_run"]
        assert {"MatMul", "Add", "Concat", "Split", "Shape"} <= set(fused["lora_by_op"])  # the fused A branch
        assert set(unfused["lora_by_op"]) == {"MatMul", "Add"}
        assert set(p["ort_profile"]["dynamic_dora"]["lora_by_op"]) == {"MatMul", "Add", "Mul"}  # DoRA's factor
        assert all(op["nodes"] > 0 and op["us_per_node"] > 0 for op in unfused["lora_by_op"].values())
    kv = report["kv_decode"]  # the KV-cache decode case on a genai-built model
    assert kv["past"] == 32 and kv["model"]["exporter"] == "onnxruntime-genai builder"
    assert set(kv["median_ms"]) == {"base", "builder_file", "merged", "dynamic", "slots_with_adapter"}
    assert all(v > 0 for v in kv["median_ms"].values()) and all(v > 0 for v in kv["over_base"].values())
    assert all(kv["max_rel_diff_vs_merged"][k] <= 1e-4 for k in ("dynamic", "slots_with_adapter"))
    assert kv["max_rel_diff_vs_merged"]["base"] > 1e-2  # the adapter changes the logits
    assert kv["max_rel_diff_vs_merged"]["base"] == kv["max_rel_diff_vs_merged"]["builder_file"]  # one graph
    assert set(kv["targets_met"]) == {"merged_over_base", "dynamic_over_base", "slots_with_adapter_over_base"}
    dora = report["kv_decode_dora"]  # DoRA beside plain LoRA on the same genai graph (packed q/k/v)
    assert set(dora["median_ms"]) == {"base", "dynamic", "slots_with_adapter", "merged", "dynamic_dora",
                                      "dora_slots_with_adapter"}
    assert all(dora["max_rel_diff_vs_merged"][k] <= 1e-4 for k in ("dynamic_dora", "dora_slots_with_adapter"))
    assert dora["max_rel_diff_vs_merged"]["dynamic"] > 1e-3  # plain LoRA is not DoRA: the magnitudes matter
    assert dora["dora_over_lora_dynamic"] > 0 and set(dora["targets_met"]) == {"dora_over_lora_dynamic"}
