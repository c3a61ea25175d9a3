"""ONNX Runtime latency: base vs merged vs dynamic LoRA (with and without shared-input fusion, and DoRA) vs PEFT eager.

A Llama-shaped model (~100M parameters, fp32, random weights) exported with torch's dynamo exporter and a
rank-16 all-linear PEFT adapter, and a DoRA one (its dynamic graph against plain LoRA's, both unfused: the
per-output factor costs one Mul per site). Two phases: decode-like (batch 1, one token: the export has no KV cache,
so this is one token with no past context) and prefill (batch 1, 512 tokens). JSON with medians and
ratios goes to stdout.

Method (the machine is shared and noisy): variants run round-robin, alternating direction, after a warm-up,
so noise falls on all of them alike. The run is split into blocks, and every block creates fresh ORT
sessions in a rotated order: on this machine the session created first in a process runs decode ~4-6 %
slower than identical sessions created after it, so a fixed creation order biases every ratio against
whichever variant comes first. Medians pool all runs; ``ratio_range`` gives the spread of per-block ratios.
Afterwards ORT's profiler gives the kernel time of the LoRA nodes in the dynamic variants (``ort_profile``).

``kv_decode``: real decode steps with a KV cache, on a model built by onnxruntime-genai's builder (~100M
parameters, fp32, GroupQueryAttention): one token after a past of 512, base vs merged vs dynamic (all-linear
r=16, defaults baked in) vs LoRA-ready slots with the adapter file active (how adapters are hot-swapped); the
builder's own file (``builder_file``) is timed too; the ratios' reference is the same graph written by
lorapass's writer (see :func:`kv_decode_variants`). ``min_over_base`` (fastest step over fastest step) is given
beside the medians: on a shared machine it is the least disturbed estimate.
:func:`kv_decode_variants` builds the graphs, :func:`kv_decode_bench` times any dict of them (more variants,
such as int4 builds or DoRA adapters, go into that dict).

``kv_decode_dora``: the same decode step with a DoRA adapter (trained magnitudes) beside plain LoRA: baked-in
dynamic graphs and LoRA-ready slots (``--dora`` slots for DoRA) with the adapter file active.

``kv_decode_int4``: the same decode step on the builder's int4 build (MatMulNBits, its CPU default accuracy level
4): int4 base vs int4 + dynamic r=16 all-linear (and slots with the adapter active), timed in one round-robin with
the fp32 base and dynamic, so the LoRA overhead over an int4 base compares with the one over fp32.
Usage: python benchmarks/runtime_bench.py [--quick] [--repeat N] [--prefill-repeat N] [--blocks B] [--no-profile]
       [--no-kv | --kv-only] [--kv-repeat N] [--no-int4]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
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
           "peft_eager_over_ort_dynamic": 2.0, "dora_over_lora_dynamic_decode": 1.03}
ORT_VARIANTS = ("base", "merged", "dynamic", "dynamic_unfused", "dynamic_dora")
DYNAMIC = ("dynamic", "dynamic_unfused", "dynamic_dora")
KV_FULL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
               num_key_value_heads=4, max_position_embeddings=1024)
KV_QUICK = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
KV_TARGETS = {"merged_over_base": "1 ± 0.03", "dynamic_over_base": 1.10, "slots_with_adapter_over_base": 1.10}
INT4_TARGETS = {"int4_dynamic_over_int4_base": 1.15}


def ort_session(path: Path, profile_prefix: str | None = None, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def lora_profile(path: Path, feeds: dict, runs: int, prefix: str) -> dict:
    """ORT's kernel times per run: total, and for nodes the rewrite added (names holding 'lora') by op type."""
    session = ort_session(path, prefix)
    for _ in range(2):
        session.run(None, feeds)
    for _ in range(runs):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    starts = [e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    first = sorted(starts)[2]  # skip the warm-up runs
    total, lora, count = 0.0, Counter(), Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < first:
            continue
        total += e["dur"]
        if "lora" in e["name"]:
            lora[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    lora_us = sum(lora.values())
    return {"kernel_ms_per_run": round(total / runs / 1e3, 3), "lora_ms_per_run": round(lora_us / runs / 1e3, 3),
            "lora_share_of_base_kernels": round(lora_us / max(total - lora_us, 1e-9), 4),
            "lora_by_op": {op: {"nodes": count[op] // runs, "ms_per_run": round(us / runs / 1e3, 3),
                                "us_per_node": round(us / count[op], 1)} for op, us in lora.most_common()}}


def kv_decode_variants(folder: Path, shape: dict, precision: str = "fp32", r: int = 16) -> dict[str, tuple[Path, Path | None]]:
    """Build a genai model of ``shape`` and its LoRA variants under ``folder``: name -> (model.onnx, adapter file
    to activate or None). A real PEFT all-linear adapter of rank ``r`` (non-zero B) is merged, baked into a dynamic
    graph, and exported for LoRA-ready slots. ``base`` is the builder's graph written by lorapass's writer, as the
    other variants are, so that file layout is the same in every ratio; ``builder_file`` is the builder's own file
    of the same graph."""
    from genai import hf_folder, run_builder
    from peft import LoraConfig, get_peft_model
    import transformers as tf

    from lorapass.onnx import genai
    from lorapass.onnx.load import load_model
    from lorapass.onnx.rewrite import rewrite
    from lorapass.onnx.save import save_model
    from lorapass.ort_adapter import export_adapter
    from lorapass.rules import LoraRule

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**shape)).eval()
    built = run_builder(hf_folder(model, folder / "hf"), folder / "built", precision) / "model.onnx"
    base = folder / "base" / "model.onnx"
    graph = load_model(built)
    save_model(graph, built, base, progress=False, companions=genai.companions(built, base, genai.external_files(graph)))
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                  init_lora_weights=False))
    peft_model.save_pretrained(str(folder / "adapter"))
    variants: dict[str, tuple[Path, Path | None]] = {"base": (base, None), "builder_file": (built, None)}
    for name, kwargs in (("merged", {"adapter": folder / "adapter", "strategy": "merge"}),
                         ("dynamic", {"adapter": folder / "adapter", "strategy": "dynamic"}),
                         ("slots", {"rules": LoraRule(name="slots", target_modules="all-linear", r=r, strategy="dynamic")})):
        variants[name] = (rewrite(built, folder / name / "model.onnx", progress=False, **kwargs).output, None)
    adapter = export_adapter(folder / "adapter", variants["slots"][0], folder / "adapter.onnx_adapter")
    variants["slots_with_adapter"] = (variants.pop("slots")[0], adapter)
    return variants


