"""``lorapass``: rewrite, inspect, verify, export-adapter, analyse, calibrate, export."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lorapass.errors import LorapassError, RuleError


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", metavar="PATH[:WEIGHT]", action="append",
                   help="adapter: a PEFT directory (adapter_config.json + adapter_model.safetensors); WEIGHT "
                        "multiplies its scale; several --adapter merge as the sum of their deltas")
    p.add_argument("--rules", metavar="FILE", help="YAML rules; default: the adapter's own config")
    p.add_argument("--prefix", help="wrapper scope to strip from module paths (default: detected)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read adapter_model.bin (torch.load with weights_only=True) when no safetensors file exists")


def _slot_rule(args: argparse.Namespace):
    """``--target/--rank/--alpha``: a rule for LoRA-ready slots when no adapter is given."""
    if not args.target:
        return args.rules
    if args.adapter or args.rules:
        raise RuleError("--target makes empty LoRA slots; it does not combine with --adapter or --rules")
    from lorapass.rules import LoraRule

    target = args.target[0] if len(args.target) == 1 and args.target[0].lower() == "all-linear" else args.target
    return LoraRule(name="slots", target_modules=target, r=args.rank, lora_alpha=args.alpha or args.rank,
                    strategy="dynamic", use_dora=args.dora)


def _cmd_rewrite(args: argparse.Namespace) -> int:
    from lorapass.onnx.rewrite import rewrite

    rules = _slot_rule(args)
    result = rewrite(args.model, args.output, adapter=args.adapter, rules=rules, strategy=args.strategy,
                     prefix=args.prefix, allow_pickle=args.allow_pickle)
    summary = {
        "output": str(result.output),
        "strategy": result.strategy,
        "sites": len(result.report.sites),
        "targets": len(result.targets),
        "prefix": result.report.prefix,
        "bytes_written": result.stats.bytes_written,
    }
    print(json.dumps(summary) if args.json else
          f"{result.strategy}: {summary['targets']} of {summary['sites']} sites -> {result.output}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from lorapass.inspection import format_table, inspect_model
    from lorapass.onnx.rewrite import resolve_inputs

    adapter = rules = None
    if args.adapter or args.rules:
        adapter, rules = resolve_inputs(args.adapter, args.rules, args.allow_pickle)
    result = inspect_model(args.model, adapter, rules, args.prefix)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_table(result))
    return 0


def _cmd_export_adapter(args: argparse.Namespace) -> int:
    from lorapass.ort_adapter import export_adapter

    out = export_adapter(args.adapter, args.model, args.output)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorapass", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("rewrite", help="apply a LoRA adapter or rules to an ONNX model")
    p.add_argument("model", help="input .onnx (never modified)")
    p.add_argument("-o", "--output", required=True, help="output .onnx (external data beside it as <name>.data)")
    p.add_argument("--strategy", choices=["merge", "dynamic"], help="default: the rules' own strategy")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    _add_selection(p)
    slots = p.add_argument_group("LoRA-ready slots (dynamic, no adapter): zero weights, output equals the base")
    slots.add_argument("--target", nargs="+", metavar="MODULE", help="target_modules suffixes, or all-linear")
    slots.add_argument("--rank", type=int, default=8, help="default slot rank (adapters of any rank fit later)")
    slots.add_argument("--alpha", type=float, help="recorded alpha (default: rank)")
    slots.add_argument("--dora", action="store_true",
                       help="DoRA-ready slots: a per-output factor input (ones by default) for DoRA adapters; plain "
                            "LoRA adapters run on them too")
    p.set_defaults(func=_cmd_rewrite)

    p = sub.add_parser("inspect", help="list the sites of an ONNX model and what rules or an adapter target")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    _add_selection(p)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("export-adapter", help="write a PEFT adapter as an ONNX Runtime adapter for a dynamic graph")
    p.add_argument("adapter", help="PEFT adapter directory")
    p.add_argument("--model", required=True, help="the dynamic graph written by `lorapass rewrite --strategy dynamic`")
    p.add_argument("-o", "--output", required=True, help="output .onnx_adapter")
    p.set_defaults(func=_cmd_export_adapter)

    from lorapass.cost.cli import add_analyse_parser, add_calibrate_parser
    from lorapass.fx.cli import add_export_parser
    from lorapass.verify import add_verify_parser

    add_verify_parser(sub)
    add_analyse_parser(sub)
    add_calibrate_parser(sub)
    add_export_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LorapassError as exc:
        print(f"lorapass: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine's fault (disk full, permissions), not the input's
        print(f"lorapass: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
