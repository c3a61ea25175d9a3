"""``lorapass``: rewrite, inspect, verify, export-adapter, analyse, calibrate, export.

Exit status: 0 success; 2 bad input (a typed error naming the file, key, tensor or rule; also argparse's usage
errors); 1 the machine failed (permission denied, disk full, out of memory); 3 an internal error, i.e. a bug in
lorapass (any other exception: summarised in one line); 130 Ctrl-C; 128 + N signal N (SIGTERM 143, SIGHUP 129),
after removing temporaries. No traceback is printed unless ``--debug`` is given (anywhere on the command line).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from collections.abc import Sequence
from contextlib import nullcontext

from lorapass.atomic import Terminated
from lorapass.errors import LorapassError, LorapassWarning, RuleError


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", metavar="PATH[:WEIGHT]", action="append",
                   help="adapter: a PEFT directory (adapter_config.json + adapter_model.safetensors) or a kohya / "
                        "LyCORIS / diffusers .safetensors LoRA file; WEIGHT multiplies its scale; several --adapter "
                        "merge as the sum of their deltas")
    p.add_argument("--rules", metavar="FILE", help="YAML rules; default: the adapter's own config")
    p.add_argument("--prefix", help="wrapper scope to strip from module paths (default: detected)")
    add_alias_option(p)
    p.add_argument("--allow-pickle", action="store_true",
                   help="read adapter_model.bin (torch.load with weights_only=True) when no safetensors file exists")
    _add_binding(p)


def _add_binding(p: argparse.ArgumentParser) -> None:
    """Options binding single-file adapters (kohya, LyCORIS, diffusers) to a graph's sites."""
    p.add_argument("--component", choices=["unet", "text_encoder", "text_encoder_2", "transformer"],
                   help="which model of a file holding several this graph is (default: detected from the graph)")
    p.add_argument("--strict", action="store_true", help="fail when a module of the file matches no site")
    p.add_argument("--unet-config", metavar="CONFIG_JSON",
                   help="diffusers UNet config.json giving the block layout for SGM-named (SDXL kohya) files "
                        "(default: read from the graph)")


def _binding(args: argparse.Namespace) -> dict:
    return {"component": args.component, "strict": args.strict, "unet_config": args.unet_config}


def _report_keys(adapters) -> None:
    """Each single file's matched / unmatched modules, on stderr."""
    for adapter in adapters:
        if adapter.binding is not None:
            print(adapter.binding.summary(), file=sys.stderr)


def add_alias_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alias", action="append", metavar="GRAPH=PEFT",
                   help="rename a module path component of the graph to PEFT's (e.g. attn=self_attn), on top of the "
                        "detected exporter dialect; repeatable")


def aliases(args: argparse.Namespace) -> dict[str, str]:
    from lorapass.onnx.dialects import parse_aliases

    return parse_aliases(args.alias)


def _slot_rule(args: argparse.Namespace):
    """``--target/--rank/--alpha``: a rule for LoRA-ready slots when no adapter is given."""
    if not args.target:
        return args.rules
    if args.adapter or args.rules:
        raise RuleError("--target makes empty LoRA slots; it does not combine with --adapter or --rules")
    from lorapass.rules import MAX_RANK, LoraRule, _validated

    if not 1 <= args.rank <= MAX_RANK:
        raise RuleError(f"--rank {args.rank}: the slot rank must be 1..{MAX_RANK}")
    target = args.target[0] if len(args.target) == 1 and args.target[0].lower() == "all-linear" else args.target
    return _validated(LoraRule, dict(name="slots", target_modules=target, r=args.rank,
                                     strategy="multi" if args.slots else "dynamic", use_dora=args.dora,
                                     lora_alpha=args.rank if args.alpha is None else args.alpha), "--target/--rank/--alpha")


def _cmd_rewrite(args: argparse.Namespace) -> int:
    from lorapass.onnx.rewrite import rewrite

    rules = _slot_rule(args)
    result = rewrite(args.model, args.output, adapter=args.adapter, rules=rules, strategy=args.strategy,
                     prefix=args.prefix, allow_pickle=args.allow_pickle, force=args.force, aliases=aliases(args),
                     slots=args.slots, **_binding(args))
    _report_keys(result.applied)
    summary = {
        "output": str(result.output),
        "strategy": result.strategy,
        "sites": len(result.report.sites),
        "targets": len({t.site.path for t in result.targets}),
        "prefix": result.report.prefix,
        "bytes_written": result.stats.bytes_written,
        "adapter_keys": [a.binding.to_dict() for a in result.applied if a.binding is not None],
    }
    text = f"{result.strategy}: {summary['targets']} of {summary['sites']} sites -> {result.output}"
    if result.requantization is not None:
        summary["requantization"] = result.requantization
        if result.requantization["warning"]:
            print(f"lorapass: warning: {result.requantization['warning']}", file=sys.stderr)
        text += f" ({result.requantization['delta_kept']:.1%} of the delta kept by requantization)"
    if result.strategy == "multi":
        summary["lora_ids"] = [None, *result.adapters]  # index = id; None: the base (0) or an empty slot
        text += "; lora_ids 0=base " + " ".join(f"{k}={n or '(empty)'}" for k, n in enumerate(result.adapters, 1))
    print(json.dumps(summary) if args.json else text)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from lorapass.inspection import format_table, inspect_model
    from lorapass.onnx.rewrite import as_adapters
    from lorapass.rules import RuleSet

    adapters = as_adapters(args.adapter, args.allow_pickle)
    if len(adapters) > 1:
        raise RuleError("inspect takes one adapter")
    rules = RuleSet.from_yaml(args.rules) if args.rules else None
    result = inspect_model(args.model, adapters[0] if adapters else None, rules, args.prefix, aliases(args),
                           **_binding(args))
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_table(result))
    return 0


