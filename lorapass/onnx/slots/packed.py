"""The packed slot: one LoRA branch beside a node whose weight packs several modules (q/k/v rows).

``y' = y + (x @ P.lora_A) @ P.lora_B`` with P the packed node's path: ``P.lora_A`` [in, R] is the parts' A
matrices side by side (R = r_q + r_k + r_v, symbolic), ``P.lora_B`` [R, out] block-structured: the rows of
part i's rank hold its B (transposed, scale folded in) in its own output columns, zeros elsewhere. That is
each part's own LoRA exactly, and an adapter file keyed by the graph's two input names, whatever parts an
adapter has (a part it lacks has rank 0). A DoRA-ready packed slot also has ``P.dora_factor`` [out]: each DoRA
part's factor on its rows, ones elsewhere.
"""

from __future__ import annotations

import numpy as np

from lorapass.errors import ShapeMismatchError
from lorapass.kinds import Kind
from lorapass.onnx.slots.base import Weights, register
from lorapass.onnx.slots.linear import LinearSlot, input_names


@register
class PackedSlot(LinearSlot):
    type = "packed"

    @classmethod
    def for_targets(cls, targets: list) -> PackedSlot:
        first = targets[0].site
        a, b = input_names(first.packed)
        parts, seen = [], set()
        for t in targets:
            if t.site.path in seen:
                continue
            seen.add(t.site.path)
            start, stop, _ = t.site.storage.rows.indices(t.site.storage.store.shape[0])
            parts.append({"path": t.site.path, "start": start, "stop": stop, "r": t.params.r,
                          "alpha": t.params.alpha, "scale": t.params.scale})
        record = {"slot": cls.type, "path": first.packed, "lora_A": a, "lora_B": b, "in": first.in_features,
                  "out": first.storage.store.shape[0], "r": sum(p["r"] for p in parts), "parts": parts}
        if any(t.rule.use_dora or (t.module is not None and t.module.dora) for t in targets):
            record["dora_factor"] = f"{first.packed}.dora_factor"
        return cls(record)

    @classmethod
    def for_target(cls, target) -> PackedSlot:
        return cls.for_targets([target])

    @property
    def paths(self) -> list[str]:
        return [part["path"] for part in self.record["parts"]]

    def values(self, module: Kind | None, weights: Weights | None = None) -> dict[str, np.ndarray]:
        return self.values_for({} if module is None else {module.path: module}, weights)

    def values_for(self, modules: dict[str, Kind], weights: Weights | None = None) -> dict[str, np.ndarray]:
        rec = self.record
        for module in modules.values():
            self._check_fits(module)
        factor = {rec["dora_factor"]: self._factors(modules, weights)} if "dora_factor" in rec else {}
        if not any(path in modules for path in self.paths):
            return {rec["lora_A"]: np.zeros((rec["in"], rec["r"]), np.float32),
                    rec["lora_B"]: np.zeros((rec["r"], rec["out"]), np.float32)} | factor
        downs, ups = [], []
        for part in rec["parts"]:
            module = modules.get(part["path"])
            if module is None:
                continue
            up, down = module.low_rank()
            rows = part["stop"] - part["start"]
            if up.shape[0] != rows or down.shape[1] != rec["in"]:
                raise ShapeMismatchError(
                    f"{module.source}: {module.key()} gives {part['path']} a delta of {[up.shape[0], down.shape[1]]}, "
                    f"its rows {part['start']}:{part['stop']} of the packed input {rec['lora_B']!r} need {[rows, rec['in']]}")
            downs.append(down)
            ups.append((part, up))
        rank = sum(d.shape[0] for d in downs)
        b = np.zeros((rank, rec["out"]), np.float32)
        at = 0
        for part, up in ups:
            b[at:at + up.shape[1], part["start"]:part["stop"]] = up.T
            at += up.shape[1]
        return {rec["lora_A"]: np.ascontiguousarray(np.concatenate(downs, axis=0).T), rec["lora_B"]: b} | factor

    def _factors(self, modules: dict[str, Kind], weights: Weights) -> np.ndarray:
        """DoRA's factor per output row of the packed weight: each DoRA part's g on its rows (the norm is per row,
        so a row block's own is exact), ones elsewhere."""
        g = np.ones(self.record["out"], np.float32)
        for part in self.record["parts"]:
            module = modules.get(part["path"])
            if module is not None and module.dora:
                g[part["start"]:part["stop"]] = module.factor(weights.site(part["path"]))
        return g
