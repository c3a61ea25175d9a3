"""ONNX Runtime adapters: write adapters (PEFT directories, kohya / LyCORIS / diffusers files, or a weighted blend
of several) in onnxruntime's adapter format for a dynamic graph, and a session helper that runs a rewritten model
with a chosen adapter (hot swap, no reload)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx

from lorapass.errors import AdapterError, ModelError
from lorapass.onnx.slots import METADATA_KEY, SITES_KEY, Slot, from_record

_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


def slots_of(model: str | os.PathLike) -> tuple[list[Slot], dict[str, np.dtype], list[str]]:
    """The slots of a dynamic model (from its ``lorapass.lora`` records), its input dtypes by name, and the site
    paths of its base (``lorapass.sites``; the slot paths for graphs written before that record existed)."""
    proto = onnx.load(str(model), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in meta:
        raise ModelError(f"{model}: not a lorapass dynamic graph (no {METADATA_KEY!r} metadata)")
    slots = [from_record(rec) for rec in json.loads(meta[METADATA_KEY])]
    dtypes = {v.name: np.dtype(_DTYPES.get(v.type.tensor_type.elem_type, np.float32)) for v in proto.graph.input}
    paths = json.loads(meta[SITES_KEY]) if SITES_KEY in meta else [slot.path for slot in slots]
    return slots, dtypes, paths


def bind_to(adapter, model: str | os.PathLike, component: str | None = None, strict: bool = False,
            unet_config: str | os.PathLike | None = None) -> list:
    """``adapter`` (one or several: Adapter, path or ``PATH:WEIGHT``) loaded, single files bound to the site paths
    of the dynamic graph ``model``'s base (see :func:`lorapass.formats.names.bind`)."""
    from lorapass.formats.names import bind
    from lorapass.formats.sgm import UnetLayout
    from lorapass.onnx.rewrite import as_adapters

    _, _, paths = slots_of(model)
    layout = UnetLayout.from_config(unet_config) if unet_config is not None else None
    return [bind(a, paths, component, layout, strict) for a in as_adapters(adapter)]


def adapter_parameters(adapter, model: str | os.PathLike, component: str | None = None, strict: bool = False,
                       unet_config: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The adapters' values for the dynamic graph's slot inputs (each slot says how, and checks the shapes).

    ``adapter`` is one adapter or several (Adapter, path or ``PATH:WEIGHT``); several on one slot become one blend
    (ranks concatenated, each file's weight and scale folded in). Single files are bound to the base's site paths
    first (``component``, ``strict``, ``unet_config`` as for rewrite). Uses the graph's own ``lorapass.lora``
    records for which module paths have slots and each module's own rank and scale (for PEFT: rank_pattern /
    alpha_pattern / rslora as PEFT resolves them). Slots whose defaults are another adapter's weights and that
    these adapters leave out get zeros, so the file alone decides the run.
    """
    from lorapass.kinds import Blend

    slots, dtypes, _ = slots_of(model)
    adapters = bind_to(adapter, model, component, strict, unet_config)
    by_path = {slot.path: slot for slot in slots}
    modules: dict[str, list] = {}
    for a in adapters:
        unknown = [m for m in a.modules if m not in by_path]
        if unknown:
            names = sorted(i.name for slot in slots for i in slot.inputs())
            raise AdapterError(
                f"{a.source}: {len(unknown)} adapter module(s) have no LoRA input in {model}: "
                + ", ".join(f"{m!r} (expects inputs {m}.lora_A/.lora_B)" for m in unknown[:5])
                + f"; the graph's LoRA inputs are e.g. {names[:4]}")
        for path, kind in a.modules.items():
            modules.setdefault(path, []).append(kind)
    params: dict[str, np.ndarray] = {}
    for path, slot in by_path.items():
        kinds = modules.get(path)
        if kinds is None and slot.record.get("default") != "adapter":
            continue
        kind = None if kinds is None else kinds[0] if len(kinds) == 1 else Blend(kinds)
        for name, array in slot.values(kind).items():
            params[name] = np.ascontiguousarray(array, dtype=dtypes.get(name, np.float32))
    return params


def export_adapter(adapter_dir, model: str | os.PathLike, output: str | os.PathLike, component: str | None = None,
                   strict: bool = False, unet_config: str | os.PathLike | None = None) -> Path:
    """Write ``output`` (.onnx_adapter) holding the adapter's (or several adapters' blended) weights for the dynamic
    graph ``model`` (see :func:`adapter_parameters`)."""
    import onnxruntime as ort

    params = adapter_parameters(adapter_dir, model, component, strict, unet_config)
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
