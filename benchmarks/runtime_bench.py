"""ONNX Runtime latency: base vs merged vs dynamic LoRA (with and without shared-input fusion) vs PEFT eager.

A Llama-shaped model (~100M parameters, fp32, random weights) exported with torch's dynamo exporter and a
rank-16 all-linear PEFT adapter. Two phases: decode-like (batch 1, one token: the export has no KV cache,
so this is one token with no past context) and prefill (batch 1, 512 tokens). Variants run round-robin
after a warm-up, so machine noise falls on all of them alike; JSON with medians and ratios goes to stdout.
Usage: python benchmarks/runtime_bench.py [--quick] [--repeat N]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Variants share 2 cores in turn: a thread pool that spins after its run would steal the next variant's
# cores (ORT's and OpenMP's both do by default), so spinning is off for every runner.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from builders import Wrapper, export  # noqa: E402

FULL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
            num_key_value_heads=4)
QUICK = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
TARGETS = {"merged_over_base": "1 ± 0.03", "dynamic_over_base_decode": 1.10, "dynamic_over_base_prefill": 1.05,
           "peft_eager_over_ort_dynamic": 2.0}


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny model, few repeats: a smoke run")
    parser.add_argument("--repeat", type=int, default=None)
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    repeat = args.repeat or (5 if args.quick else 30)
    prefill = 32 if args.quick else 512
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from lorapass.onnx.rewrite import rewrite
    from lorapass.rules import LoraRule

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(max_position_embeddings=1024, **shape)).eval()
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        base = export(model, tmp / "base.onnx")
        export_s = time.perf_counter() - t
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                                     init_lora_weights=False)).eval()
        peft_model.save_pretrained(str(tmp / "adapter"))
        rule = LoraRule.from_peft_config(tmp / "adapter")
        paths = {"base": base}
        for name, strategy, fuse in (("merged", "merge", True), ("dynamic", "dynamic", True),
                                     ("dynamic_unfused", "dynamic", False)):
            paths[name] = tmp / f"{name}.onnx"
            rewrite(base, paths[name], adapter=tmp / "adapter", strategy=strategy, progress=False,
                    rules=rule.model_copy(update={"fuse_shared_inputs": fuse, "strategy": strategy}))
        sessions = {name: ort_session(p) for name, p in paths.items()}
        wrapper = Wrapper(peft_model).eval()
        phases = {"decode": (1, 1), "prefill": (1, prefill)}
        results: dict[str, dict[str, list[float]]] = {}
        for phase, (batch, seq) in phases.items():
            ids = torch.randint(0, shape["vocab_size"], (batch, seq))
            feeds = {"input_ids": ids.numpy()}

            def run_peft() -> None:
                with torch.inference_mode():
                    wrapper(ids)

            runners = {name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()} | {"peft_eager": run_peft}
            times: dict[str, list[float]] = {name: [] for name in runners}
            for _ in range(3):  # warm-up
                for run in runners.values():
                    run()
            for _ in range(repeat):
                for name, run in runners.items():
                    t = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - t)
            results[phase] = times
            out = {name: sessions[name].run(None, feeds)[0] for name in sessions}
            with torch.inference_mode():
                expected = wrapper(ids).numpy()
            for name in ("merged", "dynamic", "dynamic_unfused"):
                err = float(np.abs(out[name] - expected).max() / np.abs(expected).max())
                results[phase].setdefault("_errors", {})[name] = err
    report = {"model": {"params": params, **shape, "dtype": "float32", "export_s": round(export_s, 1)},
              "adapter": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
              "ort": {"intra_op_num_threads": 2, "provider": "CPUExecutionProvider", "allow_spinning": 0},
              "torch": {"threads": 2, "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"]},
              "decode_note": "batch 1, one token, no KV cache in the export: a decode-sized step without past context",
              "repeat": repeat, "targets": TARGETS, "phases": {}}
    for phase, times in results.items():
        errors = times.pop("_errors")
        med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
        report["phases"][phase] = {
            "shape": list(phases[phase]),
            "median_ms": {k: round(v, 3) for k, v in med.items()},
            "merged_over_base": round(med["merged"] / med["base"], 3),
            "dynamic_over_base": round(med["dynamic"] / med["base"], 3),
            "dynamic_unfused_over_base": round(med["dynamic_unfused"] / med["base"], 3),
            "fused_over_unfused": round(med["dynamic"] / med["dynamic_unfused"], 3),
            "peft_eager_over_ort_dynamic": round(med["peft_eager"] / med["dynamic"], 3),
            "max_rel_error_vs_peft": {k: float(f"{v:.2e}") for k, v in errors.items()},
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
