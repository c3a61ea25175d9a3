"""A Stable Diffusion 1.x-sized UNet in fp16: merge a rank-16 kohya LoCon file, and a dynamic graph's step latency.

The UNet is diffusers' UNet2DConditionModel with SD1.5's configuration (~860M parameters) and random weights (no hub),
exported by TorchScript in fp16 (traced at an 8x8 latent with the latent size left dynamic) and stored with external
data. The kohya file has rank 16 on every target the
diffusion tests cover (attention q/k/v/out, ff, proj_in/out, resnet conv1/conv2/conv_shortcut, down/up-sampler convs,
time_emb_proj). Prints JSON: merge wall time against a plain copy of the same bytes (target <= 1.5x, medians of
alternating runs, merge in a child process) with its floors (set-up, and one thread folding without writing), and
ONNX Runtime CPU step latency at a 64x64 latent of the dynamic graph
(the same file as slot defaults) against the base (target <= 1.15x, medians).

Usage: python benchmarks/diffusion_bench.py [--repeat 3] [--steps 3] [--small]   (--small: a tiny UNet, smoke run)
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

import numpy as np

SD15 = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)

CHILD = """
import json, sys, time
from lorapass.onnx.rewrite import rewrite
t = time.perf_counter()
result = rewrite(sys.argv[1], sys.argv[2], adapter=sys.argv[3], strategy=sys.argv[4], progress=False)
print(json.dumps({"wall_s": time.perf_counter() - t, "targets": len({t.site.path for t in result.targets}),
                  "bytes_written": result.stats.bytes_written}))
"""

# The merge's two floors on this machine, in a fresh process: its set-up (adapter read, model load, binding, plan:
# everything before the first weight is written) and one thread reading and folding every merged weight with no
# writes (what the writer's fold thread does; the I/O thread writes meanwhile).
FLOOR = """
import json, sys, time
import numpy as np
import lorapass.onnx.rewrite as rw
from lorapass.onnx.fold import FoldedTensor, blocks, fold_into
from lorapass.onnx.save import SaveStats
times = {}
def fold_only(model, *args, **kwargs):
    times["setup_s"] = time.perf_counter() - t
    start = time.perf_counter()
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, FoldedTensor):
            w, left, right = value.const_value.operands()
            out = np.empty((min(w.shape[0], 1 << 12), w.shape[1]), w.dtype)
            for rows in blocks(*w.shape):
                n = rows.stop - rows.start
                out = out if out.shape[0] >= n else np.empty((n, w.shape[1]), w.dtype)
                fold_into(out[:n], np.array(w[rows]), left[rows], right)
    times["fold_thread_s"] = time.perf_counter() - start
    return SaveStats()
rw.save_model = fold_only
t = time.perf_counter()
rw.rewrite(sys.argv[1], sys.argv[2], adapter=sys.argv[3], strategy="merge", progress=False)
print(json.dumps(times))
"""


def kohya_file(unet, path: Path, r: int) -> int:
    """A rank-``r`` kohya LoCon file (random, small) on every demo target of ``unet``; returns its module count."""
    import torch
    from safetensors.numpy import save_file

    from lorapass.demo import UNET_TARGETS

    rng = np.random.default_rng(0)
    tensors = {}
    for name, module in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in UNET_TARGETS):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(module, torch.nn.Conv2d):
            down, up = (r, module.in_channels, *module.kernel_size), (module.out_channels, r, 1, 1)
        else:
            down, up = (r, module.in_features), (module.out_features, r)
        tensors[f"{key}.lora_down.weight"] = (rng.standard_normal(down, np.float32) * 0.01).astype(np.float16)
        tensors[f"{key}.lora_up.weight"] = (rng.standard_normal(up, np.float32) * 0.01).astype(np.float16)
        tensors[f"{key}.alpha"] = np.array(float(r), np.float16)
    save_file(tensors, str(path))
    return len(tensors) // 3


def copy_files(model: Path, out: Path) -> float:
    t = time.perf_counter()
    shutil.copyfile(model, out)
    shutil.copyfile(model.with_name(model.name + ".data"), out.with_name(out.name + ".data"))
    return time.perf_counter() - t


def child(model: Path, out: Path, adapter: Path, strategy: str, script: str = CHILD) -> dict:
    done = subprocess.run([sys.executable, "-c", script, str(model), str(out), str(adapter), strategy],
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"rewrite failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_latency(models: dict[str, Path], feeds: dict[str, np.ndarray], steps: int) -> dict[str, list[float]]:
    """Per model, the wall time of ``steps`` denoising steps, runs alternating between the models."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for k, p in models.items()}
    half = {k: {i.name for i in s.get_inputs() if i.type == "tensor(float16)"} for k, s in sessions.items()}
    fed = {k: {n: v.astype(np.float16) if n in half[k] else v for n, v in feeds.items()} for k in sessions}
    for k, s in sessions.items():
        s.run(None, fed[k])  # warm up
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(steps):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, fed[k])
            times[k].append(time.perf_counter() - t)
    return times


