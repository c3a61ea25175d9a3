"""ONNX Runtime adapters: write a PEFT adapter in onnxruntime's adapter format for a dynamic graph,
and a session helper that runs a rewritten model with a chosen adapter (hot swap, no reload)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx

from lorapass.adapter import Adapter, load_adapter
from lorapass.errors import AdapterError, ModelError
from lorapass.onnx.slots import METADATA_KEY, Slot, from_record

_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


def slots_of(model: str | os.PathLike) -> tuple[list[Slot], dict[str, np.dtype]]:
    """The slots of a dynamic model (from its ``lorapass.lora`` records) and its input dtypes by name."""
    proto = onnx.load(str(model), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in meta:
        raise ModelError(f"{model}: not a lorapass dynamic graph (no {METADATA_KEY!r} metadata)")
    slots = [from_record(rec) for rec in json.loads(meta[METADATA_KEY])]
    dtypes = {v.name: np.dtype(_DTYPES.get(v.type.tensor_type.elem_type, np.float32)) for v in proto.graph.input}
    return slots, dtypes


def adapter_parameters(adapter: Adapter, model: str | os.PathLike, aliases: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """The adapter's values for the dynamic graph's slot inputs (each slot says how, and checks the shapes).

    Uses the graph's own ``lorapass.lora`` records for which module paths have slots and each adapter module's
    own rank and scale (for PEFT: rank_pattern / alpha_pattern / rslora as PEFT resolves them). ``aliases``
    (graph components -> the adapter's) rename the slots' paths to the adapter's module names.
    """
    from lorapass.onnx.dialects import Dialect

    rename = Dialect("alias", aliases=aliases or {}).module_path
    slots, dtypes = slots_of(model)
    by_path = {rename(path): (slot, path) for slot in slots for path in slot.paths}
    unknown = [m for m in adapter.modules if m not in by_path]
    if unknown:
        names = sorted(i.name for slot in slots for i in slot.inputs())
        raise AdapterError(
            f"{adapter.source}: {len(unknown)} adapter module(s) have no LoRA input in {model}: "
            + ", ".join(f"{m!r} (expects inputs {m}.lora_A/.lora_B)" for m in unknown[:5])
            + f"; the graph's LoRA inputs are e.g. {names[:4]}")
    params: dict[str, np.ndarray] = {}
    for slot in slots:
        modules = {path: adapter.modules[rename(path)] for path in slot.paths if rename(path) in adapter.modules}
        if not modules:
            continue
        for name, array in slot.values_for(modules).items():
            params[name] = np.ascontiguousarray(array, dtype=dtypes.get(name, np.float32))
    return params


def export_adapter(adapter_dir: str | os.PathLike | Adapter, model: str | os.PathLike, output: str | os.PathLike,
                   aliases: dict[str, str] | None = None) -> Path:
    """Write ``output`` (.onnx_adapter) holding the adapter's weights for the dynamic graph ``model``."""
    import onnxruntime as ort

    adapter = adapter_dir if isinstance(adapter_dir, Adapter) else load_adapter(adapter_dir)
    params = adapter_parameters(adapter, model, aliases)
    fmt = ort.AdapterFormat()
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        fmt.export_adapter(str(tmp))
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
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
