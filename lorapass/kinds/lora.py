"""Low-rank kinds: plain LoRA (``W += scale · B @ A``, optionally with PEFT's ``lora_bias``), its embedding form, and
DoRA on both (PEFT's ``DoraLinearLayer`` / ``DoraEmbeddingLayer``).

On a convolution A is a kernel [r, in, kh, kw] and B a 1x1 kernel [out, r, 1, 1] (kohya's LoCon, PEFT's Conv2d
LoRA): the delta is ``(B @ A.reshape(r, -1)).reshape(out, in, kh, kw)``. :class:`LoraCP` is LoCon's CP form: a 1x1
A, a mid kernel [r, r, kh, kw] and B (LyCORIS ``lora_mid``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lorapass.errors import ShapeMismatchError
from lorapass.formats.tensors import TensorRef
from lorapass.kinds.base import Kind
from lorapass.kinds.lowrank import LowRank, check_shapes
from lorapass.site import Site


class Lora(Kind):
    """A/B factors of one linear module (A [r, in], B [out, r]); ``scale`` is alpha/r (alpha/sqrt(r) with rsLoRA)
    times any user weight; ``bias`` is PEFT's ``lora_B.bias`` [out] (``lora_bias=True``), added times the scale."""

    name = "lora"
    site_kinds = ("linear", "packed", "conv")

    def __init__(self, path: str, source: Path, a: TensorRef, b: TensorRef, r: int, alpha: float, scale: float,
                 bias: TensorRef | None = None, **extra) -> None:
        super().__init__(path, source, r, alpha, scale, **extra)
        self.a, self.b, self.bias = a, b, bias

    @property
    def out_features(self) -> int:
        """Output rows of the delta (packed weights are split by them)."""
        return self.b.shape[0]

    @property
    def additive(self) -> bool:
        return self.bias is None and self.additive_branch

    @property
    def additive_branch(self) -> bool:
        return not self.replaced and self.saved_base is None

    def own_keys(self) -> dict[str, str]:
        keys = {"lora_A": self.a.key, "lora_B": self.b.key}
        return keys | ({"lora_bias": self.bias.key} if self.bias is not None else {})

    def check_own(self, site: Site) -> None:
        ones = (1,) * len(site.kernel)  # a convolution: A is a kernel, B a 1x1 kernel
        check_shapes(self, site, {"lora_A": (self.a, (self.r, site.in_features, *site.kernel)),
                                  "lora_B": (self.b, (site.out_features, self.r, *ones)),
                                  "lora_bias": (self.bias, (site.out_features,))})

    def own_parts(self) -> set[str]:
        return {"low_rank"}

    def low_rank(self) -> tuple[np.ndarray, np.ndarray]:
        """(up [rows, r], down [r, cols]) float32 with up @ down = the delta in the site's torch layout (a convolution's
        [out, in·kh·kw]), scale folded in."""
        b, a = self.b.read(), self.a.read()
        return b.reshape(b.shape[0], -1) * np.float32(self.scale), a.reshape(a.shape[0], -1)

    def lora_bias(self) -> np.ndarray | None:
        return None if self.bias is None else self.bias.read() * np.float32(self.scale)

    def merge_delta(self, site: Site) -> None:
        site.storage.add(*self.low_rank())
        bias = self.lora_bias()
        if bias is not None:
            self.bias_view(site).update(lambda v: v + bias)

    def merged(self, w: np.ndarray) -> np.ndarray:
        up, down = self.low_rank()
        return w + (up @ down).reshape(w.shape)

    def _refs(self) -> list[TensorRef]:
        return [self.a, self.b, *([self.bias] if self.bias is not None else []), *super()._refs()]


class EmbeddingLora(Lora):
    """PEFT's embedding LoRA: ``lora_embedding_A`` [r, vocab], ``lora_embedding_B`` [dim, r]; the table [vocab, dim]
    gains ``scale · (B @ A)ᵀ``, so the forward adds ``scale · Aᵀ[ids] @ Bᵀ`` to the gathered rows."""

    name = "embedding lora"
    site_kinds = ("embedding",)
    additive = additive_branch = False  # its branch gathers rows by the ids: no linear's x @ A @ B

    def low_rank(self) -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray(self.a.read().T), np.ascontiguousarray(self.b.read().T) * np.float32(self.scale)


