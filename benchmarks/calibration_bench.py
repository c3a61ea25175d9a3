"""Predicted vs measured ONNX Runtime latency on this machine, with a spec from ``lorapass calibrate``.

Prints JSON (per point: measured and predicted ms, error %, whether it is held to the 25 % goal).
Usage: python benchmarks/calibration_bench.py

A Llama of 20 M parameters (80 MB fp32, more than the last-level cache) is exported and run by ONNX Runtime;
its graph is analysed with the calibrated spec. Two regimes are held to the 25 % goal: a decode-sized step
(batch 1, one token: memory-bound, weights streamed by matrix-vector products) and a prefill (batch 1,
128 tokens: compute-bound). The ridge between them (8 tokens) is reported, not held: a roofline takes the
larger of compute and memory time, and small-M GEMMs reach neither peak.

The machine is shared: calibration and measurement alternate twice and the fastest run of each counts (other
processes only ever add time); ONNX Runtime runs one intra-op thread in both, so that another process on the
second core disturbs neither.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import tempfile
import torch
import transformers as tf

from lorapass.cli import main as lorapass_main
from lorapass.cost.analysis import ModelSource, Workload, analyse
from lorapass.cost.calibrate import best_time
from lorapass.cost.hw import HardwareSpec, load_spec
from lorapass.cost.parallel import Layout

THREADS = 1
GOAL = 0.25
HELD = {(1, 1): "decode-sized step (memory-bound)", (1, 128): "prefill 128 tokens (compute-bound)"}
REPORTED = {(1, 8): "8 tokens (ridge)", (4, 64): "batch 4 x 64 tokens"}


class W(torch.nn.Module):
    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=ids, use_cache=False).logits


def medium(folder: Path) -> Path:
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376,
                                               num_hidden_layers=4, num_attention_heads=8,
                                               num_key_value_heads=4)).eval()
    path = folder / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(W(model).eval(), (torch.randint(0, 8192, (2, 16)),), str(path), dynamo=True,
                          dynamic_shapes=({0: "batch", 1: "seq"},), verbose=False)
    return path


def _best(a: HardwareSpec | None, b: HardwareSpec) -> HardwareSpec:
    """The faster of two calibrations of the same machine, field by field."""
    if a is None:
        return b
    return b.model_copy(update={
        "peak_tflops": b.peak_tflops.model_copy(update={"fp32": max(a.peak_tflops.fp32, b.peak_tflops.fp32)}),
        "memory_bandwidth_tb_s": max(a.memory_bandwidth_tb_s, b.memory_bandwidth_tb_s),
        "kernel_overhead_us": min(a.kernel_overhead_us, b.kernel_overhead_us)})


def run(medium: Path, tmp_path: Path) -> dict:
    import contextlib
    import io

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(medium), opts, providers=["CPUExecutionProvider"])
    points = {**HELD, **REPORTED}
    feeds = {p: {"ids": np.random.default_rng(0).integers(0, 8192, p).astype(np.int64)} for p in points}
    measured: dict[tuple[int, int], float] = {}
    spec = None
    for round_ in range(2):
        out = tmp_path / f"local{round_}.yaml"
        with contextlib.redirect_stdout(io.StringIO()):
            if lorapass_main(["calibrate", "-o", str(out), "--threads", str(THREADS), "--quick"]) != 0:
                raise SystemExit("calibrate failed")
        spec = _best(spec, load_spec(out))
        for p, feed in feeds.items():
            t = best_time(session, feed, repeat=8, min_time=0.3)
            measured[p] = min(measured.get(p, float("inf")), t)

    source = ModelSource(medium)
    rows = {}
    for (batch, seq), label in points.items():
        predicted = analyse(source, spec, Layout(), Workload(batch, seq, 0), keep_ops=False).phases["prefill"].time
        rows[f"{batch}x{seq}"] = {"what": label, "measured_ms": measured[(batch, seq)] * 1e3,
                                  "predicted_ms": predicted * 1e3,
                                  "error_pct": 100 * (predicted - measured[(batch, seq)]) / measured[(batch, seq)]}
    report = {"spec": {"fp32_gflops": spec.peak("fp32") / 1e9, "memory_gb_s": spec.bandwidth / 1e9,
                       "kernel_overhead_us": spec.kernel_overhead_us, "threads": THREADS}, "points": rows}
    for key, r in rows.items():
        r["held_to_goal"] = tuple(int(v) for v in key.split("x")) in HELD
        r["within_goal"] = abs(r["error_pct"]) <= 100 * GOAL
    return report | {"goal_pct": 100 * GOAL}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(json.dumps(run(medium(tmp), tmp), indent=2))


if __name__ == "__main__":
    main()
