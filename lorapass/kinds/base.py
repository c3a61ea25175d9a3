"""The verbs every adapter kind has: its rank and scale, a shape check against a site, and its delta as the
additive low-rank update ``up @ down`` in torch's layout (scale folded in), which merge records on a site's
storage and dynamic feeds to a slot."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np

from lorapass.site import Site


class Kind(ABC):
    """One adapted module of an adapter: its tensors and its scale, whatever file they came from."""

    additive: ClassVar[bool] = True
    """Whether the module's whole effect is ``W + low_rank()`` (False for kinds that also rescale the output,
    such as DoRA: strategies that only add a low-rank branch refuse them)."""

    def __init__(self, path: str, source: Path, r: int, alpha: float, scale: float) -> None:
        self.path, self.source = path, source
        self.r, self.alpha, self.scale = r, alpha, scale

    @abstractmethod
    def keys(self) -> dict[str, str]:
        """Role -> file key of this module's tensors (for messages)."""

    def key(self, role: str | None = None) -> str:
        """The file key of one tensor (the first when ``role`` is None)."""
        keys = self.keys()
        return keys[role] if role is not None else next(iter(keys.values()))

    @abstractmethod
    def check(self, site: Site) -> None:
        """Raise ShapeMismatchError naming key, both shapes and the site if this module does not fit ``site``."""

    @property
    def out_features(self) -> int:
        """Output rows of the module's delta (packed weights are split by them)."""
        return self.low_rank()[0].shape[0]

    @abstractmethod
    def low_rank(self) -> tuple[np.ndarray, np.ndarray]:
        """(up [out, r], down [r, prod(in dims)]) float32 with up @ down = the delta in torch's layout."""

    def merge(self, storage) -> None:
        """Record this module's delta on a site's storage view."""
        storage.add(*self.low_rank())

    def merged(self, w: np.ndarray) -> np.ndarray:
        """W + delta for a float32 weight in torch's layout (frontends that edit weights directly)."""
        up, down = self.low_rank()
        return w + (up @ down).reshape(w.shape)
