"""Several adapters' modules on one site, as one LoRA: their low-rank updates concatenated along the rank axis.

Each part's scale (its alpha/r and the user weight) is already folded into its up factor, so the blend's delta
is the weighted sum of the parts' deltas. A dynamic slot takes a blend as one adapter: ONNX Runtime cannot
activate two adapters that share a parameter.
"""

from __future__ import annotations

import numpy as np

from lorapass.kinds.base import Kind
from lorapass.site import Site


class Blend(Kind):
    """The sum of ``parts`` (modules of one path from different adapters)."""

    def __init__(self, parts: list[Kind]) -> None:
        self.parts = parts
        self._pairs = [part.low_rank() for part in parts]
        r = sum(u.shape[1] for u, _ in self._pairs)
        super().__init__(parts[0].path, parts[0].source, r, float(r), 1.0)

    def keys(self) -> dict[str, str]:
        return {f"{i}.{role}": key for i, part in enumerate(self.parts) for role, key in part.keys().items()}

    def check(self, site: Site) -> None:
        for part in self.parts:
            part.check(site)

    def low_rank(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.concatenate([u for u, _ in self._pairs], axis=1),
                np.concatenate([v for _, v in self._pairs], axis=0))