class _Magnitude:
    """DoRA: the merged weight is ``g ⊙ (W + ΔW)`` with ``g = m / ‖W + ΔW‖``, one factor per output feature, the norm
    taken in float32 over the other axis and treated as a constant; the bias is not rescaled."""

    dora = True
    additive = additive_branch = False
    output_axis: int  # the axis of the torch-layout weight that holds the output features

    def __init__(self, *args, magnitude: TensorRef, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.magnitude = magnitude

    def factor(self, w: np.ndarray) -> np.ndarray:
        """g = m / ‖W + ΔW‖ for the float32 base weight ``w`` in torch layout."""
        up, down = self.low_rank()
        full = w.astype(np.float32) + up @ down
        norm = np.sqrt(np.square(full, dtype=np.float64).sum(axis=1 - self.output_axis)).astype(np.float32)
        return self.magnitude.read().reshape(-1) / norm

    def merged(self, w: np.ndarray) -> np.ndarray:
        up, down = self.low_rank()
        g = self.factor(w)
        return (w + up @ down) * (g[:, None] if self.output_axis == 0 else g[None, :])

    def merge_delta(self, site: Site) -> None:
        site.storage.update(self.merged)

    def check_own(self, site: Site) -> None:
        super().check_own(site)
        if self.magnitude.shape != (site.out_features,):
            raise ShapeMismatchError(f"{self.source}: {self.magnitude.key} has shape {list(self.magnitude.shape)}, site "
                                     f"{site.path!r} ({site.op} {site.node!r}) has {site.out_features} output features")

    def own_keys(self) -> dict[str, str]:
        return super().own_keys() | {"magnitude": self.magnitude.key}

    def _refs(self) -> list[TensorRef]:
        return [self.magnitude, *super()._refs()]


class Dora(_Magnitude, Lora):
    """DoRA on a linear module: ``lora_magnitude_vector`` [out] rescales every output row of W + s·B·A."""

    name = "dora"
    site_kinds = ("linear", "packed")  # PEFT's Conv DoRA (a norm over every axis but the output channel) is not applied
    output_axis = 0


class EmbeddingDora(_Magnitude, EmbeddingLora):
    """DoRA on an embedding: the magnitude [dim] rescales every embedding dimension (a column of the table)."""

    name = "embedding dora"
    output_axis = 1


class LoraCP(LowRank, Lora):
    """LoCon's CP form on a kxk convolution: A [r, in, 1, 1], mid [r, r, kh, kw], B [out, r, 1, 1]; the delta is
    ``einsum('nmkl,in,mj->ijkl', mid, B, A)`` (LyCORIS ``rebuild_tucker``)."""

    name = "locon cp"
    site_kinds = ("conv",)

    def __init__(self, path: str, source: Path, a: TensorRef, mid: TensorRef, b: TensorRef, r: int, alpha: float,
                 scale: float) -> None:
        super().__init__(path, source, a, b, r, alpha, scale)
        self.mid = mid

    def own_keys(self) -> dict[str, str]:
        return {"lora_A": self.a.key, "lora_mid": self.mid.key, "lora_B": self.b.key}

    def check_own(self, site: Site) -> None:
        ones = (1,) * len(site.kernel)
        check_shapes(self, site, {"lora_A": (self.a, (self.r, site.in_features, *ones)),
                                  "lora_mid": (self.mid, (self.r, self.r, *site.kernel)),
                                  "lora_B": (self.b, (site.out_features, self.r, *ones))})

    def low_rank(self) -> tuple[np.ndarray, np.ndarray]:
        up, down = super().low_rank()  # down: [r, in]
        return up, np.einsum("nm...,mj->nj...", self.mid.read(), down).reshape(self.r, -1)

    def _refs(self) -> list[TensorRef]:
        return [self.mid, *super()._refs()]
