"""The slot interface and the registry that rebuilds slots from ``lorapass.lora`` records."""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np

from lorapass.errors import ModelError, ShapeMismatchError
from lorapass.kinds import Kind

if TYPE_CHECKING:
    from lorapass.plan import Target

METADATA_KEY = "lorapass.lora"
"""Model metadata: JSON list with one record per slot ({slot, path, inputs, in, out, r, alpha, scale, ...}).
A record with ``"default": "adapter"`` holds an adapter's values as its defaults (else neutral ones); ``module``
names the adapter module that feeds it when that is not ``path`` (a tied head)."""
SITES_KEY = "lorapass.sites"
"""Model metadata of a dynamic graph: JSON list of every site path of its base (to bind single files later)."""


class Weights(Protocol):
    """The base weights a slot's values may depend on (DoRA's norm, trainable-token rows, a replaced weight)."""

    def site(self, path: str) -> np.ndarray:
        """The weight of the site at ``path`` as the graph holds it, float32 in torch's layout."""

    def tensor(self, name: str) -> np.ndarray:
        """An initializer of the graph by name, float32, as stored."""


@dataclass(frozen=True)
class SlotInput:
    """One overridable graph input of a slot: its name, dims (ints or symbols), role, and dtype (None: the
    site's activation dtype)."""

    name: str
    dims: tuple[int | str, ...]
    role: str
    dtype: str | None = None


