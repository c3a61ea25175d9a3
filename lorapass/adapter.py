"""An adapter in lorapass's one internal form: per module path, a kind holding its tensors and scale.

File formats (:mod:`lorapass.formats`) read into this; strategies never see where an adapter came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lorapass.kinds import Kind
from lorapass.rules import LoraRule

if TYPE_CHECKING:
    from lorapass.formats.names import KeyReport, Namespace


@dataclass
class Adapter:
    """One adapter: the rule saying which modules it targets (as PEFT would), and a kind per module path."""

    source: Path  # the directory or file it was read from
    rule: LoraRule
    modules: dict[str, Kind] = field(default_factory=dict)
    format: str = "peft"
    files: list[Path] = field(default_factory=list)  # every file read (provenance, output collision checks)
    weight: float = 1.0  # the user multiplier already folded into every module's scale
    namespace: Namespace | None = None  # how a single file spells module paths (None: they are site paths)
    binding: KeyReport | None = None  # after binding a single file to a graph: which modules matched which sites

    @property
    def directory(self) -> Path:
        return self.source

    def spelled(self, paths: list[str]) -> set[str]:
        """The module names this adapter would give ``paths`` (the paths themselves unless the file spells them)."""
        return set(paths) if self.namespace is None else self.namespace.all_spelled(paths)

    def key(self, module: str, role: str | None = None) -> str:
        """The file key of one tensor of ``module`` (its first when ``role`` is None), for messages."""
        return self.modules[module].key(role)


def load_adapter(source, allow_pickle: bool = False, weight: float = 1.0) -> Adapter:
    """Read an adapter in any supported format (see :func:`lorapass.formats.load_adapter`)."""
    from lorapass.formats import load_adapter as load

    return load(source, allow_pickle=allow_pickle, weight=weight)
