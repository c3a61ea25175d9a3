"""The linear slot: ``y' = y + (x @ p.lora_A) @ p.lora_B`` beside a linear site.

``p.lora_A`` is [in, p.r] (PEFT's A transposed), ``p.lora_B`` [p.r, out] (PEFT's B transposed with the scale
folded in: ONNX Runtime adapter files carry no alpha); ``p.r`` is symbolic, so adapters of any rank fit.
"""

from __future__ import annotations

import numpy as np

from lorapass.kinds import Kind
from lorapass.onnx.slots.base import Branch, Slot, SlotInput, register


def input_names(path: str) -> tuple[str, str]:
    """The graph input names of a site's LoRA weights (stable: adapters are keyed by them)."""
    return f"{path}.lora_A", f"{path}.lora_B"


@register
class LinearSlot(Slot):
    type = "linear"

    @classmethod
    def for_target(cls, target) -> LinearSlot:
        return cls(cls.record_of(target))

    @classmethod
    def record_of(cls, target) -> dict:
        """The ``lorapass.lora`` record of a target's slot: type, path, input names, features, r, alpha, scale."""
        site, params = target.site, target.params
        a, b = input_names(site.path)
        return {"slot": cls.type, "path": site.path, "lora_A": a, "lora_B": b, "in": site.in_features,
                "out": site.out_features, "r": params.r, "alpha": params.alpha, "scale": params.scale}

    def inputs(self) -> list[SlotInput]:
        rank = f"{self.path}.r"
        rec = self.record
        return [SlotInput(rec["lora_A"], (rec["in"], rank), "lora_A"), SlotInput(rec["lora_B"], (rank, rec["out"]), "lora_B")]

    def values(self, module: Kind | None) -> dict[str, np.ndarray]:
        rec = self.record
        if module is None:
            r = rec["r"]
            return {rec["lora_A"]: np.zeros((rec["in"], r), np.float32), rec["lora_B"]: np.zeros((r, rec["out"]), np.float32)}
        up, down = module.low_rank()
        return self.checked(module, {rec["lora_A"]: np.ascontiguousarray(down.T), rec["lora_B"]: np.ascontiguousarray(up.T)})

    def branch(self, b: Branch, x, inputs: dict) -> object:
        down = b.op("MatMul", [x, inputs["lora_A"]], f"{self.path}/lora_A/MatMul")
        return self.up(b, down, inputs)

    def up(self, b: Branch, down, inputs: dict) -> object:
        """The B half of the branch, from ``down`` = x @ A (shared with other slots when fused)."""
        return b.op("MatMul", [down, inputs["lora_B"]], f"{self.path}/lora_B/MatMul")
