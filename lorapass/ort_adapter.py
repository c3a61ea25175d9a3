"""ONNX Runtime adapters: write adapters (PEFT directories, kohya / LyCORIS / diffusers files, or a weighted blend
of several) in onnxruntime's adapter format for a dynamic graph, and a session helper that runs a rewritten model
with a chosen adapter (hot swap, no reload)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lorapass.adapter import Adapter
from lorapass.atomic import Transaction
from lorapass.errors import AdapterError, ModelError
from lorapass.onnx.load import load_model
from lorapass.onnx.slots import METADATA_KEY, SITES_KEY, Slot, from_record
from lorapass.provenance import input_files

_DTYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


def slots_of(model: str | os.PathLike, graph: ir.Model | None = None) -> tuple[list[Slot], dict[str, np.dtype]]:
    """The slots of a dynamic model (rebuilt from its ``lorapass.lora`` records) and its input dtypes by name;
    ModelError if the records are missing, malformed, or name inputs the graph does not have."""
    graph = graph if graph is not None else load_model(model)
    text = graph.metadata_props.get(METADATA_KEY)
    if text is None:
        raise ModelError(f"{model}: not a lorapass dynamic graph (no {METADATA_KEY!r} metadata)")
    try:
        records = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ModelError(f"{model}: metadata {METADATA_KEY!r} is not valid JSON ({exc})") from None
    try:
        if not isinstance(records, list):
            raise TypeError("not a list")
        slots = [from_record(rec) for rec in records]
        names = {i.name for slot in slots for i in slot.inputs()}
    except (TypeError, KeyError, AttributeError) as exc:
        raise ModelError(f"{model}: metadata {METADATA_KEY!r} must be a JSON list of slot records ({exc!r})") from None
    dtypes = {v.name: np.dtype(_DTYPES.get(v.dtype, np.float32)) for v in graph.graph.inputs}
    missing = sorted(names - set(dtypes))
    if missing:
        raise ModelError(f"{model}: metadata {METADATA_KEY!r} lists LoRA inputs the graph does not have: {missing[:4]}")
    return slots, dtypes


def site_paths(model: str | os.PathLike, graph: ir.Model) -> list[str]:
    """The site paths of a dynamic model's base (``lorapass.sites``; its slot paths for graphs written before)."""
    text = graph.metadata_props.get(SITES_KEY)
    if text is None:
        return [path for slot in slots_of(model, graph)[0] for path in slot.paths]
    try:
        paths = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ModelError(f"{model}: metadata {SITES_KEY!r} is not valid JSON ({exc})") from None
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ModelError(f"{model}: metadata {SITES_KEY!r} must be a JSON list of site paths")
    return paths


def bind_to(adapter, model: str | os.PathLike, component: str | None = None, strict: bool = False,
            unet_config: str | os.PathLike | None = None, graph: ir.Model | None = None) -> list[Adapter]:
    """``adapter`` (one or several: Adapter, path or ``PATH:WEIGHT``) loaded, single files bound to the site paths
    of the dynamic graph ``model``'s base (see :func:`lorapass.formats.names.bind`)."""
    from lorapass.formats.names import bind
    from lorapass.formats.sgm import UnetLayout
    from lorapass.onnx.rewrite import as_adapters

    paths = site_paths(model, graph if graph is not None else load_model(model))
    layout = UnetLayout.from_config(unet_config) if unet_config is not None else None
    return [bind(a, paths, component, layout, strict) for a in as_adapters(adapter)]


def adapter_parameters(adapter, model: str | os.PathLike, graph: ir.Model | None = None,
                       aliases: dict[str, str] | None = None, component: str | None = None, strict: bool = False,
                       unet_config: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The adapters' values for the dynamic graph's slot inputs (each slot says how, and checks the shapes).

    ``adapter`` is one adapter or several (Adapter, path or ``PATH:WEIGHT``); several on one slot become one blend
    (ranks concatenated, each file's weight and scale folded in). Single files are bound to the base's site paths
    first (``component``, ``strict``, ``unet_config`` as for rewrite). Uses the graph's own ``lorapass.lora``
    records for which module paths have slots and each adapter module's own rank and scale (for PEFT: rank_pattern /
    alpha_pattern / rslora as PEFT resolves them). ``aliases`` (graph components -> the adapter's) rename the slots'
    paths to the adapter's module names. Slots whose defaults are another adapter's weights (a dynamic graph made
    with an adapter) and that these adapters leave out get zeros, so the file alone decides the run.
    """
    from lorapass.kinds import Blend
    from lorapass.onnx.dialects import Dialect

    rename = Dialect("alias", aliases=aliases or {}).module_path
    graph = graph if graph is not None else load_model(model)
    slots, dtypes = slots_of(model, graph)
    known = {rename(path) for slot in slots for path in slot.paths}
    modules: dict[str, list] = {}
    for a in bind_to(adapter, model, component, strict, unet_config, graph):
        unknown = [m for m in a.modules if m not in known]
        if unknown:
            names = sorted(i.name for slot in slots for i in slot.inputs())
            raise AdapterError(
                f"{a.source}: {len(unknown)} adapter module(s) have no LoRA input in {model}: "
                + ", ".join(f"{m!r} (expects inputs {m}.lora_A/.lora_B)" for m in unknown[:5])
                + f"; the graph's LoRA inputs are e.g. {names[:4]}")
        for path, kind in a.modules.items():
            modules.setdefault(path, []).append(kind)
    kinds = {path: found[0] if len(found) == 1 else Blend(found) for path, found in modules.items()}
    params: dict[str, np.ndarray] = {}
    for slot in slots:
        mine = {path: kinds[rename(path)] for path in slot.paths if rename(path) in kinds}
        if not mine and not _nonzero_defaults(graph, slot):
            continue
        for name, array in slot.values_for(mine).items():
            params[name] = np.ascontiguousarray(array, dtype=dtypes.get(name, np.float32))
    return params


def _nonzero_defaults(graph: ir.Model, slot: Slot) -> bool:
    """Whether the slot's default initializers hold weights (an adapter's), not the zeros of LoRA-ready slots."""
    initializers = graph.graph.initializers
    return any(i.name in initializers and initializers[i.name].const_value is not None
               and np.any(initializers[i.name].const_value.numpy()) for i in slot.inputs())


def export_adapter(adapter_dir, model: str | os.PathLike, output: str | os.PathLike,
                   aliases: dict[str, str] | None = None, component: str | None = None, strict: bool = False,
                   unet_config: str | os.PathLike | None = None) -> Path:
    """Write ``output`` (.onnx_adapter) holding the adapter's (or several adapters' blended) weights for the dynamic
    graph ``model`` (see :func:`adapter_parameters`)."""
    import onnxruntime as ort

    graph = load_model(model)
    adapters = bind_to(adapter_dir, model, component, strict, unet_config, graph)
    params = adapter_parameters(adapters, model, graph, aliases)
    fmt = ort.AdapterFormat()
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    output, model = Path(output), Path(model)
    data = {model.parent / v.const_value.location for v in graph.graph.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)}
    with Transaction([output], [model, *data, *input_files(adapters, None)]) as commit:
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
