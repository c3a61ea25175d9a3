"""Turn what the user passed into an fx graph: torch.export for modules, symbolic_trace as the fallback.

* ``ExportedProgram`` and ``torch.fx.GraphModule``: used as they are (copied before any rewrite).
* ``nn.Module`` with example inputs: ``torch.export.export`` (non-strict by default), in eval mode (the
  module's training flags are restored afterwards). ``dynamic_shapes="auto"`` marks every dimension of every
  example tensor ``Dim.AUTO``: torch.export keeps dynamic whatever the model allows (batch, sequence) and
  specialises the rest, so the program and its ONNX export accept other batch and sequence sizes. Example
  dimensions of size 1 are always specialised by torch.export: use sizes of at least 2.
* ``nn.Module`` without example inputs: ``torch.fx.symbolic_trace`` (plain PyTorch models; transformers
  models need example inputs).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from lorapass.errors import ModelError, UnsupportedError

AUTO = "auto"


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """``module`` and its children in eval mode for the duration; their training flags restored after."""
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in flags.items():
            m.training = training


def auto_dynamic_shapes(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``Dim.AUTO`` for every dimension of every tensor argument, keyed by forward's parameter names."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise ModelError(f"the example inputs do not fit {type(module).__name__}.forward: {exc}") from exc

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {i: torch.export.Dim.AUTO for i in range(value.dim())} or None
        return None

    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def _as_tuple(example_inputs: Any) -> tuple:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise ModelError(f"example_inputs must be a tuple of positional arguments, got {type(example_inputs).__name__}")
    return example_inputs


def trace(model: torch.nn.Module | ExportedProgram, example_inputs: Any = None, example_kwargs: dict | None = None,
          dynamic_shapes: Any = AUTO, strict: bool = False) -> ExportedProgram | GraphModule:
    """An ExportedProgram (torch.export) or GraphModule (symbolic_trace) of ``model``; see the module doc."""
    if isinstance(model, (ExportedProgram, GraphModule)):
        return model
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"expected a torch.nn.Module or ExportedProgram, got {type(model).__name__}")
    args, kwargs = _as_tuple(example_inputs), dict(example_kwargs or {})
    if example_inputs is None and example_kwargs is None:
        try:
            with eval_mode(model):
                return torch.fx.symbolic_trace(model)
        except Exception as exc:  # symbolic tracing fails in many ways on data-dependent Python
            raise UnsupportedError(
                f"torch.fx.symbolic_trace cannot trace {type(model).__name__} ({type(exc).__name__}: "
                f"{_first_line(exc)}); pass example inputs to trace it with torch.export") from exc
    if isinstance(dynamic_shapes, str):
        if dynamic_shapes != AUTO:
            raise ModelError(f"dynamic_shapes must be {AUTO!r}, None or a torch.export spec, got {dynamic_shapes!r}")
        dynamic_shapes = auto_dynamic_shapes(model, args, kwargs)
    try:
        with eval_mode(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    except Exception as exc:  # torch.export reports untraceable code with many exception types
        raise UnsupportedError(f"torch.export cannot trace {type(model).__name__} ({type(exc).__name__}: "
                               f"{_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