class Slot(ABC):
    """One site's (or one packed node's) branch in a dynamic graph."""

    type: ClassVar[str]
    parts: ClassVar[frozenset[str]] = frozenset()  # the parts of an adapter module it carries (see Kind.parts)
    banked: ClassVar[bool] = False
    """Whether the slot holds several adapters at once (``values`` then takes one module per adapter)."""

    def __init__(self, record: dict) -> None:
        self.record = record

    @classmethod
    def for_targets(cls, targets: list) -> Slot:
        """The slot of the targets sharing one slot path (by default: one module, possibly at several nodes)."""
        return cls.for_target(targets[0])

    @property
    def path(self) -> str:
        return self.record["path"]

    @property
    def module(self) -> str:
        """The adapter module whose values this slot takes (not ``path`` at a tied head)."""
        return self.record.get("module", self.path)

    @property
    def paths(self) -> list[str]:
        """The adapter module paths whose weights this slot takes."""
        return [self.module]

    @classmethod
    def wants(cls, target: Target) -> bool:
        """Whether ``target`` needs a slot of this type (LoRA-ready targets, without a module, want plain LoRA)."""
        parts = target.module.parts(target.site) if target.module is not None else {"low_rank"}
        return bool(cls.parts & parts)

    @classmethod
    def for_target(cls, target: Target) -> Slot:
        """The slot for a planned target (its record made from the site, rule and module)."""
        raise NotImplementedError(f"{cls.type} slots are not made per target")

    @classmethod
    def for_targets(cls, targets: list) -> Slot:
        """The slot of the targets sharing one slot path (by default: one module, possibly at several nodes)."""
        return cls.for_target(targets[0])

    def covers(self) -> set[str]:
        """The module parts this slot's inputs carry."""
        return set(self.parts)

    def values_for(self, modules: dict[str, Kind], weights: Weights | None = None) -> dict[str, np.ndarray]:
        """Input values for the adapter modules (by path) this slot takes; absent modules get neutral values."""
        return self.values(modules.get(self.module), weights)

    @abstractmethod
    def inputs(self) -> list[SlotInput]:
        """The slot's graph inputs."""

    @abstractmethod
    def values(self, module: Kind | None, weights: Weights | None = None) -> dict[str, np.ndarray]:
        """Input name -> value for an adapter module (neutral values for None or a module without this slot's
        parts: the graph then computes the base there); ``weights`` gives the base weights values may depend
        on (DoRA's factor, token rows). A slot holding several adapters (a bank) takes them through ``stacked``."""

    def build(self, b: Branch, joint, inputs: dict) -> None:
        """Add the branch's nodes at the site: ``joint`` gives the site's values and reroutes readers
        (:class:`lorapass.onnx.dynamic.Joint`); ``inputs`` are the slot's graph inputs by role."""
        raise NotImplementedError(f"{self.type} slots build their branch elsewhere")

    def checked(self, module: Kind, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``out`` after checking each array against its input's fixed dims (ShapeMismatchError naming both)."""
        for slot_input in self.inputs():
            array = out[slot_input.name]
            fixed = [(i, d) for i, d in enumerate(slot_input.dims) if isinstance(d, int)]
            if array.ndim != len(slot_input.dims) or any(array.shape[i] != d for i, d in fixed):
                keys = module.keys()
                key = keys.get(slot_input.role, next(iter(keys.values())))
                raise ShapeMismatchError(
                    f"{module.source}: {key} gives {slot_input.name} shape {list(array.shape)}, "
                    f"the graph input {slot_input.name!r} is {list(slot_input.dims)}")
        return out


_TYPES: dict[str, type[Slot]] = {}


def register(cls: type[Slot]) -> type[Slot]:
    """Class decorator: make records of ``cls.type`` rebuildable by :func:`from_record`."""
    _TYPES[cls.type] = cls
    return cls


_NAMES = ("path", "module", "lora_A", "lora_B", "ids", "dora_factor", "lora_bias", "weight", "bias", "base_bias")
_SIZES = ("in", "out", "r", "slots")
_REQUIRED = {"bank": ("ids", "adapters", "inner")}


def from_record(record: dict) -> Slot:
    """The slot a ``lorapass.lora`` record describes (records without ``slot`` are linear, as first written);
    KeyError for an unknown slot type or a missing field, TypeError naming a field of the wrong type."""
    _check_record(record, "record")
    kind = record.get("slot", "linear")
    if kind not in _TYPES:
        raise KeyError(kind)
    return _TYPES[kind](record)


def read_records(text: str, source: str | os.PathLike) -> list[Slot]:
    """The slots a ``lorapass.lora`` metadata value describes, each with its inputs readable; ModelError naming
    ``source`` if the value is not valid JSON or not a list of slot records."""
    try:
        records = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ModelError(f"{source}: metadata {METADATA_KEY!r} is not valid JSON ({exc})") from None
    try:
        if not isinstance(records, list):
            raise TypeError("not a list")
        slots = [from_record(rec) for rec in records]
        for slot in slots:
            slot.inputs()
    except (TypeError, KeyError, AttributeError) as exc:
        raise ModelError(f"{source}: metadata {METADATA_KEY!r} must be a JSON list of slot records ({exc!r})") from None
    return slots


def _check_record(record: dict, where: str) -> None:
    """The fields slots read as names (strings) and sizes (positive ints), in the record and its inner record and
    parts; a bank's ids, adapter names and inner record."""
    if not isinstance(record, dict):
        raise TypeError(f"{where} is a {type(record).__name__}, not an object")
    for key in _REQUIRED.get(record.get("slot"), ()):
        if key not in record:
            raise KeyError(f"{where} has no {key!r}")
    bad = next((k for k in _NAMES if k in record and not isinstance(record[k], str)), None) or next(
        (k for k in _SIZES if k in record and (type(record[k]) is not int or record[k] < 1)), None)
    if bad is not None:
        raise TypeError(f"{where}.{bad} = {record[bad]!r} is not a {'name' if bad in _NAMES else 'positive size'}")
    if "adapters" in record and not (isinstance(record["adapters"], list)
                                     and all(a is None or isinstance(a, str) for a in record["adapters"])):
        raise TypeError(f"{where}.adapters = {record['adapters']!r} is not a list of adapter names")
    if "inner" in record:
        _check_record(record["inner"], f"{where}.inner")
    parts = record.get("parts", [])
    for i, part in enumerate(parts if isinstance(parts, list) else [parts]):
        _check_record(part, f"{where}.parts[{i}]")


class Branch:
    """Collects the nodes of one branch; ``op`` makes a default-domain node and returns its output(s)."""

    def __init__(self) -> None:
        self.nodes: list = []

    def op(self, op_type: str, inputs: list, name: str, attributes: dict | None = None, outputs: int = 1):
        import onnx_ir as ir

        attrs = [ir.convenience.convert_attribute(k, v) for k, v in (attributes or {}).items()]
        node = ir.Node("", op_type, inputs, attrs, num_outputs=outputs, name=name)
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else list(node.outputs)

    def const(self, array: np.ndarray, name: str):
        """A ``Constant`` node holding ``array``; returns its output."""
        import onnx_ir as ir

        return self.op("Constant", [], name, {"value": ir.Tensor(array, name=name)})
