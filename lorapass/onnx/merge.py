"""Strategy ``merge``: fold every targeted module's delta into its weight, in the weight's own layout and dtype.

Each target's kind records its edits on the site's storage views (weight and bias); :func:`lorapass.onnx.storage.commit` then
writes each stored weight once (in place, or copied for the nodes that need their own, see there).
"""

from __future__ import annotations

import onnx_ir as ir

from lorapass.onnx.storage import Store, commit
from lorapass.plan import Target


def record(targets: list[Target]) -> list[Store]:
    """Record each target's edit on its site's storage; returns the stores edited, once each."""
    stores = {}
    for target in targets:
        target.module.merge(target.site)
        for view in (target.site.storage, target.site.bias_storage):
            if view is not None:
                stores.update({id(store): store for store in view.stores})
    return list(stores.values())


def merge(model: ir.Model, targets: list[Target]) -> int:
    """Rewrite ``model`` in place so each targeted weight holds its merged value; returns how many weights changed."""
    return commit(record(targets), model.graph)
