"""Plain LoRA: ``W += scale · B @ A`` with A [r, in] and B [out, r] (PEFT's ``lora_A`` / ``lora_B``, kohya's
``lora_down`` / ``lora_up``). On a convolution A is a kernel [r, in, kh, kw] and B a 1x1 kernel [out, r, 1, 1]
(kohya's LoCon, PEFT's Conv2d LoRA): the delta is ``(B @ A.reshape(r, -1)).reshape(out, in, kh, kw)``.
:class:`LoraCP` is LoCon's CP form: a 1x1 A, a mid kernel [r, r, kh, kw] and B (LyCORIS ``lora_mid``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lorapass.errors import ShapeMismatchError
from lorapass.formats.tensors import TensorRef
from lorapass.kinds.base import Kind
from lorapass.site import Site


def check_shapes(kind: Kind, site: Site, expected: dict[str, tuple[TensorRef, tuple[int, ...]]]) -> None:
    """Raise ShapeMismatchError naming key, site and both shapes for the first tensor that does not fit."""
    for role, (ref, shape) in expected.items():
        if ref.shape != shape:
            what = f"{site.in_features}->{site.out_features}" + (f", kernel {'x'.join(map(str, site.kernel))}" if site.kernel else "")
            raise ShapeMismatchError(
                f"{kind.source}: {ref.key} has shape {list(ref.shape)}, site {site.path!r} ({site.op} {site.node!r}, "
                f"{what}, r={kind.r}) needs {list(shape)}")


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
        ones = (1,) * len(site.kernel)
        check_shapes(self, site, {"lora_A": (self.a, (self.r, site.in_features, *site.kernel)),
                                  "lora_B": (self.b, (site.out_features, self.r, *ones))})

    def low_rank(self) -> tuple[np.ndarray, np.ndarray]:
        b, a = self.b.read(), self.a.read()
        return b.reshape(b.shape[0], -1) * np.float32(self.scale), a.reshape(a.shape[0], -1)


class LoraCP(Lora):
    """LoCon's CP form on a kxk convolution: A [r, in, 1, 1], mid [r, r, kh, kw], B [out, r, 1, 1];
    the delta is ``einsum('nmkl,in,mj->ijkl', mid, B, A)`` (LyCORIS ``rebuild_tucker``)."""

    def __init__(self, path: str, source: Path, a: TensorRef, mid: TensorRef, b: TensorRef, r: int, alpha: float,
                 scale: float) -> None:
        super().__init__(path, source, a, b, r, alpha, scale)
        self.mid = mid

    def keys(self) -> dict[str, str]:
        return {"lora_A": self.a.key, "lora_mid": self.mid.key, "lora_B": self.b.key}

    def check(self, site: Site) -> None:
        ones = (1,) * len(site.kernel)
        check_shapes(self, site, {"lora_A": (self.a, (self.r, site.in_features, *ones)),
                                  "lora_mid": (self.mid, (self.r, self.r, *site.kernel)),
                                  "lora_B": (self.b, (site.out_features, self.r, *ones))})

    def low_rank(self) -> tuple[np.ndarray, np.ndarray]:
        up, down = super().low_rank()  # down: [r, in]
        mid = self.mid.read()
        return up, np.einsum("nm...,mj->nj...", mid, down).reshape(self.r, -1)
