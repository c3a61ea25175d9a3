"""Load an ONNX model lazily (external tensors stay on disk) and check it is safe to read."""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir

from lorapass.errors import ModelError
from lorapass.onnx.dialects import SOURCE


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load ``path`` with its weights left on disk; raise ModelError naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such ONNX file")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf and onnx_ir raise many types for a corrupt file
        raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    check_external_data(model, path)
    model.graph.meta[SOURCE] = path  # the dialect reads the files beside it (genai_config.json)
    return model


def check_external_data(model: ir.Model, path: Path) -> None:
    """Every external-data location must name an existing file inside the model's folder."""
    folder = path.resolve().parent
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = Path(tensor.location)
        target = (folder / location).resolve()
        if location.is_absolute() or folder not in target.parents:
            raise ModelError(
                f"{path}: tensor {value.name!r} points at external data {tensor.location!r} outside the model's folder"
            )
        if not target.is_file():
            raise ModelError(f"{path}: tensor {value.name!r} needs external data file {tensor.location!r}, which is missing")
        if tensor.offset is not None and tensor.length is not None and tensor.offset + tensor.length > target.stat().st_size:
            raise ModelError(f"{path}: tensor {value.name!r} reads past the end of {tensor.location!r} (truncated data file?)")
