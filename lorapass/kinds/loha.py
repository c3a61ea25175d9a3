"""LoHa (LyCORIS ``hada_*``): ``ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b)``, reshaped to the weight.

A Hadamard product of two rank-r matrices is exactly a LoRA of rank r1·r2:
``u[i, (p, q)] = w1a[i, p] · w2a[i, q]`` and ``v[(p, q), j] = w1b[p, j] · w2b[q, j]``, so LoHa merges and runs
in a dynamic slot like any LoRA. On a kxk convolution w1b/w2b are [r, in·kh·kw]; the Tucker form has
``hada_t1``/``hada_t2`` [r, r, kh, kw] with w1a/w1b as [r, out] / [r, in], each factor being
``einsum('ijkl,jr,ip->prkl', t, wb, wa)`` (LyCORIS ``HadaWeightTucker``, PEFT ``make_weight_cp``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lorapass.formats.tensors import TensorRef
from lorapass.kinds.lowrank import LowRank, check_shapes
from lorapass.site import Site


def hadamard_low_rank(u1: np.ndarray, v1: np.ndarray, u2: np.ndarray, v2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) with u @ v = (u1 @ v1) ⊙ (u2 @ v2): u [out, r1·r2], v [r1·r2, n]."""
    out, n = u1.shape[0], v1.shape[1]
    u = (u1[:, :, None] * u2[:, None, :]).reshape(out, -1)
    v = (v1[:, None, :] * v2[None, :, :]).reshape(-1, n)
    return u, v


class Loha(LowRank):
    """The two Hadamard factors of one module (each ``(wa, wb[, t])``); ``r`` is ``hada_w1_b``'s rank."""

    name = "loha"

    def __init__(self, path: str, source: Path, w1: tuple[TensorRef, ...], w2: tuple[TensorRef, ...], r: int,
                 alpha: float, scale: float) -> None:
        super().__init__(path, source, r, alpha, scale)
        self.w1, self.w2 = w1, w2

    @property
    def tucker(self) -> bool:
        return len(self.w1) == 3

    def own_keys(self) -> dict[str, str]:
        names = ("a", "b", "t")
        return {f"hada_w{i}_{n}" if n != "t" else f"hada_t{i}": ref.key
                for i, factor in ((1, self.w1), (2, self.w2)) for n, ref in zip(names, factor)}

    def check_own(self, site: Site) -> None:
        expected = {}
        for i, factor in ((1, self.w1), (2, self.w2)):
            r = factor[1].shape[0]
            if self.tucker:
                expected |= {f"hada_w{i}_a": (factor[0], (r, site.out_features)),
                             f"hada_w{i}_b": (factor[1], (r, site.in_features)),
                             f"hada_t{i}": (factor[2], (r, r, *site.kernel))}
            else:
                n = site.in_features * int(np.prod(site.kernel, dtype=int))
                expected |= {f"hada_w{i}_a": (factor[0], (site.out_features, r)), f"hada_w{i}_b": (factor[1], (r, n))}
        check_shapes(self, site, expected)

    def _factor(self, factor: tuple[TensorRef, ...]) -> tuple[np.ndarray, np.ndarray]:
        if not self.tucker:
            wa, wb = factor[0].read(), factor[1].read()
            return wa, wb.reshape(wb.shape[0], -1)
        wa, wb, t = (ref.read() for ref in factor)
        return np.ascontiguousarray(wa.T), np.einsum("ij...,jn->in...", t, wb).reshape(t.shape[0], -1)

    def low_rank(self) -> tuple[np.ndarray, np.ndarray]:
        u, v = hadamard_low_rank(*self._factor(self.w1), *self._factor(self.w2))
        return u * np.float32(self.scale), v

    def _refs(self) -> list[TensorRef]:
        return [*self.w1, *self.w2, *super()._refs()]