def kv_feeds(model: Path, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One decode step of a genai graph: a token, a mask over past + 1, random past keys/values of length ``past``."""
    import onnx

    decoder = json.loads((model.parent / "genai_config.json").read_text())["model"]["decoder"]
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": np.array([[7]], np.int64), "attention_mask": np.ones((1, past + 1), np.int64)}
    for value in onnx.load(str(model), load_external_data=False).graph.input:
        t = value.type.tensor_type
        if value.name == "position_ids":
            feeds[value.name] = np.array([[past]], np.int64)
        elif value.name.startswith("past_key_values."):
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
            shape = (1, t.shape.dim[1].dim_value, past, decoder["head_size"])
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def kv_decode_bench(variants: dict[str, tuple[Path, Path | None]], past: int = 512, rounds: int = 40,
                    blocks: int = 6, threads: int = 1) -> dict:
    """Median ms per decode step of each variant (name -> (model, adapter file or None); ``base`` required) and
    its ratio to ``base``: round-robin, alternating direction, blocks of fresh sessions in rotated order.

    One intra-op thread by default: on this shared 2-core machine a 2-thread pool stalls whenever another
    process holds a core, which moved identical graphs (base vs merged) by +-15 % between runs; with one thread
    they stayed within 1.5 %."""
    import onnxruntime as ort

    feeds = kv_feeds(variants["base"][0], past)
    names = list(variants)
    outputs = {}
    times: dict[str, list[float]] = {name: [] for name in names}
    block_ratios: dict[str, list[float]] = {name: [] for name in names if name != "base"}
    for block in range(blocks):
        order = names[block % len(names):] + names[:block % len(names)]
        runners, loaded = {}, []
        for name in order:
            path, adapter = variants[name]
            session, options = ort_session(path, threads=threads), ort.RunOptions()
            if adapter is not None:
                lora = ort.LoraAdapter()
                lora.Load(str(adapter))
                options.add_active_adapter(lora)  # RunOptions holds a raw pointer: keep the adapter alive
                loaded.append(lora)
            runners[name] = lambda s=session, o=options: s.run(["logits"], feeds, o)[0]
        runners = {name: runners[name] for name in names}
        outputs = outputs or {name: run() for name, run in runners.items()}
        for run in runners.values():
            run()
        local = {name: [] for name in names}
        for i in range(rounds):
            for name in (names if i % 2 == 0 else names[::-1]):
                t = time.perf_counter()
                runners[name]()
                local[name].append(time.perf_counter() - t)
        for name, values in local.items():
            times[name] += values
            if name != "base":
                block_ratios[name].append(statistics.median(values) / statistics.median(local["base"]))
        del runners, loaded
        gc.collect()
    med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    reference = outputs.get("merged", outputs["base"])
    diff = {k: float(f"{np.abs(v - reference).max() / np.abs(reference).max():.2e}") for k, v in outputs.items()}
    return {"past": past, "rounds": rounds * blocks, "intra_op_num_threads": threads,
            "median_ms": {k: round(v, 3) for k, v in med.items()},
            "max_rel_diff_vs_merged": diff,
            "over_base": {k: round(v / med["base"], 3) for k, v in med.items() if k != "base"},
            "min_over_base": {k: round(min(v) / min(times["base"]), 3) for k, v in times.items() if k != "base"},
            "ratio_range_over_blocks": {k: [round(min(r), 3), round(max(r), 3)] for k, r in block_ratios.items()}}


def kv_decode_case(quick: bool, rounds: int | None, blocks: int | None) -> dict:
    """The KV-cache decode case of this benchmark: build the variants and time them."""
    import onnx

    shape = KV_QUICK if quick else KV_FULL
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        variants = kv_decode_variants(Path(tmp), shape)
        build_s = time.perf_counter() - t
        base = onnx.load(str(variants["base"][0]), load_external_data=False)
        params = sum(int(np.prod(t.dims)) for t in base.graph.initializer if t.name.endswith("weight"))
        result = kv_decode_bench(variants, past=32 if quick else 512, rounds=rounds or (3 if quick else 40),
                                 blocks=blocks or (2 if quick else 6))
    over = result["over_base"]
    result["targets_met"] = {"merged_over_base": abs(over["merged"] - 1) <= 0.03,
                             "dynamic_over_base": over["dynamic"] <= KV_TARGETS["dynamic_over_base"],
                             "slots_with_adapter_over_base": over["slots_with_adapter"] <= KV_TARGETS["slots_with_adapter_over_base"]}
    return {"model": {"params": params, **shape, "dtype": "float32", "exporter": "onnxruntime-genai builder",
                      "build_s": round(build_s, 1)},
            "adapter": {"r": 16, "alpha": 32, "target_modules": "all-linear"}, "targets": KV_TARGETS, **result}


def kv_decode_int4_case(quick: bool, rounds: int | None, blocks: int | None) -> dict:
    """The KV-cache decode case over an int4 base, beside fp32: one round-robin of int4 base / dynamic / slots with
    the adapter and fp32 base / dynamic (the same HF weights and adapter); each LoRA overhead is over its own base."""
    shape = KV_QUICK if quick else KV_FULL
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        int4 = kv_decode_variants(Path(tmp) / "int4", shape, "int4")
        fp32 = kv_decode_variants(Path(tmp) / "fp32", shape, "fp32")
        build_s = time.perf_counter() - t
        variants = {name: int4[name] for name in ("base", "dynamic", "slots_with_adapter")}
        variants |= {"fp32_base": fp32["base"], "fp32_dynamic": fp32["dynamic"]}
        result = kv_decode_bench(variants, past=32 if quick else 512, rounds=rounds or (3 if quick else 40),
                                 blocks=blocks or (2 if quick else 6))
    med = result["median_ms"]
    int4_over, fp32_over = med["dynamic"] / med["base"], med["fp32_dynamic"] / med["fp32_base"]
    result.pop("max_rel_diff_vs_merged")  # no merged variant here: int4 merging requantizes (onnx/loss.py reports it)
    return {"model": {**shape, "precision": "int4 MatMulNBits (builder's CPU default accuracy level 4) and fp32",
                      "build_s": round(build_s, 1)},
            "adapter": {"r": 16, "alpha": 32, "target_modules": "all-linear"}, "targets": INT4_TARGETS, **result,
            "int4_dynamic_over_int4_base": round(int4_over, 3), "fp32_dynamic_over_fp32_base": round(fp32_over, 3),
            "int4_base_over_fp32_base": round(med["base"] / med["fp32_base"], 3),
            "int4_overhead_minus_fp32_overhead": round(int4_over - fp32_over, 3),
            "lora_ms_int4_vs_fp32": [round(med["dynamic"] - med["base"], 3), round(med["fp32_dynamic"] - med["fp32_base"], 3)],
            "min_int4_dynamic_over_int4_base": result["min_over_base"]["dynamic"],
            "min_fp32_dynamic_over_fp32_base": round(result["min_over_base"]["fp32_dynamic"] / result["min_over_base"]["fp32_base"], 3),
            "targets_met": {"int4_dynamic_over_int4_base": int4_over <= INT4_TARGETS["int4_dynamic_over_int4_base"]}}


def kv_decode_dora_case(quick: bool, rounds: int | None, blocks: int | None, r: int = 16) -> dict:
    """The KV-cache decode step with a DoRA adapter (all-linear, rank ``r``, trained magnitudes) beside plain LoRA on
    the same builder graph: baked-in dynamic graphs, and LoRA-ready slots (``--dora`` ones for DoRA) with the
    adapter file active, and the DoRA adapter merged (the reference of ``max_rel_diff_vs_merged``: both DoRA graphs
    compute it; the plain LoRA ones do not). DoRA's cost is one Mul per site (the packed q/k/v slot's factor covers
    its rows)."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from lorapass.onnx.rewrite import rewrite
    from lorapass.ort_adapter import export_adapter
    from lorapass.rules import LoraRule

    shape = KV_QUICK if quick else KV_FULL
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        lora = kv_decode_variants(folder, shape, r=r)
        built = folder / "built" / "model.onnx"
        model = tf.LlamaForCausalLM.from_pretrained(str(folder / "hf")).eval()
        dora_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                      init_lora_weights=False, use_dora=True))
        with torch.no_grad():  # trained magnitudes: the factor differs from 1
            for name, p in dora_model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
        dora_model.save_pretrained(str(folder / "dora"))
        dora = {strategy: rewrite(built, folder / f"{strategy}_dora" / "model.onnx", adapter=folder / "dora",
                                  strategy=strategy, progress=False).output for strategy in ("merge", "dynamic")}
        slots = rewrite(built, folder / "dora_slots" / "model.onnx", progress=False, rules=LoraRule(
            name="slots", target_modules="all-linear", r=r, strategy="dynamic", use_dora=True)).output
        adapter = export_adapter(folder / "dora", slots, folder / "dora.onnx_adapter")
        build_s = time.perf_counter() - t
        variants = {name: lora[name] for name in ("base", "dynamic", "slots_with_adapter")}
        variants |= {"merged": (dora["merge"], None), "dynamic_dora": (dora["dynamic"], None),
                     "dora_slots_with_adapter": (slots, adapter)}  # "merged": DoRA merged, the logits' reference
        result = kv_decode_bench(variants, past=32 if quick else 512, rounds=rounds or (3 if quick else 40),
                                 blocks=blocks or (2 if quick else 6))
    med, low = result["median_ms"], result["min_over_base"]
    ratio = med["dynamic_dora"] / med["dynamic"]
    return {"model": {**shape, "dtype": "float32", "exporter": "onnxruntime-genai builder", "build_s": round(build_s, 1)},
            "adapter": {"r": r, "alpha": 2 * r, "target_modules": "all-linear", "use_dora": True},
            "targets": {"dora_over_lora_dynamic": 1.03}, **result,
            "dora_over_lora_dynamic": round(ratio, 3),
            "dora_over_lora_slots_with_adapter": round(med["dora_slots_with_adapter"] / med["slots_with_adapter"], 3),
            "min_dora_over_lora_dynamic": round(low["dynamic_dora"] / low["dynamic"], 3),
            "targets_met": {"dora_over_lora_dynamic": ratio <= 1.03}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny model, few repeats: a smoke run")
    parser.add_argument("--repeat", type=int, default=None, help="decode rounds per block (default 30)")
    parser.add_argument("--prefill-repeat", type=int, default=None, help="prefill rounds per block (default 4)")
    parser.add_argument("--blocks", type=int, default=None, help="blocks of fresh sessions, creation order rotated")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the ORT profiling of the LoRA nodes (run after the timings, on separate sessions)")
    kv = parser.add_mutually_exclusive_group()
    kv.add_argument("--no-kv", dest="kv", action="store_false", help="skip the KV-cache decode case")
    kv.add_argument("--kv-only", action="store_true", help="run only the KV-cache decode case")
    parser.add_argument("--kv-repeat", type=int, default=None, help="KV decode rounds per block (default 40)")
    parser.add_argument("--no-int4", dest="int4", action="store_false", help="skip the int4 KV-cache decode case")
    args = parser.parse_args()
    if args.kv_only:
        report = {"kv_decode": kv_decode_case(args.quick, args.kv_repeat, args.blocks),
                  "kv_decode_dora": kv_decode_dora_case(args.quick, args.kv_repeat, args.blocks)}
        if args.int4:
            report["kv_decode_int4"] = kv_decode_int4_case(args.quick, args.kv_repeat, args.blocks)
        print(json.dumps(report, indent=2))
        return
    shape = QUICK if args.quick else FULL
    repeat = args.repeat or (3 if args.quick else 30)
    blocks = args.blocks or (2 if args.quick else 8)
    prefill = 32 if args.quick else 512
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from lorapass.onnx.rewrite import rewrite
    from lorapass.rules import LoraRule

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(max_position_embeddings=1024, **shape)).eval()
    params = sum(p.numel() for p in model.parameters())
    phases = {"decode": (1, 1, repeat), "prefill": (1, prefill, args.prefill_repeat or (1 if args.quick else 4))}
    gen = torch.Generator().manual_seed(1)
    ids = {phase: torch.randint(0, shape["vocab_size"], (batch, seq), generator=gen) for phase, (batch, seq, _) in phases.items()}
    times = {phase: {name: [] for name in (*ORT_VARIANTS, "peft_eager", "torch_eager_base")} for phase in phases}
    block_ratios: dict[str, dict[str, list[float]]] = {phase: {name: [] for name in times[phase]} for phase in phases}
    errors: dict[str, dict[str, float]] = {phase: {} for phase in phases}
    dora_ratios: dict[str, list[float]] = {phase: [] for phase in phases}  # DoRA dynamic / LoRA dynamic, per block
    profiles: dict[str, dict] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        base = export(model, tmp / "base.onnx")
        export_s = time.perf_counter() - t
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                                     init_lora_weights=False)).eval()
        peft_model.save_pretrained(str(tmp / "adapter"))
        dora_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                                     init_lora_weights=False, use_dora=True)).eval()
        with torch.no_grad():  # trained magnitudes: the factor differs from 1
            for name, p in dora_model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
        dora_model.save_pretrained(str(tmp / "dora"))
        paths = {"base": base}
        for name, strategy, fuse, adapter in (("merged", "merge", True, "adapter"), ("dynamic", "dynamic", True, "adapter"),
                                              ("dynamic_unfused", "dynamic", False, "adapter"),
                                              ("dynamic_dora", "dynamic", False, "dora")):
            paths[name] = tmp / f"{name}.onnx"
            rules = LoraRule.from_peft_config(tmp / adapter)
            rewrite(base, paths[name], adapter=tmp / adapter, strategy=strategy, progress=False,
                    rules=rules.model_copy(update={"fuse_shared_inputs": fuse, "strategy": strategy}))
        wrapper = Wrapper(peft_model).eval()
        plain = Wrapper(model).eval()  # the same model without LoRA: what torch itself costs
        with torch.inference_mode():
            expected = {phase: wrapper(x).numpy() for phase, x in ids.items()}
            expected_dora = {phase: Wrapper(dora_model).eval()(x).numpy() for phase, x in ids.items()}

        for block in range(blocks):
            k = block % len(ORT_VARIANTS)
            order = [*ORT_VARIANTS[k:], *ORT_VARIANTS[:k]]
            sessions = {name: ort_session(paths[name]) for name in order}  # created in rotated order
            for phase, (_, _, rounds) in phases.items():
                x = ids[phase]
                feeds = {"input_ids": x.numpy()}

                def run_torch(module, x=x) -> None:
                    with torch.inference_mode():
                        module(x)

                runners = {name: (lambda s=sessions[name], f=feeds: s.run(None, f)) for name in order}
                runners["peft_eager"] = lambda: run_torch(wrapper)
                runners["torch_eager_base"] = lambda: run_torch(plain)
                for run in runners.values():  # warm-up
                    run()
                local = {name: [] for name in runners}
                for i in range(rounds):
                    for name in (list(runners) if i % 2 == 0 else list(runners)[::-1]):
                        t = time.perf_counter()
                        runners[name]()
                        local[name].append(time.perf_counter() - t)
                for name, values in local.items():
                    times[phase][name] += values
                    block_ratios[phase][name].append(statistics.median(values) / statistics.median(local["base"]))
                dora_ratios[phase].append(statistics.median(local["dynamic_dora"]) / statistics.median(local["dynamic_unfused"]))
                if block == 0:
                    for name in ("merged", *DYNAMIC):
                        out = sessions[name].run(None, feeds)[0]
                        ref = (expected_dora if name == "dynamic_dora" else expected)[phase]
                        errors[phase][name] = float(np.abs(out - ref).max() / np.abs(ref).max())
            del sessions, runners
            gc.collect()
        if args.profile:
            for phase, (_, _, rounds) in phases.items():
                feeds = {"input_ids": ids[phase].numpy()}
                for name in DYNAMIC:
                    profiles.setdefault(phase, {})[name] = lora_profile(
                        paths[name], feeds, max(3, rounds * 3), str(tmp / f"profile_{phase}_{name}"))

    report = {"model": {"params": params, **shape, "dtype": "float32", "export_s": round(export_s, 1)},
              "adapter": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
              "ort": {"intra_op_num_threads": 2, "provider": "CPUExecutionProvider", "allow_spinning": 0,
                      "graph_optimization_level": "ORT_ENABLE_ALL"},
              "torch": {"threads": 2, "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"], "mode": "inference_mode"},
              "decode_note": "batch 1, one token, no KV cache in the export: a decode-sized step without past context",
              "method": "round-robin, alternating direction; blocks of fresh ORT sessions, creation order rotated",
              "blocks": blocks, "repeat": {phase: rounds * blocks for phase, (_, _, rounds) in phases.items()},
              "targets": TARGETS, "phases": {}}
    for phase, values in times.items():
        med = {name: statistics.median(v) * 1e3 for name, v in values.items()}
        spread = {name: [round(min(r), 3), round(max(r), 3)] for name, r in block_ratios[phase].items() if name != "base"}
        limit = TARGETS[f"dynamic_over_base_{phase}"]
        entry = {
            "shape": list(phases[phase][:2]),
            "median_ms": {k: round(v, 3) for k, v in med.items() if k != "torch_eager_base"},
            "reference_median_ms": {"torch_eager_base": round(med["torch_eager_base"], 3)},  # no LoRA, torch
            "merged_over_base": round(med["merged"] / med["base"], 3),
            "dynamic_over_base": round(med["dynamic"] / med["base"], 3),
            "dynamic_unfused_over_base": round(med["dynamic_unfused"] / med["base"], 3),
            "fused_over_unfused": round(med["dynamic"] / med["dynamic_unfused"], 3),
            "dora_over_lora_dynamic": round(med["dynamic_dora"] / med["dynamic_unfused"], 3),  # both unfused
            "dora_over_lora_range_over_blocks": [round(min(dora_ratios[phase]), 3), round(max(dora_ratios[phase]), 3)],
            "peft_eager_over_ort_dynamic": round(med["peft_eager"] / med["dynamic"], 3),
            "peft_eager_over_ort_dynamic_unfused": round(med["peft_eager"] / med["dynamic_unfused"], 3),
            "torch_eager_base_over_ort_base": round(med["torch_eager_base"] / med["base"], 3),
            "peft_eager_over_torch_eager_base": round(med["peft_eager"] / med["torch_eager_base"], 3),
            "ratio_range_over_blocks": spread,
            "targets_met": {
                "merged_over_base": abs(med["merged"] / med["base"] - 1) <= 0.03,
                "dynamic_over_base": med["dynamic"] / med["base"] <= limit,
                "dynamic_unfused_over_base": med["dynamic_unfused"] / med["base"] <= limit,
                "peft_eager_over_ort_dynamic": med["peft_eager"] / med["dynamic"] >= 2.0,
                **({"dora_over_lora_dynamic": med["dynamic_dora"] / med["dynamic_unfused"] <= 1.03} if phase == "decode" else {}),
            },
            "max_rel_error_vs_peft": {k: float(f"{v:.2e}") for k, v in errors[phase].items()},
        }
        if phase in profiles:
            entry["ort_profile"] = profiles[phase]
        report["phases"][phase] = entry
    if args.kv:
        report["kv_decode"] = kv_decode_case(args.quick, args.kv_repeat, args.blocks)
        report["kv_decode_dora"] = kv_decode_dora_case(args.quick, args.kv_repeat, args.blocks)
        if args.int4:
            report["kv_decode_int4"] = kv_decode_int4_case(args.quick, args.kv_repeat, args.blocks)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
