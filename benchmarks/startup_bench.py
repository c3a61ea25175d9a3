"""Command-line latency on the quick-start model: ``lorapass --help``, ``inspect`` and a merge, whole processes.

Builds the quick-start workspace (``python -m lorapass.demo DIR``, not timed) unless ``--model`` and ``--adapter``
name another model and adapter, then runs every command ``--repeat`` times round-robin, so machine noise falls on all of them. Also times the
imports that set the floor (a bare interpreter, ``import onnx_ir``, ``import torch``) and records the load
average. Targets: --help <= 0.3 s; inspect and merge <= 1.0 s wall each. Prints JSON.
Usage: python benchmarks/startup_bench.py [--model ONNX --adapter DIR] [--repeat N]
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

TARGETS = {"help": 0.3, "inspect": 1.0, "merge": 1.0}


def commands(model: str, adapter: str, out: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "lorapass.cli"]
    return {
        "help": [*cli, "--help"],
        "inspect": [*cli, "inspect", model, "--adapter", adapter],
        "merge": [*cli, "rewrite", model, "--adapter", adapter, "--strategy", "merge", "-o", str(out / "merged.onnx")],
        "python_bare": [sys.executable, "-c", "pass"],
        "import_onnx_ir": [sys.executable, "-c", "import onnx_ir"],
        "import_torch": [sys.executable, "-c", "import torch"],
    }


def timed(argv: list[str]) -> float:
    t = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode:
        sys.exit(f"{argv[2:5]} failed:\n{out.stderr[-3000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="an ONNX model (default: the quick start's model.onnx, built)")
    parser.add_argument("--adapter", help="a PEFT adapter for it (default: the quick start's adapter_a)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, adapter = args.model, args.adapter
        if model is None or adapter is None:
            subprocess.run([sys.executable, "-m", "lorapass.demo", str(tmp / "qs")], check=True, capture_output=True)
            model, adapter = str(tmp / "qs" / "model.onnx"), str(tmp / "qs" / "adapter_a")
        out = tmp / "out"
        runs: dict[str, list[float]] = {name: [] for name in commands(model, adapter, out)}
        load_start = os.getloadavg()
        for i in range(args.repeat):
            order = list(commands(model, adapter, out).items())
            for name, argv in order if i % 2 == 0 else order[::-1]:
                runs[name].append(timed(argv))
                shutil.rmtree(out, ignore_errors=True)
        load_end = os.getloadavg()
    medians = {name: statistics.median(values) for name, values in runs.items()}
    print(json.dumps({
        "model": "quick start (python -m lorapass.demo)" if args.model is None or args.adapter is None else args.model,
        "repeat": args.repeat,
        "median_s": {k: round(v, 3) for k, v in medians.items()},
        "runs_s": {k: [round(x, 3) for x in v] for k, v in runs.items()},
        "targets_s": TARGETS,
        "targets_met": {k: medians[k] <= limit for k, limit in TARGETS.items()},
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in load_end]},
    }, indent=2))


if __name__ == "__main__":
    main()
