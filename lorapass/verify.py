"""``lorapass verify``: check a rewritten model against the base with the adapter merged by a second path.

The reference is built independently of the merge strategy: the base model is loaded with the ``onnx``
package, each targeted weight gets PEFT's formula computed by numpy in float64 from the adapter file's own
tensors (W + scale·(B @ A), DoRA's per-output rescale, LoRA's B bias, replaced weights, biases and token rows;
then cast to W's dtype), and ONNX Runtime runs it. Site naming and rule matching are shared with the pass (one
implementation of PEFT's semantics); the arithmetic and the graph writing are not.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from lorapass.adapter import Adapter, load_adapter
from lorapass.errors import ModelError
from lorapass.onnx.load import load_model
from lorapass.onnx.sites import find_sites
from lorapass.plan import Target, plan

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
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
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


def _reference_values(module, w: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(W', b') in float64, torch layout, from the module's own file tensors: PEFT's formulas written out again.

    Full tensors (a replaced weight or bias, a saved base weight) are applied first; then the low-rank delta
    (W + s·B·A; an embedding's table gains s·(B·A)ᵀ), DoRA's rescale by m / ‖W + ΔW‖ per output feature (the
    bias left alone), LoRA's B bias times s, or replaced token rows."""
    read = lambda ref: ref.read().astype(np.float64)  # noqa: E731
    full = {role: read(ref) for role, ref in module.replaced.items()}
    if module.saved_base is not None:
        full["weight"] = read(module.saved_base)
    w = full.get("weight", w)
    b = full.get("bias", b)
    if hasattr(module, "a"):  # low-rank
        a, up = read(module.a), read(module.b)
        embedding = "embedding" in module.name
        delta = module.scale * (up @ a)
        w = w + (delta.T if embedding else delta)
        if getattr(module, "magnitude", None) is not None:
            axis = 0 if embedding else 1  # the norm runs over the other axis than the output features
            g = read(module.magnitude).reshape(-1) / np.sqrt((w * w).sum(axis=axis))
            w = w * (g[None, :] if embedding else g[:, None])
        if getattr(module, "bias", None) is not None:
            b = (b if b is not None else 0.0) + module.scale * read(module.bias)
    if hasattr(module, "rows"):
        w = w.copy()
        w[module.indices] = read(module.rows)
    return w, b


def _set_bias(proto: onnx.ModelProto, tensors: dict, node: onnx.NodeProto, site, bias: np.ndarray, dtype) -> None:
    """Write the site's new bias: into its initializer (read by this node only), else as a new one the node reads,
    added after it when the layer had none."""
    graph = proto.graph
    name = f"{site.path}.bias.reference"
    graph.initializer.append(numpy_helper.from_array(bias.astype(dtype), name))
    tensors[name] = graph.initializer[-1]
    if site.bias is not None:
        reader = node if node.op_type == "Gemm" else next(n for n in graph.node if node.output[0] in n.input
                                                          and site.bias in n.input)
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


def _reference(base: Path, targets: list[Target], adapter: Adapter, folder: Path) -> Path:
    """The base with every targeted weight merged by numpy in float64, saved under ``folder``."""
    proto = onnx.load(str(base), load_external_data=True)
    tensors = {t.name: t for t in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    readers: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    behind = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Identity"}
    done: set[str] = set()
    for target in targets:
        site = target.site
        node = nodes[site.node]
        index = 0 if node.op_type == "Gather" else 1
        operand = node.input[index]
        stored = numpy_helper.to_array(tensors[site.weight])
        w = stored.astype(np.float64)
        w_torch = w if site.layout == "out_in" else w.T
        bias_name = site.bias
        while bias_name in behind:
            bias_name = behind[bias_name]
        bias_name = bias_name if bias_name in tensors else None
        b = numpy_helper.to_array(tensors[bias_name]).astype(np.float64) if bias_name else None
        merged, new_bias = _reference_values(target.module, w_torch, b)
        if new_bias is not None and (b is None or not np.array_equal(new_bias, b)):
            _set_bias(proto, tensors, node, site, new_bias, numpy_helper.to_array(tensors[bias_name]).dtype
                      if bias_name else stored.dtype)
        if operand == site.weight and readers.get(site.weight, 0) == 1:
            if site.weight in done:
                continue
            out = (merged if site.layout == "out_in" else merged.T).astype(stored.dtype)
            tensors[site.weight].CopyFrom(numpy_helper.from_array(out, site.weight))
            done.add(site.weight)
        else:  # a shared (or indirectly read) weight: give this node its own merged copy, in the layout it reads
            reads_out_in = node.op_type == "Gather" or any(att.name == "transB" and att.i == 1 for att in node.attribute)
            out = (merged if reads_out_in else merged.T).astype(stored.dtype)
            name, i = f"{site.path}.weight.reference", 1
            while name in tensors:  # one module may be computed by several nodes
                name, i = f"{site.path}.weight.reference_{i}", i + 1
            proto.graph.initializer.append(numpy_helper.from_array(out, name))
            tensors[name] = proto.graph.initializer[-1]
            node.input[index] = name
    path = folder / "reference.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, location="reference.onnx.data")
    return path


def verify(base: str | os.PathLike, rewritten: str | os.PathLike, adapter: str | os.PathLike | Adapter,
           inputs: dict[str, np.ndarray] | str | os.PathLike | None = None, tol: float = 1e-4, seed: int = 0,
           prefix: str | None = None, atol: float = 0.0) -> VerifyReport:
    """Run ``rewritten`` and the independent reference on the same inputs; compare every output.

    An output passes when max |rewritten - reference| <= atol + tol · max |reference|. Raises lorapass
    errors (ModelError, AdapterError, ...) on bad input: missing files, an adapter that does not fit the
    base, or inputs whose names, dtypes or shapes the model does not take.
    """
    if not (tol >= 0 and atol >= 0):  # also rejects NaN
        raise ValueError(f"tolerances must be >= 0 (tol={tol}, atol={atol})")
    base, rewritten = Path(base), Path(rewritten)
    adapter = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    report = find_sites(load_model(base), prefix=prefix, wanted=adapter.modules)
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
            unknown = sorted(set(feeds) - names)
            if unknown:
                raise ModelError(f"{rewritten if role == 'rewritten' else base}: has no input(s) {unknown}")
        outputs = [o.name for o in reference.get_outputs()]
        missing = sorted(set(outputs) - {o.name for o in sessions["rewritten"].get_outputs()})
        if missing:
            raise ModelError(f"{rewritten}: lacks the base model's output(s) {missing}")
        results = {role: dict(zip(outputs, s.run(outputs, feeds))) for role, s in sessions.items()}
    checks = VerifyReport(tol, atol=atol)
    for name in outputs:
        ref = results["reference"][name].astype(np.float64)
        scale = float(np.abs(ref).max()) or 1.0
        err = float(np.abs(results["rewritten"][name].astype(np.float64) - ref).max())
        moved = float(np.abs(results["base"][name].astype(np.float64) - ref).max())
        checks.outputs.append(OutputCheck(name, err, err / scale, moved / scale, err <= atol + tol * scale))
    return checks


def add_verify_parser(subparsers) -> None:
    p = subparsers.add_parser("verify", help="compare a rewritten model with the base merged by an independent numpy path")
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


def _tolerance(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _cmd_verify(args) -> int:
    import json
    import sys

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
