"""The deployment pipeline: trace → rewrite (fx) → torch.onnx.export → (dynamic) LoRA inputs → save.

``export(model, example_inputs, adapter=..., strategy=..., path=...)``:

1. trace ``model`` with torch.export (``lorapass.fx.trace``; all example dims ``Dim.AUTO`` by default);
2. apply the adapter or rules with the fx pass (same site vocabulary, same :func:`lorapass.plan.plan`);
3. export the rewritten program with ``torch.onnx.export(dynamo=True)``;
4. for ``dynamic``, expose the LoRA buffers as graph inputs ``<path>.lora_A`` [in, ``<path>.r``] and
   ``<path>.lora_B`` [``<path>.r``, out] (B pre-scaled) with default initializers and the ``lorapass.lora``
   metadata: the contract of ``lorapass rewrite --strategy dynamic``, so one ONNX Runtime adapter file
   works on both (torch.onnx.export cannot make initializers overridable inputs itself, hence the
   post-export step, :mod:`lorapass.fx.promote`);
5. save atomically (model and external data written to a temporary folder beside ``path``, then renamed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from lorapass.atomic import Transaction
from lorapass.errors import ModelError, UnsupportedError
from lorapass.progress import bar
from lorapass.provenance import input_files

if TYPE_CHECKING:  # torch is an optional dependency: imported only when the pipeline runs
    import torch

    from lorapass.fx.api import FxResult

AUTO = "auto"  # lorapass.fx.trace.AUTO

EXTERNAL_DATA_THRESHOLD = 1 << 30
"""Above this many bytes of initializers, weights go to ``<name>.data`` beside the model (protobuf caps at 2 GB)."""


@dataclass
class ExportResult:
    """The ONNX model the pipeline produced (in memory), where it was saved, and the fx pass's result."""

    onnx: ir.Model
    path: Path | None
    fx: FxResult

    @property
    def lora_inputs(self) -> list[str]:
        """The graph inputs an ONNX Runtime adapter may override (empty for merge)."""
        return [name for keys in self.fx.slots.values() for name in keys]


def to_onnx(result: FxResult, example_inputs: Any = None, example_kwargs: dict | None = None,
            dynamic_shapes: Any = None, input_names: list[str] | None = None,
            output_names: list[str] | None = None, opset_version: int | None = None, optimize: bool = True) -> ir.Model:
    """torch.onnx.export of a rewritten program, with the dynamic LoRA weights promoted to inputs."""
    import torch

    from lorapass.fx.promote import promote_lora_inputs
    from lorapass.onnx.slots import METADATA_KEY
    from lorapass.fx.trace import auto_dynamic_shapes

    program = result.program
    # optimise only once the LoRA weights are inputs: the optimiser deduplicates equal initializers (zero
    # defaults, say) and folds constants, which would merge or erase them
    options: dict[str, Any] = {"input_names": input_names, "output_names": output_names, "optimize": False,
                               "verbose": False, "dynamo": True}
    if opset_version is not None:
        options["opset_version"] = opset_version
    if not isinstance(program, torch.export.ExportedProgram):  # a GraphModule: torch.onnx traces it itself
        args, kwargs = tuple(example_inputs or ()), dict(example_kwargs or {})
        if isinstance(dynamic_shapes, str) and dynamic_shapes == AUTO:
            dynamic_shapes = auto_dynamic_shapes(program, args, kwargs)
        options.update(args=args, kwargs=kwargs, dynamic_shapes=dynamic_shapes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program, **options)
    except Exception as exc:  # torch.onnx reports unsupported operators and export failures with many types
        raise UnsupportedError(f"torch.onnx.export failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from exc
    if result.strategy == "dynamic":
        meta = program.graph_module.meta if isinstance(program, torch.export.ExportedProgram) else program.meta
        promote_lora_inputs(onnx_program.model, meta[METADATA_KEY], result.slots)
    if optimize:
        with _quiet("onnx_ir.passes.common.initializer_deduplication"):  # "skipped <LoRA input>": intended
            onnx_program.optimize()
    return onnx_program.model


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def save(model: ir.Model, path: str | os.PathLike, external_data: bool | None = None,
         inputs: list[Path] = ()) -> Path:
    """Write ``model`` to ``path`` all or nothing (:class:`lorapass.atomic.Transaction`, never over one of
    ``inputs``); weights to ``<name>.data`` when ``external_data`` (default: by size)."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{path}: is a directory; give the .onnx file to write")
    if external_data is None:
        external_data = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                            if v.const_value is not None) >= EXTERNAL_DATA_THRESHOLD
    data = path.with_name(f"{path.name}.data")
    with Transaction([path, data] if external_data else [path], inputs) as commit:
        staging = commit.temp(path).with_suffix(".dir")  # ir.save writes the data file beside the model
        staging.mkdir()
        try:
            ir.save(model, staging / path.name, external_data=data.name if external_data else None)
            os.replace(staging / path.name, commit.temp(path))
            if external_data:
                os.replace(staging / data.name, commit.temp(data))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        commit.commit()
    return path


def export(model: torch.nn.Module | torch.export.ExportedProgram, example_inputs: Any = None, *,
           example_kwargs: dict | None = None, adapter: Any = None, rules: Any = None, strategy: str | None = None,
           path: str | os.PathLike | None = None, dynamic_shapes: Any = AUTO, prefix: str | None = None,
           input_names: list[str] | None = None, output_names: list[str] | None = None,
           opset_version: int | None = None, external_data: bool | None = None, optimize: bool = True,
           allow_pickle: bool = False, strict: bool = False) -> ExportResult:
    """Trace ``model``, apply ``adapter``/``rules`` with ``strategy``, export to ONNX and save it to ``path``.

    ``model``: an ``nn.Module`` (with ``example_inputs`` positional args and/or ``example_kwargs``) or an
    ``ExportedProgram``. Module paths are relative to ``model`` (the model PEFT wraps), or to the
    transformers model inside a wrapper (``prefix`` overrides). ``strategy`` defaults to the rules' own
    (``merge`` for a PEFT adapter config). ``dynamic_shapes``: ``"auto"`` (every example dim may vary where
    the model allows), None (static) or a torch.export spec. Without ``path`` nothing is written.
    """
    import torch

    from lorapass.fx.api import apply
    if (isinstance(model, torch.nn.Module) and not isinstance(model, torch.fx.GraphModule)
            and example_inputs is None and example_kwargs is None):
        raise ModelError("export needs example inputs (example_inputs and/or example_kwargs) to trace the model")
    with bar(total=3, desc="export", unit="step") as steps:  # trace and rewrite, torch.onnx, save
        result = apply(model, adapter=adapter, rules=rules, strategy=strategy, example_inputs=example_inputs,
                       example_kwargs=example_kwargs, dynamic_shapes=dynamic_shapes, prefix=prefix,
                       allow_pickle=allow_pickle, strict=strict)
        steps.update()
        onnx_model = to_onnx(result, example_inputs, example_kwargs, dynamic_shapes, input_names, output_names,
                             opset_version, optimize)
        steps.update()
        inputs = input_files([result.adapter], None) if result.adapter is not None else []
        written = save(onnx_model, path, external_data, inputs) if path is not None else None
        steps.update()
    return ExportResult(onnx_model, written, result)
