"""``lorapass verify``: check a rewritten model against the base with the adapter merged by a second path.

The reference is built independently of the merge strategy: the base model is loaded with the ``onnx``
package, each targeted weight gets PEFT's formula computed by numpy in float64 from the adapter file's own
tensors (W + scale·(B @ A), DoRA's per-output rescale, LoRA's B bias, replaced weights, biases and token rows;
then cast to W's dtype; a quantized weight is dequantized first by :mod:`lorapass.dequant` and the node computes
with the float merged weight), and ONNX Runtime runs it. Site naming and rule matching are shared with the pass (one
implementation of PEFT's semantics); the arithmetic and the graph writing are not.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from lorapass import dequant
from lorapass.adapter import Adapter, load_adapter
from lorapass.errors import ModelError, UnsupportedError
from lorapass.onnx.load import load_model
from lorapass.onnx.sites import find_sites
from lorapass.plan import Target, plan
from lorapass.progress import bar

SYMBOLIC_SIZES = (2, 7)  # a symbolic dimension gets 2 first (batch), 7 after (sequence)


@dataclass
class OutputCheck:
    """One output compared with the reference."""

    name: str
    max_abs: float
    max_rel: float
    changed_from_base: float  # max |reference - base| / max |reference|: does the adapter do anything?
    passed: bool


@dataclass
class VerifyReport:
    tolerance: float  # rtol: allowed max |error| as a fraction of max |reference|
    outputs: list[OutputCheck] = field(default_factory=list)
    atol: float = 0.0  # added to tolerance·max |reference|: an output passes when max_abs <= atol + rtol·max|ref|

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "tolerance": self.tolerance, "rtol": self.tolerance, "atol": self.atol,
                "outputs": [asdict(o) for o in self.outputs]}


def _session(path: Path):
    """An ORT session computing as the graph says: blocked int4 QDQ weights are fused into MatMulNBits in float
    (ORT's default fuses them with int8 activations, which no float reference reproduces)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


_VALUE_PRESERVING = {"Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten", "Expand"}


def gather_rows(model: onnx.ModelProto, name: str) -> int | None:
    """The row count of the smallest constant table ``name`` indexes (through reshapes and casts), if any."""
    constants = {t.name: t.dims[0] for t in model.graph.initializer if t.dims}
    for node in model.graph.node:  # tables shared through Identity keep their size
        if node.op_type == "Identity" and node.input[0] in constants:
            constants[node.output[0]] = constants[node.input[0]]
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i, value in enumerate(node.input):
            consumers.setdefault(value, []).append((node, i))
    rows, todo, seen = [], [name], set()
    while todo:
        value = todo.pop()
        if value in seen:
            continue
        seen.add(value)
        for node, i in consumers.get(value, []):
            if node.op_type == "Gather" and i == 1 and node.input[0] in constants:
                rows.append(constants[node.input[0]])
            elif node.op_type in _VALUE_PRESERVING and i == 0:
                todo.extend(node.output)
    return min(rows) if rows else None


def random_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for the model's real inputs: token ids within the vocabulary of the table they index, floats ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    initializers = {t.name: t for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        t = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else SYMBOLIC_SIZES[min(i, 1)] for i, d in enumerate(t.shape.dim)]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if np.issubdtype(dtype, np.integer):
            feeds[value.name] = rng.integers(0, gather_rows(model, value.name) or 2, shape).astype(dtype)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def check_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Feeds that fit ``model``'s inputs (ModelError naming the input otherwise); lossless integer widening is done."""
    initializers = {t.name: t for t in model.graph.initializer}
    declared = {v.name: v for v in model.graph.input}
    unknown = sorted(set(feeds) - set(declared))
    if unknown:
        raise ModelError(f"{where}: input(s) {unknown} are not inputs of the model (it has {sorted(set(declared) - set(initializers))})")
    missing = sorted(n for n in declared if n not in initializers and n not in feeds)
    if missing:
        raise ModelError(f"{where}: no array for the model's input(s) {missing}")
    out = {}
    for name, array in feeds.items():
        t = declared[name].type.tensor_type
        want = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
        array = np.asarray(array)
        if array.dtype != want:
            integral = np.issubdtype(array.dtype, np.integer) and np.issubdtype(want, np.integer)
            if not (integral and np.can_cast(array.dtype, want, "safe")):
                raise ModelError(f"{where}: input {name!r} is {array.dtype}, the model needs {want}")
            array = array.astype(want)
        if t.HasField("shape"):
            dims = t.shape.dim
            if array.ndim != len(dims):
                raise ModelError(f"{where}: input {name!r} has shape {list(array.shape)}, the model needs {len(dims)} dimensions")
            for axis, (size, d) in enumerate(zip(array.shape, dims)):
                if d.HasField("dim_value") and d.dim_value != size:
                    raise ModelError(f"{where}: input {name!r} has size {size} on axis {axis}, the model needs {d.dim_value}")
        if np.issubdtype(want, np.integer) and array.size:
            rows = gather_rows(model, name)
            if rows and (array.min() < -rows or array.max() >= rows):
                raise ModelError(f"{where}: input {name!r} holds ids in [{array.min()}, {array.max()}], "
                                 f"outside the embedding table of {rows} rows")
        out[name] = array
    return out


def _reference_rows(module, w: np.ndarray, rows: slice) -> np.ndarray:
    """The new ``rows`` of the module's weight (float64, torch layout) from those rows ``w`` of its current weight,
    computed from the module's own file tensors: PEFT's formulas written out again. A full tensor (replaced or
    saved base weight) comes first; then the low-rank delta (W + s·B·A; an embedding's table gains s·(B·A)ᵀ) and
    DoRA's rescale by m / ‖W + ΔW‖ per output feature, or the replaced token rows."""
    read = lambda ref: ref.read().astype(np.float64)  # noqa: E731
    full = module.replaced.get("weight") or module.saved_base
    w = read(full)[rows] if full is not None else w
    if hasattr(module, "a"):  # low-rank
        embedding = "embedding" in module.name
        delta = module.scale * (read(module.b) @ read(module.a))
        w = w + (delta.T if embedding else delta)[rows]
        if getattr(module, "magnitude", None) is not None:
            norm = np.sqrt((w * w).sum(axis=0 if embedding else 1))  # over the axis that is not the outputs
            g = read(module.magnitude).reshape(-1)
            w = w * (g / norm)[None, :] if embedding else w * (g[rows] / norm)[:, None]
    if hasattr(module, "rows"):
        w = w.copy()
        w[module.indices] = read(module.rows)
    return w


def _reference_bias(module, b: np.ndarray | None) -> np.ndarray | None:
    """The module's new bias (float64): a replaced one, plus s times LoRA's B bias; None when it keeps the graph's."""
    replaced = module.replaced.get("bias")
    new = replaced.read().astype(np.float64) if replaced is not None else b
    if getattr(module, "bias", None) is not None:
        new = (new if new is not None else 0.0) + module.scale * module.bias.read().astype(np.float64)
    return None if new is b else new


def _set_bias(proto: onnx.ModelProto, tensors: dict, node: onnx.NodeProto, site, bias: np.ndarray, dtype) -> None:
    """Give the site its new bias as a new initializer: read where its old bias was, else added after the node
    (or as a Gemm's C) when the layer had none."""
    graph = proto.graph
    name = f"{site.path}.bias.reference"
    graph.initializer.append(numpy_helper.from_array(bias.astype(dtype), name))
    tensors[name] = graph.initializer[-1]
    if site.bias is not None:
        reader = node if site.bias in node.input else next(n for n in graph.node if node.output[0] in n.input
                                                           and site.bias in n.input)  # a Gemm's C, a norm's B
        reader.input[list(reader.input).index(site.bias)] = name
        return
    if node.op_type == "Gemm":
        node.input.append(name)
        return
    out, biased = node.output[0], f"{node.output[0]}.reference_biased"
    for other in graph.node:
        for i, value in enumerate(other.input):
            if value == out:
                other.input[i] = biased
    for output in graph.output:
        if output.name == out:
            output.name = biased
    position = list(graph.node).index(node) + 1
    graph.node.insert(position, onnx.helper.make_node("Add", [out, name], [biased], name=f"{site.path}/bias/reference_Add"))


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and every subgraph in it (If / Loop / Scan bodies)."""
    out = [graph]
    for node in graph.node:
        for att in node.attribute:
            for sub in ([att.g] if att.type == onnx.AttributeProto.GRAPH else list(att.graphs)):
                out += _graphs(sub)
    return out


def _placements(site) -> list[tuple[str, str, str, slice, slice]]:
    """(node, weight, layout, rows of the weight, rows of the module) for each weight a site's module lives in."""
    views = getattr(site.storage, "parts", [site.storage])
    out, at = [], 0
    for view in views:
        rows = view.shape[0]
        out.append((view.node.name or "", view.store.name, view.store.layout, view.rows, slice(at, at + rows)))
        at += rows
    return out


def _reference(base: Path, targets: list[Target], adapter: Adapter, folder: Path) -> Path:
    """The base with every targeted weight merged by numpy in float64, saved under ``folder``."""
    proto = onnx.load(str(base), load_external_data=True)
    graphs = _graphs(proto.graph)
    tensors = {t.name: t for g in graphs for t in g.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    readers: dict[str, int] = {}
    for graph in graphs:
        for node in graph.node:
            for name in node.input:
                readers[name] = readers.get(name, 0) + 1
    behind = {n.output[0]: n.input[0] for g in graphs for n in g.node if n.op_type == "Identity"}
    edits: dict[str, list[tuple[str, str, slice, Callable, str]]] = {}
    quantized: dict[str, np.ndarray] = {}  # quantized node -> its merged float64 weight [out, in]
    for target in bar(targets, desc="reference merge", unit="site"):
        site = target.site
        for node, weight, layout, rows, module_rows in _placements(site):
            edit = lambda w, m=target.module, r=module_rows: _reference_rows(m, w, r)  # noqa: E731
            if _dequantizer(proto, nodes[node]) is not None:  # a quantized weight: this node computes in float
                if node not in quantized:
                    quantized[node] = _dequantized(proto, nodes[node], tensors)
                quantized[node][rows] = edit(quantized[node][rows])
                continue
            edits.setdefault(weight, []).append((node, layout, rows, edit, site.path))
        bias_name = site.bias
        while bias_name in behind:
            bias_name = behind[bias_name]
        old = numpy_helper.to_array(tensors[bias_name]) if bias_name in tensors else None
        new = _reference_bias(target.module, None if old is None else old.astype(np.float64))
        if new is not None:
            dtype = old.dtype if old is not None else numpy_helper.to_array(tensors[site.weight]).dtype
            _set_bias(proto, tensors, nodes[site.node], site, new, dtype)
    for weight, items in edits.items():
        w = numpy_helper.to_array(tensors[weight])
        layout = items[0][1]
        blocks = {(r.start, r.stop, p): (r, e) for _, _, r, e, p in items}  # If branches repeat one edit
        counts = [sum((r.start, r.stop, p) == key for _, _, r, _, p in items) for key in blocks]
        one_each = len({key[:2] for key in blocks}) == len(blocks)  # no rows edited by two modules
        if one_each and all(c == readers.get(weight, 0) for c in counts):  # every reader edited alike: in place
            merged = w.astype(np.float64) if layout == "out_in" else w.T.astype(np.float64)
            for r, e in blocks.values():
                merged[r] = e(merged[r])
            merged = (merged if layout == "out_in" else merged.T).astype(w.dtype)
            tensors[weight].CopyFrom(numpy_helper.from_array(merged, weight))
            continue
        for node_name in dict.fromkeys(n for n, *_ in items):  # a shared weight: each node its own copy
            node = nodes[node_name]
            w_out_in = w.astype(np.float64) if layout == "out_in" else w.T.astype(np.float64)
            for n, _, r, e, _ in items:
                if n == node_name:
                    w_out_in[r] = e(w_out_in[r])
            gather = node.op_type == "Gather"  # reads its table [rows, dim] as input 0
            reads_out_in = gather or any(att.name == "transB" and att.i == 1 for att in node.attribute)
            merged = (w_out_in if reads_out_in or w.ndim == 1 else w_out_in.T).astype(w.dtype)
            name, i = f"{weight}.reference", 1
            while name in tensors:
                name, i = f"{weight}.reference_{i}", i + 1
            proto.graph.initializer.append(numpy_helper.from_array(merged, name))
            tensors[name] = proto.graph.initializer[-1]
            node.input[_operand(node, weight, behind)] = name
    for name, w in quantized.items():
        _float_weight(proto, nodes[name], w, tensors)
    path = folder / "reference.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, location="reference.onnx.data")
    return path


def _operand(node: onnx.NodeProto, weight: str, behind: dict[str, str]) -> int:
    """The index of the input through which ``node`` reads ``weight`` (directly or through Identity nodes)."""
    for i, name in enumerate(node.input):
        while name != weight and name in behind:
            name = behind[name]
        if name == weight:
            return i
    return 0 if node.op_type == "Gather" else 1


def _producers(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: n for n in proto.graph.node for out in n.output}


def _dequantizer(proto: onnx.ModelProto, node: onnx.NodeProto) -> tuple[onnx.NodeProto, int] | None:
    """(the node that dequantizes ``node``'s weight, Transposes between them) for a quantized linear, else None."""
    if node.op_type == "MatMulNBits":
        return node, 0
    producers, value, flips = _producers(proto), node.input[1] if len(node.input) > 1 else "", 0
    while value in producers and producers[value].op_type in ("Identity", "Transpose"):
        flips += producers[value].op_type == "Transpose"
        value = producers[value].input[0]
    producer = producers.get(value)
    return (producer, flips) if producer is not None and producer.op_type == "DequantizeLinear" else None


def _dequantized(proto: onnx.ModelProto, node: onnx.NodeProto, tensors) -> np.ndarray:
    """A quantized linear's weight [out, in] in float64, dequantized by :mod:`lorapass.dequant`."""
    dq, flips = _dequantizer(proto, node)
    arrays = {name: numpy_helper.to_array(tensors[name]) for name in dq.input if name in tensors}
    if dq is node:
        return dequant.matmul_nbits(node, arrays)
    w = dequant.dequantize_linear(dq, arrays)
    w = w.T if flips % 2 else w  # the operand as the node reads it
    trans_b = any(att.name == "transB" and att.i == 1 for att in node.attribute)
    return w if node.op_type == "Gemm" and trans_b else w.T


def _float_weight(proto: onnx.ModelProto, node: onnx.NodeProto, w: np.ndarray, tensors) -> None:
    """Make the quantized linear ``node`` compute with the float weight ``w`` [out, in] (in its activation's type)."""
    dq, _ = _dequantizer(proto, node)
    dtype = numpy_helper.to_array(tensors[dq.input[2 if dq is node else 1]]).dtype  # the scales' float type
    name = f"{node.name}.weight.reference"
    if dq is node:  # MatMulNBits -> MatMul (+ its bias input as an Add)
        bias = node.input[5] if len(node.input) > 5 and node.input[5] else None
        proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T).astype(dtype), name))
        output = node.output[0]
        inputs = [node.input[0], name]
        node.ClearField("attribute")
        del node.input[:]
        node.input.extend(inputs)
        node.op_type, node.domain = "MatMul", ""
        if bias:
            node.output[0] = f"{output}.reference"
            index = list(proto.graph.node).index(node)
            proto.graph.node.insert(index + 1, onnx.helper.make_node("Add", [node.output[0], bias], [output],
                                                                     name=f"{node.name}/bias"))
        return
    trans_b = node.op_type == "Gemm" and any(att.name == "transB" and att.i == 1 for att in node.attribute)
    stored = np.ascontiguousarray(w if trans_b else w.T).astype(dtype)
    proto.graph.initializer.append(numpy_helper.from_array(stored, name))
    node.input[1] = name


