"""Low-rank kinds: plain LoRA (``W += scale · B @ A``, optionally with PEFT's ``lora_bias``), its embedding form, and
DoRA on both (PEFT's ``DoraLinearLayer`` / ``DoraEmbeddingLayer``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lorapass.errors import ShapeMismatchError
from lorapass.formats.tensors import TensorRef
from lorapass.kinds.base import Kind
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
        return self.bias is None and not self.replaced and self.saved_base is None

    def own_keys(self) -> dict[str, str]:
        keys = {"lora_A": self.a.key, "lora_B": self.b.key}
        return keys | ({"lora_bias": self.bias.key} if self.bias is not None else {})

    def check_own(self, site: Site) -> None:
        expected = {"lora_A": (self.r, site.in_features), "lora_B": (site.out_features, self.r), "lora_bias": (site.out_features,)}
        for role, ref in (("lora_A", self.a), ("lora_B", self.b), ("lora_bias", self.bias)):
            if ref is not None and ref.shape != expected[role]:
                raise ShapeMismatchError(
                    f"{self.source}: {ref.key} has shape {list(ref.shape)}, site {site.path!r} ({site.op} "
                    f"{site.node!r}, {site.in_features}->{site.out_features}, r={self.r}) needs {list(expected[role])}")

    def own_parts(self) -> set[str]:
        return {"low_rank"}

    def low_rank(self) -> tuple[np.ndarray, np.ndarray]:
        """(up [rows, r], down [r, cols]) float32 with up @ down = the delta in the site's torch layout, scale folded in."""
        return self.b.read() * np.float32(self.scale), self.a.read()

    def lora_bias(self) -> np.ndarray | None:
        """The branch's bias times the scale [out], or None."""
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
    additive = False  # its branch gathers rows by the ids: no linear's x @ A @ B

    def low_rank(self) -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray(self.a.read().T), np.ascontiguousarray(self.b.read().T) * np.float32(self.scale)


class _Magnitude:
    """DoRA: the merged weight is ``g ⊙ (W + ΔW)`` with ``g = m / ‖W + ΔW‖``, one factor per output feature, the norm
    taken in float32 over the other axis and treated as a constant; the bias is not rescaled."""

    dora = True
    additive = False
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
