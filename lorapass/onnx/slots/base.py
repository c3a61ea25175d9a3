"""The slot interface and the registry that rebuilds slots from ``lorapass.lora`` records."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lorapass.errors import ShapeMismatchError
from lorapass.kinds import Kind

METADATA_KEY = "lorapass.lora"
"""Model metadata: JSON list with one record per slot ({slot, path, inputs, in, out, r, alpha, scale, ...})."""
SITES_KEY = "lorapass.sites"
"""Model metadata of a dynamic graph: JSON list of every site path of its base (to bind single files later)."""


@dataclass(frozen=True)
class SlotInput:
    """One overridable graph input of a slot: its name, dims (ints or the symbolic rank) and role."""

    name: str
    dims: tuple[int | str, ...]
    role: str


class Slot(ABC):
    """One site's (or one packed node's) LoRA branch in a dynamic graph."""

    type: ClassVar[str]
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
    def paths(self) -> list[str]:
        """The adapter module paths whose weights this slot takes."""
        return [self.path]

    def values_for(self, modules: dict[str, Kind]) -> dict[str, np.ndarray]:
        """Input values for the adapter modules (by path) this slot takes; absent modules are zero."""
        return self.values(modules.get(self.path))

    @abstractmethod
    def inputs(self) -> list[SlotInput]:
        """The slot's graph inputs."""

    @abstractmethod
    def values(self, module: Kind | None) -> dict[str, np.ndarray]:
        """Input name -> float32 value for an adapter module (zeros for None: the graph equals the base); a slot
        holding several adapters (a bank) takes one module or None per adapter, in id order."""

    def checked(self, module: Kind, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``values`` (input name -> array for ``module``), after checking them against the inputs' fixed dims."""
        for slot_input in self.inputs():
            array = values[slot_input.name]
            fixed = [(i, d) for i, d in enumerate(slot_input.dims) if isinstance(d, int)]
            if array.ndim != len(slot_input.dims) or any(array.shape[i] != d for i, d in fixed):
                key = module.keys().get(slot_input.role) or module.key()
                raise ShapeMismatchError(
                    f"{module.source}: {key} gives {slot_input.name} shape {list(array.shape)}, "
                    f"the graph input {slot_input.name!r} is {list(slot_input.dims)}")
        return values

    @abstractmethod
    def branch(self, b: Branch, x, inputs: dict) -> object:
        """Build the nodes computing the branch's delta from the activation ``x`` (the site's input) and the
        slot's graph inputs (role -> value); returns the delta, which joins the site's output by ``Add``."""


_TYPES: dict[str, type[Slot]] = {}


def register(cls: type[Slot]) -> type[Slot]:
    """Class decorator: make records of ``cls.type`` rebuildable by :func:`from_record`."""
    _TYPES[cls.type] = cls
    return cls


def from_record(record: dict) -> Slot:
    """The slot a ``lorapass.lora`` record describes (records without ``slot`` are linear, as first written)."""
    kind = record.get("slot", "linear")
    if kind not in _TYPES:
        raise KeyError(kind)
    return _TYPES[kind](record)


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
