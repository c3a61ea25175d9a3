"""``lorapass analyse`` and ``lorapass calibrate``: parsers the main CLI registers, and their handlers."""

from __future__ import annotations

import argparse
import json
import sys

from lorapass import shorthand
from lorapass.errors import SpecError


def _dims(items: list[str] | None) -> dict[str, int]:
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            out[name] = int(value)
        except ValueError:
            sep = ""
        if not sep or not name or out[name] < 1:
            raise SpecError(f"--dims {item!r}: expected NAME=INTEGER, the integer positive")
    return out


def _devices(text: str | None) -> list[int] | None:
    if not text:
        return None
    out = []
    for part in text.split(","):
        lo, dash, hi = part.partition("-")
        try:
            out += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
        except ValueError:
            raise SpecError(f"--devices {text!r}: expected counts like 8 or 8,16 or 8-64") from None
    if any(n < 1 for n in out):
        raise SpecError(f"--devices {text!r}: device counts must be >= 1")
    return out


def _rules(args: argparse.Namespace):
    if args.target:
        return shorthand.rule(args, "target", args.strategy or "dynamic")
    if args.rules:
        from lorapass.rules import RuleSet

        return RuleSet.from_yaml(args.rules)
    if args.adapter:
        from pathlib import Path

        from lorapass.rules import LoraRule

        if Path(args.adapter).is_file():  # a single file: its modules, bound to the graph's sites, and their ranks
            from lorapass.adapter import load_adapter
            from lorapass.cost.lora import FileSelection

            return FileSelection(load_adapter(args.adapter), args.component)
        return LoraRule.from_peft_config(args.adapter)  # the config is all the cost model needs
    return None


def cmd_analyse(args: argparse.Namespace) -> int:
    if args.workload:
        from lorapass.cost.serving.command import cmd_serving

        return cmd_serving(args)
    if args.policy:
        raise SpecError("--policy chooses what --workload simulates; give --workload W.yaml")
    from lorapass.cost import report
    from lorapass.cost.analysis import Analyser, ModelSource, Workload, sweep
    from lorapass.cost.hw import load_spec
    from lorapass.cost.parallel import Layout

    spec = load_spec(args.hw)
    source = ModelSource(args.model, attention=args.attention, logits=args.logits, dtype=args.dtype,
                         kv_dtype=args.kv_dtype, prefix=args.prefix, dims=_dims(args.dims))
    workload = Workload(args.batch, args.seq, args.gen)
    rules = _rules(args)
    analyser = Analyser(source, spec, workload, rules, args.strategy, args.collective)
    layout = Layout(args.tp, args.pp, args.ep, args.dp, args.sp, args.microbatches)
    if args.sweep:
        counts = _devices(args.devices) or [layout.devices]
        result = sweep(source, spec, counts, workload, sp=args.sp, objective=args.objective, analyser=analyser)
        if not result.results:
            raise SpecError(f"{args.model}: no valid layout for {counts} device(s) and batch {args.batch}")
        if args.csv:
            report.write_sweep_csv(result, args.csv)
        if args.json:
            print(json.dumps(report.sweep_dict(result), indent=2, default=float))
        else:
            print(report.format_sweep(result, args.top))
        best = result.results[0]
        if args.plot:
            best = analyser.analyse(best.layout, keep_ops=True)
            report.plot_roofline(best, spec, args.plot)
        return 0
    analysis = analyser.analyse(layout, keep_ops=True)
    if getattr(rules, "binding", None) is not None:  # a single file: which of its modules matched, on stderr
        print(rules.binding.summary(), file=sys.stderr)
    if args.csv:
        report.write_csv(analysis, args.csv)
    if args.plot:
        report.plot_roofline(analysis, spec, args.plot)
    print(report.to_json(analysis, ops=args.ops) if args.json else report.format_analysis(analysis))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from lorapass.cost.calibrate import calibrate

    result = calibrate(args.output, threads=args.threads, quick=args.quick, name=args.name)
    summary = {"output": args.output, "fp32_gflops": result["peak_tflops_fp32"] * 1e3,
               "memory_gb_s": result["memory_bandwidth_tb_s"] * 1e3,
               "kernel_overhead_us": result["kernel_overhead_s"] * 1e6}
    print(json.dumps(summary) if args.json else
          f"{args.output}: fp32 {summary['fp32_gflops']:.1f} GFLOP/s, memory {summary['memory_gb_s']:.2f} GB/s, "
          f"{summary['kernel_overhead_us']:.2f} us per node")
    return 0


