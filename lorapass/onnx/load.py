"""Load an ONNX model lazily (external tensors stay on disk) and check it is a model that is safe to read."""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir

from lorapass.atomic import interrupted
from lorapass.errors import ModelError
from lorapass.onnx.dialects import SOURCE


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load ``path`` with its weights left on disk; raise ModelError naming the file on any problem.

    Refused: a missing, empty or unparsable file; a file a killed lorapass commit left midway; a protobuf
    without a graph or without an opset import; external data that is not a file inside the model's folder, or
    whose range does not hold the tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such ONNX file")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: the file is empty")
    if journals := interrupted(path):
        raise ModelError(f"{path}: a lorapass commit to it was killed midway ({journals[0].name}), so it may not "
                         "match its data files; write it again (the next write first puts the previous files back)")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf and onnx_ir raise many types for a corrupt file
        raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    if not model.opset_imports:
        raise ModelError(f"{path}: not an ONNX model: it imports no opset")
    if len(model.graph) == 0 and not model.graph.outputs:
        raise ModelError(f"{path}: not an ONNX model: it has no graph (no nodes, no outputs)")
    check_external_data(model, path)
    model.graph.meta[SOURCE] = path  # the dialect reads the files beside it (genai_config.json)
    return model


def check_external_data(model: ir.Model, path: Path) -> None:
    """Every external-data location names an existing file inside the model's folder that holds the tensor.

    A ``length`` must equal the tensor's size from its shape and dtype; a missing ``length`` is that size (as
    in ONNX's own loader), and ``offset`` plus that size must not pass the end of the file.
    """
    folder = path.resolve().parent
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        where = f"{path}: tensor {value.name!r}"
        if "\0" in tensor.location:
            raise ModelError(f"{where} has an external data location with a NUL byte: {tensor.location!r}")
        location = Path(tensor.location)
        target = (folder / location).resolve()
        if location.is_absolute() or folder not in target.parents:
            raise ModelError(f"{where} points at external data {tensor.location!r} outside the model's folder")
        if not target.is_file():
            raise ModelError(f"{where} needs external data file {tensor.location!r}, which is missing")
        offset, length, size = tensor.offset or 0, tensor.length, tensor.nbytes
        if offset < 0 or (length is not None and length != size):
            raise ModelError(f"{where} ({tensor.dtype.name} {list(tensor.shape)}, {size} bytes) has external data "
                             f"offset {tensor.offset} length {length} in {tensor.location!r}: the length must be {size}")
        if offset + size > target.stat().st_size:
            raise ModelError(f"{where} reads past the end of {tensor.location!r} (truncated data file?)")
