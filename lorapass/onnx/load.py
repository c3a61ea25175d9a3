"""Load an ONNX model lazily (external tensors stay on disk) and check it is a model that is safe to read."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import onnx
import onnx_ir as ir

from lorapass.atomic import interrupted
from lorapass.errors import ModelError
from lorapass.onnx.dialects import SOURCE


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load ``path`` with its weights left on disk; raise ModelError naming the file on any problem.

    Refused: a missing, empty or unparsable file; a file a killed lorapass commit left midway; a protobuf
    without a graph or without an opset import; an initializer defined twice; a node input no node, graph input
    or initializer gives, or a cycle; a tensor (initializer of any graph, or node attribute such as a Constant's
    value) without a dtype, whose inline data does not hold its shape, or whose external data is not a file inside
    the model's folder or whose range does not hold it.
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
        proto = onnx.load_model(path, load_external_data=False)  # as ir.load does, to see its initializers first
    except Exception as exc:  # protobuf raises many types for a corrupt file
        raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    names = Counter(t.name for t in proto.graph.initializer)
    if twice := [name for name, count in names.items() if count > 1]:
        raise ModelError(f"{path}: initializer {twice[0]!r} is defined {names[twice[0]]} times (which one a reader "
                         "uses is undefined): not a valid ONNX graph")
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx_ir raises many types for a malformed graph
        raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    ir.external_data.set_base_dir(model.graph, path.parent)
    if not model.opset_imports:
        raise ModelError(f"{path}: not an ONNX model: it imports no opset")
    if len(model.graph) == 0 and not model.graph.outputs:
        raise ModelError(f"{path}: not an ONNX model: it has no graph (no nodes, no outputs)")
    for graph in model.graphs():
        check_wiring(graph, path)
    check_tensors(model, path)
    model.graph.meta[SOURCE] = path  # the dialect reads the files beside it (genai_config.json)
    return model


def check_wiring(graph: ir.Graph, path: Path) -> None:
    """Every node input of ``graph`` has a source (a node, a graph input or an initializer, of this graph or an
    enclosing one) and its nodes form no cycle; ModelError naming the node and value otherwise."""
    own = set(graph)
    seen: set[ir.Node] = set()
    waiting: dict[ir.Node, int] = {}
    ordered = True  # nodes in topological order, as exporters write them: no cycle, nothing more to check
    for node in graph:
        for value in node.inputs:
            if value is None:
                continue
            producer = value.producer()
            if producer is None and not value.is_graph_input() and not value.is_initializer():
                raise ModelError(f"{path}: {_label(node)} reads {value.name!r}, which no node, "
                                 "graph input or initializer gives")
            if producer in own:
                waiting[node] = waiting.get(node, 0) + 1
                ordered = ordered and producer in seen
        seen.add(node)
    if ordered:
        return
    ready = [node for node in graph if not waiting.get(node)]
    done = 0
    while ready:
        node = ready.pop()
        done += 1
        for reader in {user for out in node.outputs for user in out.consumers() if user in own}:
            waiting[reader] -= sum(1 for v in reader.inputs if v is not None and v.producer() is node)
            if not waiting[reader]:
                ready.append(reader)
    if done < len(own):
        stuck = next(node for node in graph if waiting.get(node))
        raise ModelError(f"{path}: its nodes form a cycle ({_label(stuck)} cannot come after its inputs): not an "
                         "ONNX graph")


def _label(node: ir.Node) -> str:
    """A node for messages: its name, else its first output's."""
    if node.name:
        return f"node {node.name!r} ({node.op_type})"
    return f"the {node.op_type} node giving {node.outputs[0].name!r}"


def _tensors(model: ir.Model):
    """(where, tensor) for every initializer of every graph and every tensor attribute of every node."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield f"tensor {value.name!r}", value.const_value
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR:
                    yield f"{_label(node)} attribute {attr.name!r}", attr.value
                elif attr.type == ir.AttributeType.TENSORS:
                    for tensor in attr.value:
                        yield f"{_label(node)} attribute {attr.name!r}", tensor


def check_tensors(model: ir.Model, path: Path) -> None:
    """Every tensor has a dtype and data that holds its shape; external data lies inside the model's folder.

    Inline raw data must be the tensor's size; an external-data location must name an existing file inside the
    folder, a ``length`` must equal the tensor's size from its shape and dtype, a missing ``length`` is that size
    (as in ONNX's own loader), and ``offset`` plus that size must not pass the end of the file.
    """
    folder = path.resolve().parent
    sizes: dict[str, int] = {}  # external data file -> its size, each location checked once
    for what, tensor in _tensors(model):
        where = f"{path}: {what}"
        if tensor.dtype == ir.DataType.UNDEFINED:
            raise ModelError(f"{where} has no data type (UNDEFINED)")
        if isinstance(tensor, ir.TensorProtoTensor):
            _check_inline(tensor, where)
        if isinstance(tensor, ir.ExternalTensor):
            _check_external(tensor, where, folder, sizes)


def _check_inline(tensor: ir.TensorProtoTensor, where: str) -> None:
    proto = tensor.raw
    if proto.HasField("raw_data"):
        if len(proto.raw_data) != tensor.nbytes:
            raise ModelError(f"{where} ({tensor.dtype.name} {list(tensor.shape)}) holds {len(proto.raw_data)} bytes "
                             f"of raw data, its shape needs {tensor.nbytes}")
    elif tensor.dtype != ir.DataType.STRING:
        try:
            tensor.numpy()
        except ValueError as exc:  # a typed data field whose length does not fit the shape
            raise ModelError(f"{where} ({tensor.dtype.name} {list(tensor.shape)}): its data does not fit its shape "
                             f"({exc})") from None


def _check_external(tensor: ir.ExternalTensor, where: str, folder: Path, sizes: dict[str, int]) -> None:
    if tensor.location not in sizes:
        if "\0" in tensor.location:
            raise ModelError(f"{where} has an external data location with a NUL byte: {tensor.location!r}")
        location = Path(tensor.location)
        target = (folder / location).resolve()
        if location.is_absolute() or folder not in target.parents:
            raise ModelError(f"{where} points at external data {tensor.location!r} outside the model's folder")
        if not target.is_file():
            raise ModelError(f"{where} needs external data file {tensor.location!r}, which is missing")
        sizes[tensor.location] = target.stat().st_size
    offset, length, size = tensor.offset or 0, tensor.length, tensor.nbytes
    if offset < 0 or (length is not None and length != size):
        raise ModelError(f"{where} ({tensor.dtype.name} {list(tensor.shape)}, {size} bytes) has external data "
                         f"offset {tensor.offset} length {length} in {tensor.location!r}: the length must be {size}")
    if offset + size > sizes[tensor.location]:
        raise ModelError(f"{where} reads past the end of {tensor.location!r} (truncated data file?)")
