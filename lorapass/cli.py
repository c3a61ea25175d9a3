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
from lorapass.errors import LorapassError, LorapassWarning
from lorapass.fx.cli import add_export_parser


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", metavar="PATH[:WEIGHT]", action="append",
                   help="adapter: a PEFT directory (adapter_config.json + adapter_model.safetensors); WEIGHT "
                        "multiplies its scale; several --adapter merge as the sum of their deltas")
    p.add_argument("--rules", metavar="FILE", help="YAML rules; default: the adapter's own config")
    p.add_argument("--prefix", help="wrapper scope to strip from module paths (default: detected)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read adapter_model.bin (torch.load with weights_only=True) when no safetensors file exists")


def _cmd_rewrite(args: argparse.Namespace) -> int:
    from lorapass.onnx.rewrite import rewrite

    rules = shorthand.rule(args, "slots", "dynamic") or args.rules
    result = rewrite(args.model, args.output, adapter=args.adapter, rules=rules, strategy=args.strategy,
                     prefix=args.prefix, allow_pickle=args.allow_pickle, force=args.force)
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


def _cmd_verify(args: argparse.Namespace) -> int:
    from lorapass.verify import verify

    report = verify(args.base, args.rewritten, args.adapter, args.inputs, args.tol, prefix=args.prefix, atol=args.atol)
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
    p.add_argument("--strategy", choices=["merge", "dynamic"], help="default: the rules' own strategy")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--force", action="store_true",
                   help="rewrite even a graph with lorapass LoRA slots, or one lorapass already merged this adapter into")
    _add_selection(p)
    shorthand.add_arguments(p, "LoRA-ready slots (dynamic, no adapter): zero weights, output equals the base",
                            "default slot rank (adapters of any rank fit later)")
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