def verify(base: str | os.PathLike, rewritten: str | os.PathLike, adapter: str | os.PathLike | Adapter,
           inputs: dict[str, np.ndarray] | str | os.PathLike | None = None, tol: float = 1e-4, seed: int = 0,
           prefix: str | None = None, atol: float = 0.0, aliases: dict[str, str] | None = None) -> VerifyReport:
    """Run ``rewritten`` and the independent reference on the same inputs; compare every output.

    An output passes when max |rewritten - reference| <= atol + tol · max |reference|. Raises lorapass
    errors (ModelError, AdapterError, ...) on bad input: missing files, an adapter that does not fit the
    base, or inputs whose names, dtypes or shapes the model does not take.
    """
    if not (tol >= 0 and atol >= 0):  # also rejects NaN
        raise ValueError(f"tolerances must be >= 0 (tol={tol}, atol={atol})")
    base, rewritten = Path(base), Path(rewritten)
    adapter = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    if adapter.namespace is not None:
        raise UnsupportedError(f"{adapter.source}: verify's independent reference reads PEFT adapter directories; "
                               f"check a {adapter.format} file against the library that made it")
    report = find_sites(load_model(base), prefix=prefix, wanted=adapter.modules, aliases=aliases)
    targets = plan(report.sites, adapter.rule, report.output_heads, adapter)
    load_model(rewritten)  # typed errors for a missing or corrupt file
    base_proto = onnx.load(str(base), load_external_data=False)
    if inputs is None:
        feeds = random_inputs(base_proto, seed)
    elif isinstance(inputs, dict):
        feeds = check_feeds(base_proto, inputs, "inputs")
    else:
        if not Path(inputs).is_file():
            raise ModelError(f"{inputs}: no such inputs file")
        try:
            with np.load(inputs, allow_pickle=False) as npz:
                feeds = {k: npz[k] for k in npz.files}
        except Exception as exc:  # zipfile, pickle and format errors: the file is not a plain .npz
            raise ModelError(f"{inputs}: not a readable .npz of arrays ({type(exc).__name__}: {exc})") from exc
        feeds = check_feeds(base_proto, feeds, str(inputs))
    with tempfile.TemporaryDirectory() as tmp:
        reference = _session(_reference(base, targets, adapter, Path(tmp)))
        sessions = {"base": _session(base), "rewritten": _session(rewritten), "reference": reference}
        for role, session in sessions.items():
            names = {i.name for i in session.get_inputs()}
            unknown, needed = sorted(set(feeds) - names), sorted(names - set(feeds))
            if unknown:
                raise ModelError(f"{rewritten if role == 'rewritten' else base}: has no input(s) {unknown}")
            if needed:  # a multi graph's lora_ids: which row runs which adapter is no base model's input
                raise UnsupportedError(f"{rewritten}: needs input(s) {needed} the base model does not have; verify "
                                       "compares merge and dynamic rewrites with the base")
        outputs = [o.name for o in reference.get_outputs()]
        missing = sorted(set(outputs) - {o.name for o in sessions["rewritten"].get_outputs()})
        if missing:
            raise ModelError(f"{rewritten}: lacks the base model's output(s) {missing}")
        runs = bar(sessions.items(), desc="running", unit="model")
        results = {role: dict(zip(outputs, s.run(outputs, feeds))) for role, s in runs}
    checks = VerifyReport(tol, atol=atol)
    for name in outputs:
        ref = results["reference"][name].astype(np.float64)
        scale = float(np.abs(ref).max()) or 1.0
        err = float(np.abs(results["rewritten"][name].astype(np.float64) - ref).max())
        moved = float(np.abs(results["base"][name].astype(np.float64) - ref).max())
        checks.outputs.append(OutputCheck(name, err, err / scale, moved / scale, err <= atol + tol * scale))
    return checks
