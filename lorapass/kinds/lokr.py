"""LoKr (LyCORIS ``lokr_*``): ``ΔW = scale · kron(W1, W2)`` reshaped to the weight.

W1 [a, c] is ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``; W2 is ``lokr_w2`` ([b, d] or [b, d, kh, kw]),
``lokr_w2_a @ lokr_w2_b`` ([b, r] @ [r, d·kh·kw]) or the Tucker form ``einsum('ijkl,ip,jr->prkl', lokr_t2,
lokr_w2_a [r, b], lokr_w2_b [r, d])``. On a convolution W1 acts as [a, c, 1, 1] (LyCORIS ``make_kron``), which in
torch's [out, in·kh·kw] matrix form is exactly ``kron(W1, W2.reshape(b, -1))``.

By the mixed-product rule ``kron(U1 V1, U2 V2) = kron(U1, U2) · kron(V1, V2)``, so LoKr is exactly a LoRA of rank
rank(W1)·rank(W2) (a full factor contributes min of its sides) and merges and runs in a dynamic slot like any LoRA.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lorapass.errors import ShapeMismatchError
from lorapass.formats.tensors import TensorRef
from lorapass.kinds.lowrank import LowRank
from lorapass.site import Site


def _full(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A full matrix as the thinner of (W, I) and (I, W)."""
    rows, cols = w.shape
    return (np.eye(rows, dtype=np.float32), w) if rows <= cols else (w, np.eye(cols, dtype=np.float32))


class Lokr(LowRank):
    """The Kronecker factors of one module: ``w1`` is (lokr_w1,) or (lokr_w1_a, lokr_w1_b); ``w2`` is (lokr_w2,),
    (lokr_w2_a, lokr_w2_b) or (lokr_w2_a, lokr_w2_b, lokr_t2)."""

    name = "lokr"
    _ROLES = {1: ("lokr_w1",), 2: ("lokr_w1_a", "lokr_w1_b")}

    def __init__(self, path: str, source: Path, w1: tuple[TensorRef, ...], w2: tuple[TensorRef, ...], r: int,
                 alpha: float, scale: float) -> None:
        super().__init__(path, source, r, alpha, scale)
        self.w1, self.w2 = w1, w2

    def own_keys(self) -> dict[str, str]:
        roles2 = {1: ("lokr_w2",), 2: ("lokr_w2_a", "lokr_w2_b"), 3: ("lokr_w2_a", "lokr_w2_b", "lokr_t2")}
        return (dict(zip(self._ROLES[len(self.w1)], (r.key for r in self.w1)))
                | dict(zip(roles2[len(self.w2)], (r.key for r in self.w2))))

    def _shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, ...] | None]:
        """((a, c), (b, e), kernel of W2 or None when flattened) where W2 as a matrix is [b, e]."""
        w1 = self.w1
        a_c = w1[0].shape if len(w1) == 1 else (w1[0].shape[0], w1[1].shape[1])
        w2 = self.w2
        if len(w2) == 1:
            b, d, *kernel = w2[0].shape
            return a_c, (b, d * int(np.prod(kernel, dtype=int))), tuple(kernel)
        if len(w2) == 3:
            t = w2[2].shape
            return a_c, (w2[0].shape[1], w2[1].shape[1] * int(np.prod(t[2:], dtype=int))), tuple(t[2:])
        return a_c, (w2[0].shape[0], w2[1].shape[1]), None

    def _check_factors(self) -> None:
        """ShapeMismatchError naming the key of a factor with the wrong number of axes, or of a product whose inner
        sizes differ (w1_a @ w1_b, w2_a @ w2_b, or the Tucker core's against w2_a and w2_b)."""
        refs = dict(zip(self.own_keys(), (*self.w1, *self.w2)))
        for role, ref in refs.items():
            kernel = role in ("lokr_w2", "lokr_t2")
            if len(ref.shape) not in ((2, 4) if kernel else (2,)):
                raise ShapeMismatchError(f"{self.source}: LoKr module {self.path!r}: {ref.key} has shape "
                                         f"{list(ref.shape)}; {role} is a matrix{' or a 4-D kernel' if kernel else ''}")
        inner = [("lokr_w1_a", 1, "lokr_w1_b", 0)]
        inner += ([("lokr_t2", 0, "lokr_w2_a", 0), ("lokr_t2", 1, "lokr_w2_b", 0)] if "lokr_t2" in refs
                  else [("lokr_w2_a", 1, "lokr_w2_b", 0)])
        for left, i, right, j in inner:
            if left in refs and refs[left].shape[i] != refs[right].shape[j]:
                raise ShapeMismatchError(f"{self.source}: LoKr module {self.path!r}: {refs[left].key} "
                                         f"{list(refs[left].shape)} and {refs[right].key} {list(refs[right].shape)} do "
                                         f"not compose (axis {i} of {left} must equal axis {j} of {right})")

    def check_own(self, site: Site) -> None:
        self._check_factors()
        (a, c), (b, e), kernel = self._shapes()
        n = site.in_features * int(np.prod(site.kernel, dtype=int))
        fits = a * b == site.out_features and c * e == n and site.in_features % c == 0
        if kernel is not None and kernel != site.kernel:
            fits = False
        if not fits:
            shapes = ", ".join(f"{key} {list(ref.shape)}" for key, ref in zip(self.own_keys().values(), (*self.w1, *self.w2)))
            raise ShapeMismatchError(
                f"{self.source}: LoKr module {self.path!r} ({shapes}) gives kron shape [{a * b}, {c * e}]"
                + (f" with kernel {'x'.join(map(str, kernel))}" if kernel else "") + ", site "
                f"{site.path!r} ({site.op} {site.node!r}, {site.in_features}->{site.out_features}"
                + (f", kernel {'x'.join(map(str, site.kernel))}" if site.kernel else "") + f") needs [{site.out_features}, {n}]")

    def _factor1(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self.w1) == 1:
            return _full(self.w1[0].read())
        return self.w1[0].read(), self.w1[1].read()

    def _factor2(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self.w2) == 1:
            w = self.w2[0].read()
            return _full(w.reshape(w.shape[0], -1))
        wa, wb = self.w2[0].read(), self.w2[1].read()
        if len(self.w2) == 2:
            return wa, wb
        t = self.w2[2].read()
        return np.ascontiguousarray(wa.T), np.einsum("ij...,jd->id...", t, wb).reshape(t.shape[0], -1)

    def low_rank(self) -> tuple[np.ndarray, np.ndarray]:
        u1, v1 = self._factor1()
        u2, v2 = self._factor2()
        return np.kron(u1, u2) * np.float32(self.scale), np.kron(v1, v2)

    def _refs(self) -> list[TensorRef]:
        return [*self.w1, *self.w2, *super()._refs()]
