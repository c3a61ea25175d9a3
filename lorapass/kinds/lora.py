"""Plain LoRA: ``W += scale · B @ A`` with A [r, in] and B [out, r] (PEFT's ``lora_A`` / ``lora_B``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lorapass.errors import ShapeMismatchError
from lorapass.formats.tensors import TensorRef
from lorapass.kinds.base import Kind
from lorapass.site import Site


class Lora(Kind):
    """A/B factors of one module; ``scale`` is alpha/r (alpha/sqrt(r) with rsLoRA) times any user weight."""

    def __init__(self, path: str, source: Path, a: TensorRef, b: TensorRef, r: int, alpha: float, scale: float) -> None:
        super().__init__(path, source, r, alpha, scale)
        self.a, self.b = a, b

    def keys(self) -> dict[str, str]:
        return {"lora_A": self.a.key, "lora_B": self.b.key}

    @property
    def out_features(self) -> int:
        return self.b.shape[0]

    def check(self, site: Site) -> None:
        expected = {"lora_A": (self.r, site.in_features), "lora_B": (site.out_features, self.r)}
        for role, ref in (("lora_A", self.a), ("lora_B", self.b)):
            if ref.shape != expected[role]:
                raise ShapeMismatchError(
                    f"{self.source}: {ref.key} has shape {list(ref.shape)}, site {site.path!r} ({site.op} "
                    f"{site.node!r}, {site.in_features}->{site.out_features}, r={self.r}) needs {list(expected[role])}")

    def low_rank(self) -> tuple[np.ndarray, np.ndarray]:
        return self.b.read() * np.float32(self.scale), self.a.read()