def _cmd_export_adapter(args: argparse.Namespace) -> int:
    from lorapass.ort_adapter import bind_to, export_adapter

    adapters = bind_to(args.adapter, args.model, **_binding(args))
    _report_keys(adapters)
    out = export_adapter(adapters, args.model, args.output, aliases(args))
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorapass", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("rewrite", help="apply a LoRA adapter or rules to an ONNX model")
    p.add_argument("model", help="input .onnx (never modified)")
    p.add_argument("-o", "--output", required=True, help="output .onnx (external data beside it as <name>.data)")
    p.add_argument("--strategy", choices=["merge", "dynamic", "multi"],
                   help="default: the rules' own strategy; multi: every --adapter in one graph, chosen per batch row "
                        "by the lora_ids input (0 = base, k = the k-th --adapter)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--force", action="store_true",
                   help="rewrite even a graph with lorapass LoRA slots, or one lorapass already merged this adapter into")
    _add_selection(p)
    slots = p.add_argument_group("LoRA-ready slots (dynamic, no adapter): zero weights, output equals the base")
    slots.add_argument("--target", nargs="+", metavar="MODULE", help="target_modules suffixes, or all-linear")
    slots.add_argument("--rank", type=int, default=8, help="default slot rank (adapters of any rank fit later)")
    slots.add_argument("--alpha", type=float, help="recorded alpha (default: rank)")
    slots.add_argument("--dora", action="store_true",
                       help="DoRA-ready slots: a per-output factor input (ones by default) for DoRA adapters; plain "
                            "LoRA adapters run on them too")
    slots.add_argument("--slots", type=int, metavar="N",
                       help="multi: banks of N adapter slots (empty ones after any --adapter; "
                            "fill them with export-adapter)")
    p.set_defaults(func=_cmd_rewrite)

    p = sub.add_parser("inspect", help="list the sites of an ONNX model and what rules or an adapter target")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    _add_selection(p)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("export-adapter", help="write adapters as an ONNX Runtime adapter for a dynamic graph, "
                                              "or several as a bank file for a multi graph")
    p.add_argument("adapter", nargs="+", metavar="PATH[:WEIGHT]",
                   help="PEFT adapter directory or kohya / LyCORIS / diffusers LoRA file; several are blended for a "
                        "dynamic graph (their weighted deltas summed, ranks concatenated) and ids 1, 2, ... for a "
                        "multi graph")
    p.add_argument("--model", required=True,
                   help="the graph written by `lorapass rewrite --strategy dynamic` or `multi`")
    p.add_argument("-o", "--output", required=True, help="output .onnx_adapter")
    _add_binding(p)
    add_alias_option(p)
    p.set_defaults(func=_cmd_export_adapter)

    from lorapass.cost.cli import add_analyse_parser, add_calibrate_parser
    from lorapass.fx.cli import add_export_parser
    from lorapass.verify import add_verify_parser

    add_verify_parser(sub)
    add_analyse_parser(sub)
    add_calibrate_parser(sub)
    add_export_parser(sub)
    return parser


def _add_global_options(parser: argparse.ArgumentParser) -> None:
    """``--debug`` and ``--allow-unknown-keys``, accepted before or after the subcommand."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for p, default in [(parser, False), *((p, argparse.SUPPRESS) for p in dict.fromkeys(sub.choices.values()))]:
        p.add_argument("--debug", action="store_true", default=default, help="show the traceback of an error")
        p.add_argument("--allow-unknown-keys", action="store_true", default=default,
                       help="warn about adapter_config.json keys PEFT 0.21 does not know instead of refusing them")


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning) -> None:
    if issubclass(category, LorapassWarning):
        print(f"lorapass: warning: {message}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    _add_global_options(parser)
    args = parser.parse_args(argv)
    from lorapass.rules import allow_unknown_keys

    try:
        with warnings.catch_warnings(), allow_unknown_keys() if args.allow_unknown_keys else nullcontext():
            warnings.showwarning = _show_warning
            return args.func(args)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one line and an exit status
        code, message = _failure(exc)
        if code is None:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"lorapass: {message}", file=sys.stderr)
        return code


def _failure(exc: BaseException) -> tuple[int | None, str]:
    """The exit status and message for ``exc`` (None: let it propagate, e.g. argparse's SystemExit)."""
    if isinstance(exc, LorapassError):
        return 2, f"error: {exc}"
    if isinstance(exc, (OSError, MemoryError)):  # the machine's fault (disk full, permissions), not the input's
        return 1, f"error: {str(exc) or 'out of memory'}"
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(exc, Terminated):
        return exc.code, f"{exc}; temporary files removed"
    if isinstance(exc, Exception):
        return 3, (f"internal error: {type(exc).__name__}: {exc} (a bug in lorapass: rerun with --debug for the "
                   "traceback and report it)")
    return None, ""


if __name__ == "__main__":
    sys.exit(main())