def add_analyse_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("analyse",
                              help="predict latency, throughput and memory of a model (with LoRA) on hardware",
                              description="Roofline cost model of an ONNX graph or a models/*.yaml config, per phase "
                                          "(prefill, decode, merge) and operator class, under a parallel layout.")
    p.add_argument("model", help="MODEL.onnx or models/NAME.yaml")
    p.add_argument("--hw", required=True, metavar="SPEC", help="hardware spec YAML (hw_specs/*.yaml)")
    g = p.add_argument_group("layout")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    g.add_argument("--pp", type=int, default=1, help="pipeline stages")
    g.add_argument("--ep", type=int, default=1, help="expert-parallel degree (MoE)")
    g.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    g.add_argument("--sp", action="store_true", help="sequence parallelism with TP (reduce-scatter/all-gather)")
    g.add_argument("--microbatches", type=int, help="prefill micro-batches per replica (default: from --pp)")
    g.add_argument("--collective", choices=["auto", "ring", "tree"], default="auto", help="all-reduce algorithm")
    g = p.add_argument_group("workload")
    g.add_argument("--batch", type=int, default=1, help="sequences (global batch)")
    g.add_argument("--seq", type=int, default=2048, help="prompt tokens per sequence (prefill)")
    g.add_argument("--gen", type=int, default=256, help="generated tokens per sequence (decode steps)")
    g.add_argument("--dtype", help="weights/activations/compute dtype of a config (default: the config's)")
    g.add_argument("--kv-dtype", help="KV-cache dtype (default: --dtype)")
    g.add_argument("--attention", choices=["flash", "dense"], help="config attention kernel (default flash)")
    g.add_argument("--logits", choices=["last", "all"], help="config prefill output head on the last token or all")
    g.add_argument("--prefix", help="ONNX: wrapper scope to strip from module paths (default: detected)")
    g.add_argument("--dims", action="append", metavar="NAME=VALUE", help="ONNX: bind another symbolic dimension")
    g = p.add_argument_group("LoRA")
    g.add_argument("--adapter", metavar="DIR|FILE",
                   help="PEFT adapter directory (its adapter_config.json selects the sites), or a kohya / LyCORIS / "
                        "diffusers .safetensors file (its modules, bound to the graph's sites, with their own ranks)")
    g.add_argument("--component", choices=["unet", "text_encoder", "text_encoder_2", "transformer"],
                   help="with a single-file --adapter holding several models: which one this graph is (default: "
                        "detected from the graph)")
    g.add_argument("--rules", metavar="FILE", help="YAML rules (win over --adapter's config)")
    g.add_argument("--strategy", choices=["merge", "dynamic"], help="default: the rules' own strategy")
    shorthand.add_arguments(p, "LoRA shorthand (instead of --adapter or --rules; dynamic unless --strategy)",
                            "LoRA rank (default 8)")
    g = p.add_argument_group("serving many adapters")
    g.add_argument("--workload", metavar="W.yaml",
                   help="simulate continuous batching of this workload (adapters, popularity, arrivals, SLOs)")
    g.add_argument("--policy", choices=["merge", "dynamic", "multi", "all"],
                   help="with --workload: adapter policy to simulate (default all: merge drain and threshold, "
                        "dynamic, multi)")
    g = p.add_argument_group("output")
    g.add_argument("--sweep", action="store_true", help="rank every valid TP x PP x EP layout of --devices")
    g.add_argument("--devices", help="device counts to sweep: 8, 8,16 or 8-64 (default: tp*pp*ep*dp)")
    g.add_argument("--objective", choices=["throughput", "ttft", "tpot", "e2e"], default="throughput")
    g.add_argument("--top", type=int, default=20, help="rows of the sweep table")
    g.add_argument("--json", action="store_true", help="print JSON")
    g.add_argument("--ops", action="store_true", help="with --json: include every operator")
    g.add_argument("--csv", metavar="FILE", help="write per-operator rows (a sweep: one row per layout)")
    g.add_argument("--plot", metavar="PNG", help="write a roofline chart of the operators (with --workload: "
                   "throughput and p99 TTFT against adapter count per policy)")
    p.set_defaults(func=cmd_analyse)
    return p


def add_calibrate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("calibrate", help="measure this machine with ONNX Runtime and write a hardware spec")
    p.add_argument("-o", "--output", required=True, help="spec file to write, e.g. hw_specs/local.yaml")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own)")
    p.add_argument("--quick", action="store_true", help="fewer, smaller measurements")
    p.add_argument("--name", default="local", help="device name in the spec")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate)
    return p
