"""Merge speed: lorapass against a plain copy of the same bytes, and against what users do today.

Part 1 (``merge``): a rank-16 all-linear adapter merged into a 1B-parameter-shaped fp16 Llama with external
data (2.47 GB). Each round times a plain copy of the model's files, then a merge in a child process (its wall
time, CPU time and peak RSS; imports excluded), alternately, so page-cache and machine noise fall on both; each
starts ``--settle`` seconds (default 0) after the other's output is removed. Targets: median merge <= 1.5x
median copy; peak RSS <= 3x the largest tensor + 300 MB.

Part 2 (``vs_peft``): the ~100M Llama of runtime_bench (fp32) with a rank-16 all-linear PEFT adapter. Today's
route, in a fresh process each round: load the model and the adapter (transformers + PEFT), merge_and_unload,
torch.onnx.export (dynamo, as the base was exported). lorapass's route: ``lorapass rewrite base.onnx --adapter
... --strategy merge`` on the base exported once. Both are whole processes (imports included), alternately.

Prints JSON (medians, every run, ratios, the load average). Usage: python benchmarks/merge_bench.py
[--layers N --hidden H --intermediate I --vocab V] [--repeat N] [--settle S]
[--peft-shape full|quick|none] [--peft-repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from llama_graph import LLAMA_1B, build, linears, write_adapter  # noqa: E402

TESTS = Path(__file__).resolve().parents[1] / "tests"
PEFT_SHAPES = {  # runtime_bench's FULL (99.5M parameters) and QUICK shapes
    "full": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                 num_key_value_heads=4),
    "quick": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
}

MERGE_CHILD = """
import json, os, sys, time
from lorapass.onnx.rewrite import rewrite
for path in sys.argv[5:]:  # the previous output, removed just before timing (as the parent does before a copy)
    os.unlink(path)
time.sleep(float(sys.argv[4]))
t, cpu = time.perf_counter(), os.times()
result = rewrite(sys.argv[1], sys.argv[2], adapter=sys.argv[3], strategy="merge", progress=False)
wall, cpu2 = time.perf_counter() - t, os.times()
# VmHWM is this process's own high-water mark (ru_maxrss would carry the parent's over fork+exec).
peak = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM'))
print(json.dumps({"wall_s": wall, "user_s": cpu2.user - cpu.user, "sys_s": cpu2.system - cpu.system,
                  "targets": len(result.targets), "bytes_written": result.stats.bytes_written, "peak_rss_bytes": peak}))
"""

PEFT_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch, transformers
from peft import PeftModel
sys.path.insert(0, sys.argv[4])
from builders import export
t1 = time.perf_counter()
torch.set_num_threads(2)
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
merged = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
t2 = time.perf_counter()
export(merged, __import__("pathlib").Path(sys.argv[3]))
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_and_merge_s": t2 - t1, "export_s": t3 - t2}))
"""


def copy_files(model: Path, out: Path, previous: Path, settle: float) -> float:
    remove(previous)
    time.sleep(settle)
    t = time.perf_counter()
    shutil.copyfile(model, out)
    shutil.copyfile(model.with_name(model.name + ".data"), out.with_name(out.name + ".data"))
    return time.perf_counter() - t


def remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)


