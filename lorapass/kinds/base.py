"""The verbs every adapter kind has: its rank and scale, a shape check against a site, and the edits it records on a
site's storage (merge) or computes on a float32 weight (frontends that edit weights directly).

A kind may also carry full replacement tensors of the site's own parameters (``replaced``: ``weight`` / ``bias``, as
PEFT saves ``modules_to_save`` and ``bias="all"/"lora_only"``), applied before its delta, and a saved copy of the base
weight (``saved_base``, PEFT's ``save_embedding_layers``): equal to the graph's, it changes nothing; different, it
replaces the graph's weight like a trained module.
"""

from __future__ import annotations

from abc import ABC
from pathlib import Path
from typing import ClassVar

import numpy as np

from lorapass.errors import AdapterError, ShapeMismatchError, UnsupportedError
from lorapass.formats.tensors import TensorRef
from lorapass.site import Site


class Kind(ABC):
    """One adapted module of an adapter: its tensors and its scale, whatever file they came from."""

    name: ClassVar[str]  # the kind's name in reports
    site_kinds: ClassVar[tuple[str, ...]] = ("linear",)  # the site kinds it applies to
    targeted: ClassVar[bool] = True  # chosen by the rules' target_modules (False: applied by name, as PEFT does)
    dora: ClassVar[bool] = False  # whether the merged weight is rescaled per output feature (DoRA)
    additive: ClassVar[bool] = False
    """Whether the module's whole effect is ``W + low_rank()`` at a linear site (strategies that only add a low-rank
    branch, such as a blend, refuse the others: DoRA, LoRA biases, embeddings, replacements)."""

    @property
    def additive_branch(self) -> bool:
        """Whether the module's whole effect is a branch added to a linear's output: the low-rank delta plus, at
        most, a LoRA bias (what multi's banks carry)."""
        return self.additive

    def __init__(self, path: str, source: Path, r: int, alpha: float, scale: float,
                 replaced: dict[str, TensorRef] | None = None, saved_base: TensorRef | None = None) -> None:
        self.path, self.source = path, source
        self.r, self.alpha, self.scale = r, alpha, scale
        self.replaced = dict(replaced or {})
        self.saved_base = saved_base
        self._base_differs: dict[int, bool] = {}

    def own_keys(self) -> dict[str, str]:
        """Role -> file key of the kind's own tensors (beyond replacements)."""
        return {}

    def keys(self) -> dict[str, str]:
        """Role -> file key of this module's tensors (for messages)."""
        keys = self.own_keys() | {role: ref.key for role, ref in self.replaced.items()}
        return keys | ({"base_weight": self.saved_base.key} if self.saved_base is not None else {})

    def key(self, role: str | None = None) -> str:
        """The file key of one tensor (the first when ``role`` is None)."""
        keys = self.keys()
        return keys[role] if role is not None else next(iter(keys.values()))

    def check(self, site: Site) -> None:
        """Raise ShapeMismatchError naming key, both shapes and the site if this module does not fit ``site``."""
        if site.kind not in self.site_kinds:
            raise UnsupportedError(f"{self.source}: {self.key()} is {self.name}, which lorapass applies to "
                                   f"{'/'.join(self.site_kinds)} layers; site {site.path!r} is a {site.kind} ({site.op})")
        shapes = {"weight": weight_shape(site), "bias": (site.out_features,)}
        bases = {"base_weight": self.saved_base} if self.saved_base is not None else {}
        for role, ref in (self.replaced | bases).items():
            if role == "bias" and site.bias is None:
                raise AdapterError(f"{self.source}: {ref.key} replaces the bias of site {site.path!r} ({site.op} "
                                   f"{site.node!r}), which has none (PEFT would ignore it)")
            want = shapes["bias" if role == "bias" else "weight"]
            if ref.shape != want:
                raise ShapeMismatchError(f"{self.source}: {ref.key} has shape {list(ref.shape)}, site {site.path!r} "
                                         f"({site.op} {site.node!r}) has {role.replace('_', ' ')} {list(want)}")
        self.check_own(site)

    def check_own(self, site: Site) -> None:
        """The shape checks of the kind's own tensors."""

    def own_parts(self) -> set[str]:
        """What the kind itself adds: ``low_rank`` (a branch), ``tokens`` (replaced rows)."""
        return set()

    def parts(self, site: Site | None) -> set[str]:
        """What this module changes at ``site``: its own parts, plus ``weight`` / ``bias`` where it replaces them
        (a saved base weight only where it differs from the site's; without a site it counts)."""
        out = set(self.replaced) | self.own_parts()
        if self.saved_base is not None and (site is None or site.storage is None or self.base_differs(site)):
            out.add("weight")
        return out

    def full(self, role: str) -> TensorRef | None:
        """The saved full tensor for the site's ``weight`` / ``bias``, if any (a saved base weight counts)."""
        return self.replaced.get(role) or (self.saved_base if role == "weight" else None)

    def replacement(self, site: Site, role: str) -> np.ndarray | None:
        """The full float32 tensor (torch layout) replacing the site's ``weight`` / ``bias``, if any."""
        ref = self.full(role) if role in self.parts(site) else None
        return ref.read() if ref is not None else None

    def base_differs(self, site: Site) -> bool:
        """Whether the saved base weight differs from the graph's (compared in the graph's dtype)."""
        view = site.storage
        if self.saved_base is None or view is None:
            return False
        if id(view) not in self._base_differs:
            saved = self.saved_base.read().astype(_numpy_dtype(view.dtype))
            self._base_differs[id(view)] = not np.array_equal(saved.astype(np.float32), view.read())
        return self._base_differs[id(view)]

    def merge(self, site: Site) -> None:
        """Record this module's edits on the site's storage views: replacements first, then the delta."""
        for role in ("weight", "bias"):
            value = self.replacement(site, role)
            if value is not None:
                view = site.storage if role == "weight" else self.bias_view(site)
                view.update(lambda w, v=value: v.reshape(w.shape).astype(np.float32))
        self.merge_delta(site)

    def bias_view(self, site: Site):
        """The site's bias storage view (UnsupportedError when its bias is computed, not a constant)."""
        if site.bias_storage is None:
            raise UnsupportedError(f"{self.source}: {self.key()} changes the bias of site {site.path!r} ({site.node!r}), "
                                   "whose bias the graph computes instead of reading a constant")
        return site.bias_storage

    def merge_delta(self, site: Site) -> None:
        """Record the kind's own delta (none for a pure replacement)."""

    def lora_bias(self) -> np.ndarray | None:
        """The branch's bias times the scale [out] (PEFT's ``lora_bias``), or None."""
        return None

    def merged(self, w: np.ndarray) -> np.ndarray:
        """The merged float32 weight (torch layout) from the base ``w``, for frontends that edit weights directly."""
        return w

    def tied_sites(self, site: Site, sites: list[Site]) -> list[Site]:
        """Other sites this module also changes (a tied output head for edits of the parameter itself)."""
        return []

    def describe(self, site: Site | None = None) -> dict:
        """What the module holds, for ``inspect``: its kind, tensor bytes and notes."""
        refs = self._refs() + ([self.saved_base] if site is not None and "weight" in self.parts(site)
                               and "weight" not in self.replaced else [])
        numel = int(sum(np.prod(ref.shape) for ref in refs))
        itemsize = _numpy_dtype(site.dtype).itemsize if site is not None else 4
        info = {"kind": self.name, "elements": numel, "bytes": numel * itemsize}
        if self.replaced:
            info["replaces"] = sorted(self.replaced)
        if self.saved_base is not None and site is not None and site.storage is not None:
            info["saved_base_weight"] = ("differs from the graph's: applied as a replaced weight"
                                         if self.base_differs(site) else "equal to the graph's: nothing to apply")
        return info

    def _refs(self) -> list[TensorRef]:
        return list(self.replaced.values())


def weight_shape(site: Site) -> tuple[int, ...]:
    """The site's weight shape in torch's layout ([out, in]; an embedding's table [rows, dim])."""
    if site.storage is not None:
        return tuple(site.storage.shape)
    return (site.in_features, site.out_features) if site.kind == "embedding" else (site.out_features, site.in_features)


def _numpy_dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype({"float": "float32"}.get(name, name))