def main() -> None:
    import onnx

    from lorapass import demo

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--small", action="store_true", help="the tests' tiny SD1.x UNet (a smoke run)")
    args = parser.parse_args()
    config = demo.SD_UNET if args.small else SD15
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        unet = demo.sd_unet(config).half()
        params = sum(p.numel() for p in unet.parameters())
        feeds = demo.unet_feeds(unet, batch=1)  # at the config's latent size (64x64 for SD1.5)
        small = {k: v[:, :, :8, :8] if k == "sample" else v for k, v in feeds.items()}  # traced small: fp16 CPU is slow
        demo.export_unet(unet, small, tmp / "raw.onnx", dynamic_axes={"sample": {2: "height", 3: "width"}})
        proto = onnx.load(str(tmp / "raw.onnx"))
        onnx.save(proto, str(tmp / "unet.onnx"), save_as_external_data=True, location="unet.onnx.data")
        del proto
        (tmp / "raw.onnx").unlink()
        modules = kohya_file(unet, tmp / "lora.safetensors", args.rank)
        del unet
        build_s = time.perf_counter() - t
        model = tmp / "unet.onnx"
        copies, merges, floors = [], [], []
        for i in range(args.repeat):  # alternate so both see the same page-cache state
            copies.append(copy_files(model, tmp / "copy.onnx"))
            for f in (tmp / "copy.onnx", tmp / "copy.onnx.data"):
                f.unlink()
            merges.append(child(model, tmp / "merged.onnx", tmp / "lora.safetensors", "merge"))
            for f in (tmp / "merged.onnx", tmp / "merged.onnx.data"):
                f.unlink()
            floors.append(child(model, tmp / "unused.onnx", tmp / "lora.safetensors", "merge", FLOOR))
        dynamic = child(model, tmp / "dynamic.onnx", tmp / "lora.safetensors", "dynamic")
        times = step_latency({"base": model, "dynamic": tmp / "dynamic.onnx"}, feeds, args.steps)
    merge_s, copy_s = statistics.median(m["wall_s"] for m in merges), statistics.median(copies)
    setup_s, fold_s = (statistics.median(f[k] for f in floors) for k in ("setup_s", "fold_thread_s"))
    base_s, dyn_s = statistics.median(times["base"]), statistics.median(times["dynamic"])
    print(json.dumps({
        "model": {"config": "tests' tiny SD1.x" if args.small else "SD1.5 UNet2DConditionModel", "params": params,
                  "dtype": "float16", "latent": f"{feeds['sample'].shape[2]}x{feeds['sample'].shape[3]}", "batch": 1,
                  "build_s": round(build_s, 1)},
        "adapter": {"format": "kohya LoCon", "r": args.rank, "modules": modules, "targets": merges[0]["targets"]},
        "merge_wall_s_median": round(merge_s, 3), "merge_wall_s": [round(m["wall_s"], 3) for m in merges],
        "copy_wall_s_median": round(copy_s, 3), "copy_wall_s": [round(c, 3) for c in copies],
        "merge_over_copy": round(merge_s / copy_s, 3), "merge_over_copy_target": 1.5,
        "merge_floors": {"setup_s_median": round(setup_s, 3), "fold_thread_s_median": round(fold_s, 3),
                         "setup_plus_fold_thread_over_copy": round((setup_s + fold_s) / copy_s, 3),
                         "note": "set-up before the first write, then one thread reading and folding every merged "
                                 "weight without writing: the merge cannot finish sooner on one fold thread"},
        "step_s_base_median": round(base_s, 3), "step_s_dynamic_median": round(dyn_s, 3),
        "step_s": {k: [round(v, 3) for v in vs] for k, vs in times.items()},
        "dynamic_over_base_step": round(dyn_s / base_s, 3), "dynamic_over_base_step_target": 1.15,
    }, indent=2))


if __name__ == "__main__":
    main()
