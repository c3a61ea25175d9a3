"""``lorapass export``: a torch model given as ``package.module:factory`` → rewritten ONNX, in one command.

The factory is called without arguments and returns the model, ``(model, args)`` or ``(model, args, kwargs)``
(example inputs for tracing); ``--input NAME:SHAPE[:DTYPE]`` and ``--kwarg NAME=JSON`` add keyword example
inputs (integer and bool tensors are ones, i.e. valid token ids and a full attention mask; float tensors are
random normal). Bad specs raise :class:`lorapass.errors.ModelError` (the CLI exits 2).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from lorapass.errors import ModelError

_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")


def load_factory(spec: str, app_dir: str | None = ".") -> Any:
    """The object named by ``package.module:attribute`` (``app_dir`` is put first on sys.path)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ModelError(f"{spec!r}: give the model as package.module:factory")
    if app_dir is not None:
        folder = str(Path(app_dir).resolve())
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module's own code raises on import
        raise ModelError(f"{spec!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc})") from exc
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelError(f"{spec!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    return target


def build_model(spec: str, app_dir: str | None = ".") -> tuple[Any, tuple | None, dict | None]:
    """(model, example args, example kwargs) from the factory ``spec``."""
    import torch

    factory = load_factory(spec, app_dir)
    made = factory if isinstance(factory, torch.nn.Module) else _call(factory, spec)
    args = kwargs = None
    if isinstance(made, tuple):
        if not 1 <= len(made) <= 3:
            raise ModelError(f"{spec!r}: the factory must return a module, (module, args) or (module, args, kwargs)")
        made, args, kwargs = (*made, None, None)[:3]
        if args is not None and not isinstance(args, tuple):
            args = (args,)
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ModelError(f"{spec!r}: the factory's example kwargs must be a dict, got {type(kwargs).__name__}")
    if not isinstance(made, torch.nn.Module):
        raise ModelError(f"{spec!r}: the factory returned {type(made).__name__}, not a torch.nn.Module")
    return made, args, kwargs


def _call(factory: Any, spec: str) -> Any:
    if not callable(factory):
        raise ModelError(f"{spec!r}: {type(factory).__name__} is neither a module nor callable")
    try:
        return factory()
    except Exception as exc:  # the user's code failed: say so in one line (--debug shows its traceback)
        raise ModelError(f"{spec!r}: the factory raised {type(exc).__name__}: {exc}") from exc


def parse_input(spec: str) -> tuple[str, Any]:
    """``input_ids:2x7:int64`` → ("input_ids", tensor of ones [2, 7] int64); dtype defaults to int64."""
    import torch

    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise ModelError(f"--input {spec!r}: expected NAME:SHAPE[:DTYPE], e.g. input_ids:2x7:int64")
    name, shape_text = parts[0], parts[1]
    dtype_name = parts[2] if len(parts) == 3 else "int64"
    if dtype_name not in _DTYPES:
        raise ModelError(f"--input {spec!r}: dtype must be one of {', '.join(_DTYPES)}")
    try:
        shape = [int(d) for d in shape_text.lower().split("x")] if shape_text else []
    except ValueError:
        raise ModelError(f"--input {spec!r}: shape must be dimensions joined by 'x', e.g. 2x7") from None
    if any(d <= 0 for d in shape):
        raise ModelError(f"--input {spec!r}: dimensions must be positive")
    dtype = getattr(torch, dtype_name)
    if dtype.is_floating_point:
        return name, torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    return name, torch.ones(shape, dtype=dtype)


def parse_kwarg(spec: str) -> tuple[str, Any]:
    """``use_cache=false`` → ("use_cache", False): a JSON value for a non-tensor keyword argument."""
    name, sep, text = spec.partition("=")
    if not sep or not name:
        raise ModelError(f"--kwarg {spec!r}: expected NAME=JSON, e.g. use_cache=false")
    try:
        return name, json.loads(text)
    except ValueError as exc:
        raise ModelError(f"--kwarg {spec!r}: the value is not JSON ({exc})") from None


def handler(args: argparse.Namespace) -> int:
    from lorapass.fx.export import export

    model, example_args, example_kwargs = build_model(args.model, args.app_dir)
    extra = dict(parse_input(s) for s in args.input or []) | dict(parse_kwarg(s) for s in args.kwarg or [])
    if extra:
        example_kwargs = {**(example_kwargs or {}), **extra}
    if example_args is None and example_kwargs is None:
        raise ModelError(f"{args.model!r}: no example inputs; have the factory return (model, args) or give --input")
    result = export(model, example_args, example_kwargs=example_kwargs, adapter=args.adapter, rules=args.rules,
                    strategy=args.strategy, path=args.output, dynamic_shapes=None if args.static else "auto",
                    prefix=args.prefix, opset_version=args.opset, external_data=args.external_data,
                    allow_pickle=args.allow_pickle)
    fx = result.fx
    summary = {"output": str(result.path), "strategy": fx.strategy, "sites": len(fx.report.sites),
               "targets": len(fx.targets), "prefix": fx.report.prefix, "lora_inputs": len(result.lora_inputs)}
    print(json.dumps(summary) if args.json else
          f"{fx.strategy}: {summary['targets']} of {summary['sites']} sites -> {result.path}")
    return 0


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``export`` (trace → rewrite → torch.onnx.export) on the ``lorapass`` subcommands."""
    p = subparsers.add_parser("export", help="trace a torch model, apply LoRA, export to ONNX (package.module:factory)")
    p.add_argument("model", help="package.module:factory returning a torch module, (module, args) or (module, args, kwargs)")
    p.add_argument("-o", "--output", required=True, help="output .onnx")
    p.add_argument("--strategy", choices=["merge", "dynamic"], help="default: the rules' own (merge for an adapter)")
    p.add_argument("--adapter", metavar="DIR", help="PEFT adapter directory")
    p.add_argument("--rules", metavar="FILE", help="YAML rules; default: the adapter's own config")
    p.add_argument("--prefix", help="wrapper path to strip from module paths (default: detected)")
    p.add_argument("--allow-pickle", action="store_true", help="read adapter_model.bin (weights_only) if no safetensors")
    p.add_argument("--input", action="append", metavar="NAME:SHAPE[:DTYPE]",
                   help="a keyword example tensor, e.g. input_ids:2x8:int64 (repeatable; sizes of 1 are fixed by torch.export)")
    p.add_argument("--kwarg", action="append", metavar="NAME=JSON", help="a non-tensor keyword argument, e.g. use_cache=false")
    p.add_argument("--static", action="store_true", help="fix every input dimension (default: dynamic where the model allows)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: torch.onnx's)")
    p.add_argument("--external-data", action=argparse.BooleanOptionalAction, default=None,
                   help="weights in <output>.data (default: only above 1 GiB)")
    p.add_argument("--app-dir", default=".", help="folder put on sys.path to import the factory (default: .)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=handler)
    return p
