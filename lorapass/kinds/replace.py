"""Full replacements: trained copies of whole parameters (``modules_to_save``, ``bias="all"/"lora_only"``) and of
some embedding rows (``trainable_token_indices``). PEFT applies them by module name, not through target_modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lorapass.errors import ShapeMismatchError
from lorapass.formats.tensors import TensorRef
from lorapass.kinds.base import Kind, weight_shape
from lorapass.site import Site


class Replace(Kind):
    """A module whose weight and/or bias the adapter replaces whole (nothing low-rank)."""

    name = "replaced module"
    site_kinds = ("linear", "embedding", "norm")
    targeted = False

    def __init__(self, path: str, source: Path, replaced: dict[str, TensorRef],
                 saved_base: TensorRef | None = None) -> None:
        super().__init__(path, source, 0, 0.0, 0.0, replaced=replaced, saved_base=saved_base)


class TrainableTokens(Kind):
    """Rows ``indices`` of a table [vocab, dim] replaced by ``rows`` [k, dim] (PEFT's ``trainable_tokens_delta``,
    which holds the new rows, not a difference). PEFT ties an output head that shares the embedding's weight to the
    same rows, so such a head (the same stored table, or an exporter's copy of it) changes too."""

    name = "trainable tokens"
    site_kinds = ("embedding", "linear")
    targeted = False

    def __init__(self, path: str, source: Path, rows: TensorRef, indices: list[int]) -> None:
        super().__init__(path, source, 0, 0.0, 0.0)
        self.rows, self.indices = rows, [int(i) for i in indices]

    def own_keys(self) -> dict[str, str]:
        return {"token_rows": self.rows.key}

    def own_parts(self) -> set[str]:
        return {"tokens"}

    def check_own(self, site: Site) -> None:
        vocab, dim = weight_shape(site)
        if self.rows.shape != (len(self.indices), dim):
            raise ShapeMismatchError(f"{self.source}: {self.rows.key} has shape {list(self.rows.shape)}, site {site.path!r} "
                                     f"({site.op} {site.node!r}) needs [{len(self.indices)}, {dim}] for token indices "
                                     f"{self.indices}")
        bad = [i for i in self.indices if not 0 <= i < vocab]
        if bad or len(set(self.indices)) != len(self.indices):
            raise ShapeMismatchError(f"{self.source}: trainable_token_indices {self.indices} for {self.rows.key} must be "
                                     f"distinct rows of the {vocab}-row table of site {site.path!r} ({site.node!r}); "
                                     f"{'out of range: ' + str(bad) if bad else 'repeated'}")

    def merged(self, w: np.ndarray) -> np.ndarray:
        out = np.array(w, dtype=np.float32, copy=True)
        out[self.indices] = self.rows.read()
        return out

    def merge_delta(self, site: Site) -> None:
        site.storage.update(self.merged)

    def delta_rows(self, w: np.ndarray) -> np.ndarray:
        """The new rows minus the base rows of ``w`` [vocab, dim]: what a dynamic graph adds at these ids."""
        return self.rows.read() - w[self.indices].astype(np.float32)

    def tied_sites(self, site: Site, sites: list[Site]) -> list[Site]:
        if site.kind != "embedding" or site.storage is None:
            return []
        table = None
        out = []
        for other in sites:
            if other.kind != "linear" or other.storage is None or tuple(other.storage.shape) != tuple(site.storage.shape):
                continue
            if other.storage.store is not site.storage.store:
                table = site.storage.read() if table is None else table
                if not np.array_equal(other.storage.read(), table):
                    continue
            out.append(other)
        return out

    def _refs(self) -> list[TensorRef]:
        return [self.rows]

    def describe(self, site: Site | None = None) -> dict:
        return super().describe(site) | {"token_indices": self.indices}
