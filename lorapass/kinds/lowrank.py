"""What every purely low-rank kind shares (LoCon's CP form, LoHa, LoKr, blends): its whole effect is ``W + up @ down``
with the factors from :meth:`~lorapass.kinds.base.Kind.low_rank` in the site's torch layout (a convolution's
[out, in·kh·kw]), so it merges as one additive storage edit and runs in any low-rank slot."""

from __future__ import annotations

import numpy as np

from lorapass.errors import ShapeMismatchError
from lorapass.formats.tensors import TensorRef
from lorapass.kinds.base import Kind
from lorapass.site import Site


def check_shapes(kind: Kind, site: Site, expected: dict[str, tuple[TensorRef, tuple[int, ...]]]) -> None:
    """Raise ShapeMismatchError naming key, site and both shapes for the first tensor that does not fit."""
    for role, (ref, shape) in expected.items():
        if ref is not None and ref.shape != shape:
            what = f"{site.in_features}->{site.out_features}" + (f", kernel {'x'.join(map(str, site.kernel))}" if site.kernel else "")
            raise ShapeMismatchError(
                f"{kind.source}: {ref.key} has shape {list(ref.shape)}, site {site.path!r} ({site.op} {site.node!r}, "
                f"{what}, r={kind.r}) needs {list(shape)}")


class LowRank(Kind):
    """A kind whose delta is exactly its low-rank update."""

    site_kinds = ("linear", "packed", "conv")
    additive = True

    def own_parts(self) -> set[str]:
        return {"low_rank"}

    def merge_delta(self, site: Site) -> None:
        site.storage.add(*self.low_rank())

    def merged(self, w: np.ndarray) -> np.ndarray:
        up, down = self.low_rank()
        return w + (up @ down).reshape(w.shape)
