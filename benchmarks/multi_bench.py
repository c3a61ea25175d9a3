"""ONNX Runtime latency of a mixed-adapter batch: one multi run vs the single-adapter dynamic graph vs per-adapter runs.

A Llama-shaped model (~100M parameters, fp32, random weights; the shape of runtime_bench.py) exported with torch's
dynamo exporter, and four rank-16 all-linear adapters in PEFT's format. A batch of 8 rows, two per adapter,
in two phases: decode-like (one token per row; the export has no KV cache, so no past context) and prefill
(128 tokens per row). Variants:

- ``multi``: the graph of ``--strategy multi`` with the four adapters, one run, ``lora_ids`` = [1, 2, 3, 4] * 2;
- ``dynamic_same_adapter`` (a): the same batch through the single-adapter dynamic graph (every row adapter 1),
  the lower bound of any mixed batch;
- ``dynamic_per_adapter`` (b): four runs of the dynamic graph, each on its adapter's two rows with that
  adapter's ONNX Runtime adapter file active: what ONNX Runtime users do today (time = the four runs);
- ``base``: the model without LoRA, for scale.

Method as in runtime_bench.py: round-robin with alternating direction, blocks of fresh sessions created in a
rotated order, medians over all runs (wall clock; ``cpu_median_ms`` is the process CPU time of the same runs,
less sensitive to other load on the machine), per-block ratio ranges, and ORT's kernel time of the LoRA nodes
at decode (``ort_profile``). ``max_rel_error_multi_vs_per_adapter`` checks that every row of the mixed run is
its own adapter's output. JSON to stdout.
Usage: python benchmarks/multi_bench.py [--quick] [--repeat N] [--prefill-repeat N] [--blocks B] [--no-profile]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from llama_graph import linears, write_adapter  # noqa: E402
from runtime_bench import FULL, QUICK, export, lora_profile, ort_session  # noqa: E402

ADAPTERS, ROWS_EACH, RANK, ALPHA = 4, 2, 16, 32
TARGETS = {"multi_over_dynamic_same_adapter_decode": 1.25, "multi_over_dynamic_per_adapter": 1.0}
VARIANTS = ("multi", "dynamic_same_adapter", "dynamic_per_adapter", "base")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny model, few repeats: a smoke run")
    parser.add_argument("--repeat", type=int, default=None, help="decode rounds per block (default 20)")
    parser.add_argument("--prefill-repeat", type=int, default=None, help="prefill rounds per block (default 2)")
    parser.add_argument("--blocks", type=int, default=None, help="blocks of fresh sessions, creation order rotated")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the ORT profiling of the LoRA nodes at decode (run after the timings)")
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    blocks = args.blocks or (2 if args.quick else 4)
    prefill = 16 if args.quick else 128
    import transformers as tf

    from lorapass.onnx.rewrite import rewrite
    from lorapass.ort_adapter import export_adapter

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(max_position_embeddings=1024, **shape)).eval()
    params = sum(p.numel() for p in model.parameters())
    batch = ADAPTERS * ROWS_EACH
    lora_ids = np.array([k % ADAPTERS + 1 for k in range(batch)], np.int64)  # [1, 2, 3, 4, 1, 2, 3, 4]
    phases = {"decode": (1, args.repeat or (3 if args.quick else 20)),
              "prefill": (prefill, args.prefill_repeat or (1 if args.quick else 2))}
    gen = torch.Generator().manual_seed(1)
    ids = {phase: torch.randint(0, shape["vocab_size"], (batch, seq), generator=gen).numpy()
           for phase, (seq, _) in phases.items()}
    times = {phase: {name: [] for name in VARIANTS} for phase in phases}
    cpu = {phase: {name: [] for name in VARIANTS} for phase in phases}
    ratios = {phase: {"multi_over_dynamic_same_adapter": [], "multi_over_dynamic_per_adapter": []} for phase in phases}
    errors: dict[str, float] = {}
    profile: dict[str, dict] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = export(model, tmp / "base.onnx")
        modules = linears(shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"],
                          shape["num_attention_heads"], shape["num_key_value_heads"])
        dirs = [tmp / f"adapter{k}" for k in range(1, ADAPTERS + 1)]
        for seed, directory in enumerate(dirs):
            write_adapter(directory, modules, RANK, ALPHA, seed=seed)
        paths = {"base": base, "multi": tmp / "multi.onnx", "dynamic": tmp / "dynamic.onnx"}
        rewrite(base, paths["multi"], adapter=dirs, strategy="multi", progress=False)
        rewrite(base, paths["dynamic"], adapter=dirs[0], strategy="dynamic", progress=False)
        files = [export_adapter(d, paths["dynamic"], tmp / f"{d.name}.onnx_adapter") for d in dirs]

        for block in range(blocks):
            import onnxruntime as ort

            k = block % 3
            order = [*("multi", "dynamic", "base")[k:], *("multi", "dynamic", "base")[:k]]
            sessions = {name: ort_session(paths[name]) for name in order}  # created in rotated order
            options = []
            for path in files:
                adapter = ort.LoraAdapter()
                adapter.Load(str(path))
                run_options = ort.RunOptions()
                run_options.add_active_adapter(adapter)
                options.append((adapter, run_options))
            for phase, (_, rounds) in phases.items():
                x = ids[phase]
                rows = [np.flatnonzero(lora_ids == k + 1) for k in range(ADAPTERS)]

                def per_adapter(x=x, rows=rows) -> list[np.ndarray]:
                    return [sessions["dynamic"].run(None, {"input_ids": x[r]}, options[k][1])[0]
                            for k, r in enumerate(rows)]

                runners = {
                    "multi": lambda x=x: sessions["multi"].run(None, {"input_ids": x, "lora_ids": lora_ids}),
                    "dynamic_same_adapter": lambda x=x: sessions["dynamic"].run(None, {"input_ids": x}),
                    "dynamic_per_adapter": per_adapter,
                    "base": lambda x=x: sessions["base"].run(None, {"input_ids": x}),
                }
                for run in runners.values():  # warm-up
                    run()
                local = {name: [] for name in VARIANTS}
                for i in range(rounds):
                    for name in (VARIANTS if i % 2 == 0 else VARIANTS[::-1]):
                        t, c = time.perf_counter(), time.process_time()
                        runners[name]()
                        local[name].append(time.perf_counter() - t)
                        cpu[phase][name].append(time.process_time() - c)
                med = {name: statistics.median(v) for name, v in local.items()}
                for name, values in local.items():
                    times[phase][name] += values
                for ratio, (a, b) in (("multi_over_dynamic_same_adapter", ("multi", "dynamic_same_adapter")),
                                      ("multi_over_dynamic_per_adapter", ("multi", "dynamic_per_adapter"))):
                    ratios[phase][ratio].append(med[a] / med[b])
                if block == 0:
                    mixed = runners["multi"]()[0]
                    expected = np.empty_like(mixed)
                    for r, out in zip(rows, per_adapter()):
                        expected[r] = out
                    errors[phase] = float(np.abs(mixed - expected).max() / np.abs(expected).max())
            del sessions, runners, options
            gc.collect()
        if args.profile:
            feeds = {"input_ids": ids["decode"]}
            for name, extra in (("multi", {"lora_ids": lora_ids}), ("dynamic", {})):
                profile[name] = lora_profile(paths[name], feeds | extra, 3 * phases["decode"][1],
                                             str(tmp / f"profile_{name}"))

    report = {"model": {"params": params, **shape, "dtype": "float32"},
              "adapters": {"count": ADAPTERS, "r": RANK, "alpha": ALPHA, "target_modules": "all-linear"},
              "batch": {"rows": batch, "lora_ids": lora_ids.tolist()},
              "ort": {"intra_op_num_threads": 2, "provider": "CPUExecutionProvider", "allow_spinning": 0},
              "decode_note": "one token per row, no KV cache in the export: a decode-sized step without past context",
              "method": "round-robin, alternating direction; blocks of fresh ORT sessions, creation order rotated",
              "blocks": blocks, "targets": TARGETS, "phases": {}}
    for phase, values in times.items():
        med = {name: statistics.median(v) * 1e3 for name, v in values.items()}
        cpu_med = {name: statistics.median(v) * 1e3 for name, v in cpu[phase].items()}
        over_a = med["multi"] / med["dynamic_same_adapter"]
        over_b = med["multi"] / med["dynamic_per_adapter"]
        met = {"multi_over_dynamic_per_adapter": over_b < TARGETS["multi_over_dynamic_per_adapter"]}
        if phase == "decode":
            met["multi_over_dynamic_same_adapter"] = over_a <= TARGETS["multi_over_dynamic_same_adapter_decode"]
        report["phases"][phase] = {
            "shape": [batch, phases[phase][0]], "runs": len(values["multi"]),
            "median_ms": {k: round(v, 3) for k, v in med.items()},
            "multi_over_dynamic_same_adapter": round(over_a, 3),
            "multi_over_dynamic_per_adapter": round(over_b, 3),
            "dynamic_same_adapter_over_base": round(med["dynamic_same_adapter"] / med["base"], 3),
            "ratio_range_over_blocks": {k: [round(min(v), 3), round(max(v), 3)] for k, v in ratios[phase].items()},
            "cpu_median_ms": {k: round(v, 3) for k, v in cpu_med.items()},
            "cpu_multi_over_dynamic_same_adapter": round(cpu_med["multi"] / cpu_med["dynamic_same_adapter"], 3),
            "cpu_multi_over_dynamic_per_adapter": round(cpu_med["multi"] / cpu_med["dynamic_per_adapter"], 3),
            "targets_met": met,
            "max_rel_error_multi_vs_per_adapter": float(f"{errors[phase]:.2e}"),
        }
        if phase == "decode" and profile:
            report["phases"][phase]["ort_profile"] = profile
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
