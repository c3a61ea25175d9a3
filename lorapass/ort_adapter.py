"""ONNX Runtime adapters: write a PEFT adapter in onnxruntime's adapter format for a dynamic graph,
and a session helper that runs a rewritten model with a chosen adapter (hot swap, no reload)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lorapass.adapter import Adapter, load_adapter
from lorapass.atomic import Transaction
from lorapass.errors import AdapterError, ModelError, ShapeMismatchError
from lorapass.onnx.dynamic import METADATA_KEY
from lorapass.onnx.load import load_model
from lorapass.provenance import input_files

_DTYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


def _slot_names(graph: ir.Model, model: str | os.PathLike) -> set[str]:
    """The LoRA input names the ``lorapass.lora`` record lists; ModelError if it is missing or malformed."""
    text = graph.metadata_props.get(METADATA_KEY)
    if text is None:
        raise ModelError(f"{model}: not a lorapass dynamic graph (no {METADATA_KEY!r} metadata)")
    try:
        records = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ModelError(f"{model}: metadata {METADATA_KEY!r} is not valid JSON ({exc})") from None
    if not isinstance(records, list) or not all(
            isinstance(r, dict) and isinstance(r.get("lora_A"), str) and isinstance(r.get("lora_B"), str) for r in records):
        raise ModelError(f"{model}: metadata {METADATA_KEY!r} must be a JSON list of slot records, each with "
                         "string 'lora_A' and 'lora_B' input names")
    names = {n for r in records for n in (r["lora_A"], r["lora_B"])}
    missing = sorted(names - {v.name for v in graph.graph.inputs})
    if missing:
        raise ModelError(f"{model}: metadata {METADATA_KEY!r} lists LoRA inputs the graph does not have: {missing[:4]}")
    return names


def lora_inputs(model: str | os.PathLike, graph: ir.Model | None = None) -> dict[str, tuple[list[int | str], np.dtype]]:
    """The LoRA graph inputs of a dynamic model: name -> (dims, dtype), from its ``lorapass.lora`` record."""
    graph = graph if graph is not None else load_model(model)
    names = _slot_names(graph, model)
    out = {}
    for value in graph.graph.inputs:
        if value.name in names:
            dims = [d if isinstance(d, int) else str(d.value) for d in (value.shape or [])]
            out[value.name] = (dims, np.dtype(_DTYPES.get(value.dtype, np.float32)))
    return out


def adapter_parameters(adapter: Adapter, model: str | os.PathLike, graph: ir.Model | None = None) -> dict[str, np.ndarray]:
    """The adapter's A [in, r] and scale·B [r, out] keyed by the graph's input names, checked against them.

    Uses the graph's own ``lorapass.lora`` record for which module paths have slots and the adapter's
    config for each module's rank and scale (rank_pattern / alpha_pattern / rslora as PEFT resolves them).
    """
    slots = lora_inputs(model, graph)
    params: dict[str, np.ndarray] = {}
    unknown = []
    for module in adapter.modules:
        a_name, b_name = f"{module}.lora_A", f"{module}.lora_B"
        if a_name not in slots or b_name not in slots:
            unknown.append(module)
            continue
        p = adapter.rule.params(module)
        a, b = adapter.tensor(module, "lora_A"), adapter.tensor(module, "lora_B")
        arrays = {a_name: a.T, b_name: (b * np.float32(p.scale)).T}
        for name, array in arrays.items():
            dims, dtype = slots[name]
            fixed = [(i, d) for i, d in enumerate(dims) if isinstance(d, int)]
            if array.ndim != len(dims) or any(array.shape[i] != d for i, d in fixed):
                raise ShapeMismatchError(
                    f"{adapter.directory}: {adapter.key(module, name.rsplit('.', 1)[1])} gives {name} shape "
                    f"{list(array.shape)}, the graph input {name!r} is {dims}")
            params[name] = np.ascontiguousarray(array, dtype=dtype)
    if unknown:
        names = sorted(slots)
        raise AdapterError(
            f"{adapter.directory}: {len(unknown)} adapter module(s) have no LoRA input in {model}: "
            + ", ".join(f"{m!r} (expects inputs {m}.lora_A/.lora_B)" for m in unknown[:5])
            + f"; the graph's LoRA inputs are e.g. {names[:4]}")
    return params


def export_adapter(adapter_dir: str | os.PathLike | Adapter, model: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write ``output`` (.onnx_adapter) holding the adapter's weights for the dynamic graph ``model``."""
    import onnxruntime as ort

    adapter = adapter_dir if isinstance(adapter_dir, Adapter) else load_adapter(adapter_dir)
    graph = load_model(model)
    params = adapter_parameters(adapter, model, graph)
    fmt = ort.AdapterFormat()
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    output, model = Path(output), Path(model)
    data = {model.parent / v.const_value.location for v in graph.graph.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)}
    with Transaction([output], [model, *data, *input_files(adapter, None)]) as commit:
        try:
            fmt.export_adapter(str(commit.temp(output)))
        except RuntimeError as exc:  # onnxruntime reports I/O failures as RuntimeError
            raise OSError(f"{output}: onnxruntime could not write the adapter ({exc})") from exc
        commit.commit()
    return output


class Session:
    """A dynamic LoRA model loaded once in ONNX Runtime, run with any of several adapters (or none).

    ``Session(model).add_adapter("support", "support.onnx_adapter")`` then ``run(feeds, adapter="support")``.
    Adapters are memory-mapped ONNX Runtime adapter files; switching costs nothing but the run itself.
    """

    def __init__(self, model: str | os.PathLike, providers: list[str] | None = None, **session_options) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # LoRA weights are graph inputs on purpose: silence ORT's warning
        for key, value in session_options.items():
            setattr(options, key, value)
        self.model = Path(model)
        self.session = ort.InferenceSession(str(model), options, providers=providers or ["CPUExecutionProvider"])
        self.adapters: dict[str, object] = {}

    def add_adapter(self, name: str, path: str | os.PathLike) -> None:
        import onnxruntime as ort

        if not Path(path).is_file():
            raise AdapterError(f"{path}: no such ONNX Runtime adapter file")
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        self.adapters[name] = adapter

    def run(self, feeds: dict[str, np.ndarray], adapter: str | None = None, outputs: list[str] | None = None) -> list[np.ndarray]:
        """Run with the named adapter active (None: the graph's default LoRA weights)."""
        import onnxruntime as ort

        options = ort.RunOptions()
        if adapter is not None:
            if adapter not in self.adapters:
                raise AdapterError(f"no adapter named {adapter!r}; added: {sorted(self.adapters)}")
            options.add_active_adapter(self.adapters[adapter])
        return self.session.run(outputs, feeds, options)
