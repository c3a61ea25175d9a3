"""``lorapass``: rewrite, inspect, verify, export-adapter, analyse, calibrate, export."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lorapass.errors import LorapassError


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", metavar="DIR", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--rules", metavar="FILE", help="YAML rules; default: the adapter's own config")
    p.add_argument("--prefix", help="wrapper scope to strip from module paths (default: detected)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read adapter_model.bin (torch.load with weights_only=True) when no safetensors file exists")


def _cmd_rewrite(args: argparse.Namespace) -> int:
    from lorapass.rewrite import rewrite

    result = rewrite(args.model, args.output, adapter=args.adapter, rules=args.rules, strategy=args.strategy,
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
    from lorapass.rewrite import resolve_inputs

    adapter = rules = None
    if args.adapter or args.rules:
        adapter, rules = resolve_inputs(args.adapter, args.rules, args.allow_pickle)
    result = inspect_model(args.model, adapter, rules, args.prefix)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_table(result))
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
    p.set_defaults(func=_cmd_rewrite)

    p = sub.add_parser("inspect", help="list the sites of an ONNX model and what rules or an adapter target")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    _add_selection(p)
    p.set_defaults(func=_cmd_inspect)
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