def child(args: list[str]) -> tuple[float, str]:
    """Run a Python child; its whole wall time and its last stdout line."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode:
        sys.exit(f"{args[:2]} failed:\n{out.stderr[-3000:]}")
    return wall, out.stdout.strip().splitlines()[-1]


def bench_merge(tmp: Path, shape: dict, repeat: int, settle: float) -> dict:
    model = tmp / "llama1b.onnx"
    t = time.perf_counter()
    sizes = build(model, **shape)
    build_s = time.perf_counter() - t
    write_adapter(tmp / "adapter", linears(**shape), r=16, alpha=32)
    os.sync()  # the build's 2.5 GB of dirty pages would otherwise be written back during the first rounds
    copies, merges = [], []
    # Alternate, so both see the same page cache and machine load, and start each timing `settle` seconds after
    # removing the other's output: a VM with free page reporting (virtio-balloon) hands freed memory back to its
    # host within seconds, and writing into memory the host must back again costs ~10x the kernel time.
    for i in range(repeat):
        copies.append(copy_files(model, tmp / "copy.onnx", tmp / "merged.onnx", settle))
        outputs = [str(p) for p in (tmp / "copy.onnx", tmp / "copy.onnx.data")]
        _, line = child(["-c", MERGE_CHILD, str(model), str(tmp / "merged.onnx"), str(tmp / "adapter"), str(settle),
                         *outputs])
        merges.append(json.loads(line))
    remove(tmp / "merged.onnx")
    merge_s = statistics.median(m["wall_s"] for m in merges)
    copy_s = statistics.median(copies)
    rss = max(m["peak_rss_bytes"] for m in merges)
    rss_budget = 3 * sizes["largest_tensor_bytes"] + 300 * 2**20
    return {
        "settle_s": settle,
        "model": {"params": sizes["params"], "data_bytes": sizes["bytes"],
                  "largest_tensor_bytes": sizes["largest_tensor_bytes"], **shape, "dtype": "float16",
                  "build_s": round(build_s, 2)},
        "adapter": {"r": 16, "alpha": 32, "targets": merges[0]["targets"]},
        "merge_wall_s_median": round(merge_s, 3), "merge_wall_s": [round(m["wall_s"], 3) for m in merges],
        "merge_cpu_s": [{"user": round(m["user_s"], 2), "sys": round(m["sys_s"], 2)} for m in merges],
        "copy_wall_s_median": round(copy_s, 3), "copy_wall_s": [round(c, 3) for c in copies],
        "merge_over_copy": round(merge_s / copy_s, 3), "merge_over_copy_target": 1.5,
        "merge_over_copy_per_round": [round(m["wall_s"] / c, 3) for m, c in zip(merges, copies)],
        "bytes_written": merges[0]["bytes_written"],
        "peak_rss_bytes": rss, "peak_rss_budget_bytes": rss_budget, "peak_rss_over_budget": round(rss / rss_budget, 3),
    }


def bench_vs_peft(tmp: Path, shape: dict, repeat: int) -> dict:
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    sys.path.insert(0, str(TESTS))
    from builders import export

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(max_position_embeddings=1024, **shape)).eval()
    model.save_pretrained(str(tmp / "base"))
    get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
                   ).save_pretrained(str(tmp / "adapter"))
    t = time.perf_counter()
    base = export(tf.AutoModelForCausalLM.from_pretrained(str(tmp / "base")).eval(), tmp / "base.onnx")
    base_export_s = time.perf_counter() - t
    params = sum(p.numel() for p in model.parameters())
    peft_runs, lorapass_runs = [], []
    for i in range(repeat):
        wall, line = child(["-c", PEFT_CHILD, str(tmp / "base"), str(tmp / "adapter"), str(tmp / "peft.onnx"),
                            str(TESTS)])
        peft_runs.append({"wall_s": wall, **json.loads(line)})
        remove(tmp / "peft.onnx")
        wall, _ = child(["-m", "lorapass.cli", "rewrite", str(base), "--adapter", str(tmp / "adapter"),
                         "--strategy", "merge", "-o", str(tmp / "lorapass.onnx"), "--json"])
        lorapass_runs.append(wall)
        remove(tmp / "lorapass.onnx")
    peft_s = statistics.median(r["wall_s"] for r in peft_runs)
    lorapass_s = statistics.median(lorapass_runs)
    return {
        "model": {"params": params, **shape, "dtype": "float32", "base_export_s": round(base_export_s, 2)},
        "adapter": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "peft_route": "transformers from_pretrained + PeftModel.from_pretrained + merge_and_unload + "
                      "torch.onnx.export(dynamo)",
        "lorapass_route": "lorapass rewrite base.onnx --adapter DIR --strategy merge",
        "peft_wall_s_median": round(peft_s, 3), "peft_wall_s": [round(r["wall_s"], 3) for r in peft_runs],
        "peft_phases_s": [{k: round(v, 3) for k, v in r.items() if k != "wall_s"} for r in peft_runs],
        "lorapass_wall_s_median": round(lorapass_s, 3), "lorapass_wall_s": [round(w, 3) for w in lorapass_runs],
        "lorapass_speedup": round(peft_s / lorapass_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    for key in ("layers", "hidden", "intermediate", "vocab"):
        parser.add_argument(f"--{key}", type=int, default=LLAMA_1B[key])
    parser.add_argument("--repeat", type=int, default=3, help="rounds of copy + merge (0: skip that part)")
    parser.add_argument("--settle", type=float, default=0.0,
                        help="seconds between removing the last output and timing the next copy or merge")
    parser.add_argument("--peft-shape", choices=[*PEFT_SHAPES, "none"], default="full")
    parser.add_argument("--peft-repeat", type=int, default=3, help="rounds of the PEFT route + the lorapass route")
    args = parser.parse_args()
    shape = {**LLAMA_1B, "layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
             "vocab": args.vocab}
    report = {"load_average_start": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    if args.repeat:
        with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as tmp:
            report["merge"] = bench_merge(Path(tmp), shape, args.repeat, args.settle)
    if args.peft_shape != "none":
        with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as tmp:
            report["vs_peft"] = bench_vs_peft(Path(tmp), PEFT_SHAPES[args.peft_shape], args.peft_repeat)
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
