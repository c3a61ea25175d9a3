"""``lorapass``: rewrite, inspect, verify, export-adapter, analyse, calibrate, export.

Exit status: 0 success; 2 bad input (a typed error naming the file, key, tensor or rule; also argparse's usage
errors); 1 the machine failed (permission denied, disk full, out of memory); 3 an internal error, i.e. a bug in
lorapass (any other exception: summarised in one line); 130 Ctrl-C; 128 + N signal N (SIGTERM 143, SIGHUP 129),
after removing temporaries. No traceback is printed unless ``--debug`` is given (anywhere on the command line).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext

from lorapass import progress, shorthand
from lorapass.atomic import Terminated
from lorapass.cost.cli import add_analyse_parser, add_calibrate_parser
from lorapass.errors import LorapassError, LorapassWarning, RuleError
from lorapass.fx.cli import add_export_parser


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


def _cmd_rewrite(args: argparse.Namespace) -> int:
    from lorapass.onnx.rewrite import rewrite

    rules = shorthand.rule(args, "slots", "multi" if args.slots else "dynamic", use_dora=args.dora) or args.rules
    strategy = args.strategy or ("multi" if args.slots is not None else None)  # --slots means banks
    result = rewrite(args.model, args.output, adapter=args.adapter, rules=rules, strategy=strategy,
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


def _cmd_verify(args: argparse.Namespace) -> int:
    from lorapass.verify import verify

    report = verify(args.base, args.rewritten, args.adapter, args.inputs, args.tol, prefix=args.prefix, atol=args.atol,
                    aliases=aliases(args))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for o in report.outputs:
            allowed = f"rtol {report.tolerance:g}" + (f" + atol {report.atol:g}" if report.atol else "")
            print(f"{'ok  ' if o.passed else 'FAIL'} {o.name}: max abs {o.max_abs:.3e}, relative {o.max_rel:.3e} "
                  f"({allowed}); the adapter moves it by {o.changed_from_base:.3e}")
    if not report.passed:
        bad = ", ".join(f"{o.name} (max abs {o.max_abs:.3e}, relative {o.max_rel:.3e})" for o in report.outputs if not o.passed)
        print(f"lorapass: verify failed: {bad} past tolerance {report.tolerance:g}", file=sys.stderr)
    return 0 if report.passed else 1


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


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
    slots = shorthand.add_arguments(p, "LoRA-ready slots (dynamic, no adapter): zero weights, output equals the base",
                                    "default slot rank (adapters of any rank fit later)")
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

    p = sub.add_parser("verify", help="compare a rewritten model with the base merged by an independent numpy path")
    p.add_argument("base", help="the base .onnx the rewrite started from")
    p.add_argument("rewritten", help="the rewritten .onnx (merge or dynamic)")
    p.add_argument("--adapter", required=True, metavar="DIR", help="the PEFT adapter the rewrite applied")
    p.add_argument("--inputs", metavar="NPZ", help="input arrays by name (default: random inputs of the right dtypes)")
    p.add_argument("--tol", "--rtol", dest="tol", type=_tolerance, default=1e-4, metavar="RTOL",
                   help="allowed max |error| as a fraction of max |reference|, per output (default 1e-4)")
    p.add_argument("--atol", type=_tolerance, default=0.0,
                   help="absolute allowance added to it: pass when max |error| <= atol + rtol * max |reference| (default 0)")
    p.add_argument("--prefix", help="wrapper scope to strip from module paths (default: detected)")
    add_alias_option(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_verify)

    add_analyse_parser(sub)
    add_calibrate_parser(sub)
    add_export_parser(sub)
    for command in sub.choices.values():
        command.set_defaults(func=_without_bars_for_json(command.get_default("func")))
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


def _without_bars_for_json(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``func`` with progress bars hidden when the command prints JSON (they are hidden when piped anyway)."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        with progress.hidden(getattr(args, "json", False)):
            return func(args)

    return run


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
