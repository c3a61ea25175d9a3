"""ONNX Runtime adapters: write adapters (PEFT directories, kohya / LyCORIS / diffusers files, or a weighted blend
of several) in onnxruntime's adapter format for a dynamic graph, and a session helper that runs a rewritten model
with a chosen adapter (hot swap, no reload)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lorapass.adapter import Adapter
from lorapass.atomic import Transaction
from lorapass.errors import AdapterError, ModelError
from lorapass.onnx.fold import read
from lorapass.onnx.load import load_model
from lorapass.onnx.sites import find_sites
from lorapass.onnx.slots import METADATA_KEY, SITES_KEY, Slot, read_records
from lorapass.provenance import input_files
from lorapass.site import Site

_DTYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16, ir.DataType.INT64: np.int64}


def slots_of(model: str | os.PathLike, graph: ir.Model | None = None) -> tuple[list[Slot], dict[str, np.dtype]]:
    """The slots of a dynamic or multi model (rebuilt from its ``lorapass.lora`` records) and its input dtypes by
    name; ModelError if the records are missing, malformed, or name inputs the graph does not have."""
    graph = graph if graph is not None else load_model(model)
    text = graph.metadata_props.get(METADATA_KEY)
    if text is None:
        raise ModelError(f"{model}: not a lorapass dynamic graph (no {METADATA_KEY!r} metadata)")
    slots = read_records(text, model)
    names = {i.name for slot in slots for i in slot.inputs()}
    dtypes = {v.name: np.dtype(_DTYPES.get(v.dtype, np.float32)) for v in graph.graph.inputs}
    missing = sorted(names - set(dtypes))
    if missing:
        raise ModelError(f"{model}: metadata {METADATA_KEY!r} lists LoRA inputs the graph does not have: {missing[:4]}")
    return slots, dtypes


class _ModelWeights:
    """The base weights of a dynamic model, read on demand (its sites found as a rewrite finds them)."""

    def __init__(self, model: str | os.PathLike, graph: ir.Model, paths: list[str]) -> None:
        self.model, self.graph, self.paths = Path(model), graph, paths
        self._sites: dict[str, Site] | None = None

    def site_at(self, path: str) -> Site | None:
        if self._sites is None:
            self._sites = {}
            for site in find_sites(self.graph, wanted=self.paths).sites:
                self._sites.setdefault(site.path, site)
        return self._sites.get(path)

    def site(self, path: str) -> np.ndarray:
        site = self.site_at(path)
        if site is None:
            raise ModelError(f"{self.model}: no site {path!r} whose base weight the adapter's values depend on")
        return site.storage.read()

    def tensor(self, name: str) -> np.ndarray:
        value = self.graph.graph.initializers.get(name)
        if value is None:
            raise ModelError(f"{self.model}: the initializer {name!r} a slot record names is missing")
        return read(value.const_value).astype(np.float32)


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
    """The adapter's values for the dynamic graph's slot inputs (each slot says how, and checks the shapes).

    Uses the graph's own ``lorapass.lora`` records for which module paths have slots and each adapter module's
    own rank and scale (for PEFT: rank_pattern / alpha_pattern / rslora as PEFT resolves them). ``aliases``
    (graph components -> the adapter's) rename the slots' paths to the adapter's module names. Values that
    depend on base weights (DoRA's factor, token rows) read them from the graph. Slots whose defaults hold the
    adapter the graph was built with get neutral values when this adapter has nothing for them. A multi graph
    takes several adapters (ids 1, 2, ... in order): every bank is written, stacked for them; a dynamic graph takes
    them as one blend (on each slot their modules' ranks concatenated, each file's weight and scale folded in).
    Adapters are Adapter objects, paths or ``PATH:WEIGHT``; single files are bound to the base's site paths first
    (``component``, ``strict``, ``unet_config`` as for rewrite).
    """
    from lorapass.onnx.dialects import Dialect

    rename = Dialect("alias", aliases=aliases or {}).module_path
    graph = graph if graph is not None else load_model(model)
    adapters = bind_to(adapter, model, component, strict, unet_config, graph)
    slots, dtypes = slots_of(model, graph)
    banked = any(slot.banked for slot in slots)
    if not adapters:
        raise AdapterError(f"{model}: no adapter given")
    known = {rename(path) for slot in slots for path in slot.paths}
    suffix = "_bank" if banked else ""
    for a in adapters:
        unknown = [m for m in a.modules if m not in known]
        if unknown:
            names = sorted(i.name for slot in slots for i in slot.inputs())
            raise AdapterError(
                f"{a.source}: {len(unknown)} adapter module(s) have no LoRA input in {model}: "
                + ", ".join(f"{m!r} (expects inputs {m}.lora_A{suffix}/.lora_B{suffix})" for m in unknown[:5])
                + f"; the graph's LoRA inputs are e.g. {names[:4]}")
    weights = _ModelWeights(model, graph, sorted({path for slot in slots for path in slot.paths}))
    for a in adapters:
        _check_covered(a, slots, rename, weights, model)
    blended = _blended(adapters) if not banked and len(adapters) > 1 else None
    values: dict[str, np.ndarray] = {}
    for slot in slots:
        chosen = [{path: a.modules[rename(path)] for path in slot.paths if rename(path) in a.modules} for a in adapters]
        if blended is not None:
            chosen = [{path: blended[rename(path)] for path in slot.paths if rename(path) in blended}]
        if slot.banked:
            values |= slot.stacked(chosen)
        elif chosen[0] or slot.record.get("default") == "adapter":  # else the graph's neutral defaults stay
            values |= slot.values_for(chosen[0], weights)
    return {name: np.ascontiguousarray(array, dtype=dtypes.get(name, np.float32)) for name, array in values.items()}


def _blended(adapters: list[Adapter]) -> dict:
    """Module path -> the adapters' modules there as one (a Blend where several have one; plain low-rank only)."""
    from lorapass.kinds import Blend

    found: dict[str, list] = {}
    for a in adapters:
        for path, kind in a.modules.items():
            found.setdefault(path, []).append(kind)
    for path, kinds in found.items():
        other = next((k for k in kinds if not k.additive), None) if len(kinds) > 1 else None
        if other is not None:
            raise AdapterError(f"{other.source}: {other.key()} ({other.name} at {path!r}) is not a plain low-rank "
                               "delta, so it cannot be blended with another adapter's; export it on its own")
    return {path: kinds[0] if len(kinds) == 1 else Blend(kinds) for path, kinds in found.items()}


def _check_covered(adapter: Adapter, slots: list[Slot], rename, weights: _ModelWeights, model) -> None:
    """Every part of every adapter module (low-rank branch, DoRA factor, replaced weight or bias, token rows) must
    have a slot input in the graph (AdapterError naming the key, what it changes and the slots there)."""
    covered: dict[str, tuple[str, set[str], list[str]]] = {}  # module -> (graph path, parts carried, slot types)
    for slot in slots:
        for path in slot.paths:
            entry = covered.setdefault(rename(path), (path, set(), []))
            entry[1].update(slot.covers())
            entry[2].append(slot.type)
    for module, kind in adapter.modules.items():
        path, parts, types = covered[module]
        missing = kind.parts(weights.site_at(path) if kind.saved_base is not None else None) - parts
        if missing:
            raise AdapterError(
                f"{adapter.source}: {kind.key()} ({kind.name}) changes {sorted(missing)} of {module!r}, which the "
                f"graph's slots there ({', '.join(types)}) do not carry; rewrite {model} with this adapter")


def export_adapter(adapter_dir: str | os.PathLike | Adapter | Sequence, model: str | os.PathLike,
                   output: str | os.PathLike, aliases: dict[str, str] | None = None, component: str | None = None,
                   strict: bool = False, unet_config: str | os.PathLike | None = None) -> Path:
    """Write ``output`` (.onnx_adapter) holding the adapter's weights (several: their blend) for the dynamic graph
    ``model``, or the banks of several adapters (ids 1, 2, ... in order) for a multi graph (see
    :func:`adapter_parameters`)."""
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
    """A dynamic or multi LoRA model loaded once in ONNX Runtime, run with any of several adapters (or none).

    ``Session(model).add_adapter("support", "support.onnx_adapter")`` then ``run(feeds, adapter="support")``.
    Adapters are memory-mapped ONNX Runtime adapter files; switching costs nothing but the run itself.
    A multi graph (``--strategy multi``) takes an adapter per batch row: ``run(feeds, adapters=["a", None, "b"])``
    names each row's adapter in the active bank (the graph's own, or a bank file added with its names).
    """

    def __init__(self, model: str | os.PathLike, providers: list[str] | None = None, **session_options) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # LoRA weights are graph inputs on purpose: silence ORT's warning
        for key, value in session_options.items():
            setattr(options, key, value)
        self.model = Path(model)
        graph = load_model(model)  # first: it refuses files a killed commit left unmatched, by name
        self.session = ort.InferenceSession(str(model), options, providers=providers or ["CPUExecutionProvider"])
        self.adapters: dict[str, object] = {}
        slots = slots_of(model, graph)[0] if METADATA_KEY in graph.metadata_props else []
        bank = next((slot.record for slot in slots if slot.banked), None)
        self.ids: str | None = bank["ids"] if bank else None
        self.banks: dict[str | None, list[str | None]] = {None: bank["adapters"]} if bank else {}
        """Multi graphs: the adapter of each id from 1, per adapter file (None: the graph's own bank)."""
        self.batch_input = next((v.name for v in graph.graph.inputs if v.name not in graph.graph.initializers), None)

    def add_adapter(self, name: str, path: str | os.PathLike, adapters: Sequence[str | None] | None = None) -> None:
        """Load an ONNX Runtime adapter file as ``name``; for a multi graph, a bank file from ``export-adapter``
        with ``adapters`` naming its ids 1, 2, ... (in the order it was written; unnamed ids run by number)."""
        import onnxruntime as ort

        if not Path(path).is_file():
            raise AdapterError(f"{path}: no such ONNX Runtime adapter file")
        try:
            params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
        except RuntimeError as exc:  # onnxruntime's only error for a file it cannot parse
            raise AdapterError(f"{path}: not an ONNX Runtime adapter file ({exc})") from None
        self._check_parameters(path, {name: tuple(v.shape()) for name, v in params.items()})
        if self.ids is not None:
            slots = {v.shape()[0] for v in params.values()}
            if len(slots) != 1:
                raise AdapterError(f"{path}: not a bank file for {self.model} (banks of {sorted(slots)} slots)")
            size = slots.pop() - 1
            named = list(adapters) if adapters is not None else [None] * size
            given = [n for n in named if n is not None]
            if len(named) != size or len(set(given)) != len(given):
                raise AdapterError(f"{path}: holds {size} adapter(s); give as many distinct names, not {named}")
            self.banks[name] = named
        elif adapters is not None:
            raise AdapterError(f"{self.model}: not a multi graph; per-row adapter names do not apply")
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        self.adapters[name] = adapter

    def _check_parameters(self, path: str | os.PathLike, shapes: dict[str, tuple[int, ...]]) -> None:
        """AdapterError naming a parameter of the adapter file that is no input of the graph, or whose shape does
        not fit the input's fixed dims (ONNX Runtime would only fail on the first run)."""
        inputs = {i.name: i.shape for i in [*self.session.get_inputs(), *self.session.get_overridable_initializers()]}
        for name, shape in shapes.items():
            if name not in inputs:
                raise AdapterError(f"{path}: parameter {name!r} is no input of {self.model} (an adapter file for "
                                   "another graph, or a bank file for a dynamic one?)")
            dims = inputs[name]
            if len(shape) != len(dims) or any(isinstance(d, int) and d != n for d, n in zip(dims, shape)):
                raise AdapterError(f"{path}: parameter {name!r} has shape {list(shape)}, the graph input is {dims}")

    def run(self, feeds: dict[str, np.ndarray], adapter: str | None = None, outputs: list[str] | None = None,
            adapters: Sequence[str | int | None] | None = None) -> list[np.ndarray]:
        """Run with the named adapter file active (None: the graph's default LoRA weights); on a multi graph,
        ``adapters`` gives each batch row's adapter (a name in the active bank, its id, or None for the base)."""
        import onnxruntime as ort

        options = ort.RunOptions()
        if adapter is not None:
            if adapter not in self.adapters:
                raise AdapterError(f"no adapter named {adapter!r}; added: {sorted(self.adapters)}")
            options.add_active_adapter(self.adapters[adapter])
        if adapters is not None:
            if self.ids is None:
                raise AdapterError(f"{self.model}: not a multi graph; per-row adapters need --strategy multi")
            feeds = {**feeds, self.ids: self._ids(adapters, adapter)}
        if self.ids is not None:
            if self.ids not in feeds:
                raise AdapterError(f"{self.model}: a multi graph needs each row's adapter: adapters=[...] or a "
                                   f"{self.ids!r} feed")
            self._check(feeds, adapter)
        return self.session.run(outputs, feeds, options)

    def _ids(self, adapters: Sequence[str | int | None], bank: str | None) -> np.ndarray:
        names = self.banks[bank]
        ids = []
        for row, a in enumerate(adapters):
            if a is None or isinstance(a, (int, np.integer)):
                ids.append(0 if a is None else int(a))
                if not 0 <= ids[-1] <= len(names):
                    raise AdapterError(f"row {row}: id {ids[-1]} is outside the bank (ids 0..{len(names)})")
            elif a in names:
                ids.append(names.index(a) + 1)
            else:
                raise AdapterError(f"row {row}: no adapter named {a!r} in the "
                                   f"{'graph' if bank is None else repr(bank)} bank; it holds {names}")
        return np.array(ids, np.int64)

    def _check(self, feeds: dict[str, np.ndarray], bank: str | None) -> None:
        ids, slots = np.asarray(feeds[self.ids]), len(self.banks[bank]) + 1
        if ids.ndim != 1 or ids.dtype != np.int64:
            raise AdapterError(f"{self.ids} must be int64 of shape [batch], got {ids.dtype} {list(ids.shape)}")
        batch = feeds.get(self.batch_input)
        if batch is not None and np.ndim(batch) and len(ids) != np.shape(batch)[0]:
            raise AdapterError(f"{len(ids)} row adapter(s) for a batch of {np.shape(batch)[0]} ({self.batch_input})")
        bad = [(row, int(i)) for row, i in enumerate(ids) if not 0 <= i < slots]
        if bad:
            raise AdapterError(f"{self.ids}: row {bad[0][0]} has id {bad[0][1]}, outside the bank (ids 0..{slots - 1})")
