"""Several adapters' modules on one site, as one LoRA: their low-rank updates concatenated along the rank axis.

Each part's scale (its alpha/r and the user weight) is already folded into its up factor, so the blend's delta
is the weighted sum of the parts' deltas. A dynamic slot takes a blend as one adapter: ONNX Runtime cannot
activate two adapters that share a parameter.
"""

from __future__ import annotations

import numpy as np

from lorapass.kinds.base import Kind
from lorapass.kinds.lowrank import LowRank
from lorapass.site import Site


class Blend(LowRank):
    """The sum of ``members`` (modules of one path from different adapters, each purely low-rank)."""

    name = "blend"

    def __init__(self, members: list[Kind]) -> None:
        self.members = members
        self._pairs = [member.low_rank() for member in members]
        r = sum(u.shape[1] for u, _ in self._pairs)
        super().__init__(members[0].path, members[0].source, r, float(r), 1.0)

    def own_keys(self) -> dict[str, str]:
        return {f"{i}.{role}": key for i, part in enumerate(self.members) for role, key in part.keys().items()}

    def check_own(self, site: Site) -> None:
        for part in self.members:
            part.check(site)

    def _refs(self) -> list:
        return [ref for part in self.members for ref in part._refs()]

    def low_rank(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.concatenate([u for u, _ in self._pairs], axis=1),
                np.concatenate([v for _, v in self._pairs], axis=0))
