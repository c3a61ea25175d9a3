"""Merge a rank-16 all-linear adapter into a 1B-parameter-shaped fp16 Llama with external data.

Prints JSON: merge wall time and peak RSS (the merge runs in a child process), bytes written, the
time of a plain copy of the same files in the same run, and the ratios against the targets
(merge ≤ 1.5× copy, peak RSS ≤ 3× the largest tensor + 300 MB). Usage: python benchmarks/merge_bench.py [--layers N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from llama_graph import LLAMA_1B, build, linears, write_adapter  # noqa: E402

CHILD = """
import json, sys, time
from lorapass.onnx.rewrite import rewrite
t = time.perf_counter()
result = rewrite(sys.argv[1], sys.argv[2], adapter=sys.argv[3], strategy="merge", progress=False)
wall = time.perf_counter() - t
print(json.dumps({"wall_s": wall, "targets": len(result.targets), "bytes_written": result.stats.bytes_written,
                  "peak_rss_bytes": peak}))
"""
# VmHWM is this process's own high-water mark (ru_maxrss would carry the parent's over fork+exec).
CHILD = CHILD.replace("wall = time", "peak = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM'))\nwall = time")


def copy_files(model: Path, out: Path) -> float:
    t = time.perf_counter()
    shutil.copyfile(model, out)
    shutil.copyfile(model.with_name(model.name + ".data"), out.with_name(out.name + ".data"))
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    for key in ("layers", "hidden", "intermediate", "vocab"):
        parser.add_argument(f"--{key}", type=int, default=LLAMA_1B[key])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as tmp:
        tmp = Path(tmp)
        model = tmp / "llama1b.onnx"
        t = time.perf_counter()
        shape = {**LLAMA_1B, "layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                 "vocab": args.vocab}
        sizes = build(model, **shape)
        build_s = time.perf_counter() - t
        write_adapter(tmp / "adapter", linears(**shape), r=16, alpha=32)
        copies, merges = [], []
        for i in range(args.repeat):  # alternate so both see the same page-cache state
            copies.append(copy_files(model, tmp / f"copy{i}.onnx"))
            (tmp / f"copy{i}.onnx").unlink()
            (tmp / f"copy{i}.onnx.data").unlink()
            out = subprocess.run([sys.executable, "-c", CHILD, str(model), str(tmp / f"merged{i}.onnx"), str(tmp / "adapter")],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"merge failed:\n{out.stderr}")
            merges.append(json.loads(out.stdout.strip().splitlines()[-1]))
            (tmp / f"merged{i}.onnx").unlink()
            (tmp / f"merged{i}.onnx.data").unlink()
    merge_s = statistics.median(m["wall_s"] for m in merges)
    copy_s = statistics.median(copies)
    rss = max(m["peak_rss_bytes"] for m in merges)
    rss_budget = 3 * sizes["largest_tensor_bytes"] + 300 * 2**20
    print(json.dumps({
        "model": {"params": sizes["params"], "data_bytes": sizes["bytes"], "largest_tensor_bytes": sizes["largest_tensor_bytes"],
                  **shape, "dtype": "float16", "build_s": round(build_s, 2)},
        "adapter": {"r": 16, "alpha": 32, "targets": merges[0]["targets"]},
        "merge_wall_s_median": round(merge_s, 3), "merge_wall_s": [round(m["wall_s"], 3) for m in merges],
        "copy_wall_s_median": round(copy_s, 3), "copy_wall_s": [round(c, 3) for c in copies],
        "merge_over_copy": round(merge_s / copy_s, 3), "merge_over_copy_target": 1.5,
        "bytes_written": merges[0]["bytes_written"],
        "peak_rss_bytes": rss, "peak_rss_budget_bytes": rss_budget, "peak_rss_over_budget": round(rss / rss_budget, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
