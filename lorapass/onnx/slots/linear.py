"""The low-rank slots: ``y' = y + (x @ p.lora_A) @ p.lora_B`` beside a linear site, and its embedding form.

``p.lora_A`` is [in, p.r] (PEFT's A transposed), ``p.lora_B`` [p.r, out] (PEFT's B transposed with the scale
folded in: ONNX Runtime adapter files carry no alpha); ``p.r`` is symbolic, so adapters of any rank fit.

Flags in the record add inputs: ``dora`` adds ``p.dora_factor`` [out] (DoRA's g = m / ‖W + s·B·A‖, precomputed
per adapter from the base weight; ones for a plain LoRA adapter) and the branch becomes
``g ⊙ (x·W + x·A·B) + bias`` (the bias joins after the factor); ``lora_bias`` adds ``p.lora_bias`` [out]
(PEFT's ``lora_B.bias`` times the scale) to the branch.
"""

from __future__ import annotations

import numpy as np

from lorapass.errors import AdapterError
from lorapass.kinds import Kind
from lorapass.onnx.slots.base import Branch, Slot, SlotInput, Weights, register


def input_names(path: str) -> tuple[str, str]:
    """The graph input names of a site's LoRA weights (stable: adapters are keyed by them)."""
    return f"{path}.lora_A", f"{path}.lora_B"


@register
class LinearSlot(Slot):
    type = "linear"
    parts = frozenset({"low_rank"})

    @classmethod
    def for_target(cls, target) -> LinearSlot:
        site, params, module = target.site, target.params, target.module
        a, b = input_names(site.path)
        record = {"slot": cls.type, "path": site.path, "lora_A": a, "lora_B": b, "in": site.in_features,
                  "out": site.out_features, "r": params.r, "alpha": params.alpha, "scale": params.scale}
        if target.rule.use_dora or (module is not None and module.dora):
            record["dora_factor"] = f"{site.path}.dora_factor"
        if module is not None and getattr(module, "bias", None) is not None:
            record["lora_bias"] = f"{site.path}.lora_bias"
        return cls(record | ({"default": "adapter"} if module is not None else {}))

    def inputs(self) -> list[SlotInput]:
        rank = f"{self.path}.r"
        rec = self.record
        out = [SlotInput(rec["lora_A"], (rec["in"], rank), "lora_A"), SlotInput(rec["lora_B"], (rank, rec["out"]), "lora_B")]
        out += [SlotInput(rec[role], (rec["out"],), role) for role in ("dora_factor", "lora_bias") if role in rec]
        return out

    def factors(self, module: Kind) -> tuple[np.ndarray, np.ndarray]:
        """(A input, B input) from the module's low-rank delta."""
        up, down = module.low_rank()
        return np.ascontiguousarray(down.T), np.ascontiguousarray(up.T)

    def values(self, module: Kind | None, weights: Weights | None = None) -> dict[str, np.ndarray]:
        rec = self.record
        low_rank = module is not None and "low_rank" in module.own_parts()
        if low_rank:
            self._check_fits(module)
            a, b = self.factors(module)
        else:
            a, b = np.zeros((rec["in"], rec["r"]), np.float32), np.zeros((rec["r"], rec["out"]), np.float32)
        out = {rec["lora_A"]: a, rec["lora_B"]: b}
        if "dora_factor" in rec:  # g from the weight the norm is of (a replaced one where the adapter has it)
            full = module.full("weight") if low_rank and module.dora else None
            out[rec["dora_factor"]] = (np.ones(rec["out"], np.float32) if not (low_rank and module.dora) else
                                       module.factor(full.read() if full is not None else weights.site(self.path)))
        if "lora_bias" in rec:
            bias = module.lora_bias() if low_rank else None
            out[rec["lora_bias"]] = bias if bias is not None else np.zeros(rec["out"], np.float32)
        return self.checked(module, out) if module is not None else out

    def _check_fits(self, module: Kind) -> None:
        rec = self.record
        if module.dora and "dora_factor" not in rec:
            raise AdapterError(f"{module.source}: {module.key('magnitude')} is DoRA, but the slot of {self.path!r} has "
                               "no DoRA factor input; rewrite the graph with this adapter, or with --dora")
        if getattr(module, "bias", None) is not None and "lora_bias" not in rec:
            raise AdapterError(f"{module.source}: {module.key('lora_bias')} is a lora_B bias, but the slot of "
                               f"{self.path!r} has no bias input; rewrite the graph with this adapter")

    def down(self, b: Branch, x, inputs: dict):
        """The first half of the branch: x @ A."""
        return b.op("MatMul", [x, inputs["lora_A"]], f"{self.path}/lora_A/MatMul")

    def build(self, b: Branch, joint, inputs: dict, down=None) -> None:
        """The branch from ``down`` = x @ A (computed here unless shared with other slots when fused)."""
        down = self.down(b, joint.x, inputs) if down is None else down
        delta = b.op("MatMul", [down, inputs["lora_B"]], f"{self.path}/lora_B/MatMul")
        if "lora_bias" in inputs:
            delta = b.op("Add", [delta, inputs["lora_bias"]], f"{self.path}/lora_B/bias_Add")
        if "dora_factor" in inputs:
            pre = joint.before_bias()
            summed = b.op("Add", [pre, delta], f"{self.path}/lora/Add")
            joint.replace(b, pre, b.op("Mul", [summed, inputs["dora_factor"]], f"{self.path}/lora/dora_Mul"))
        else:
            joint.add(b, delta, "lora")


@register
class EmbeddingSlot(LinearSlot):
    """``y' = y + p.lora_A[ids] @ p.lora_B`` beside an embedding: ``p.lora_A`` [rows, p.r] is PEFT's
    ``lora_embedding_A`` transposed, ``p.lora_B`` [p.r, dim] its ``lora_embedding_B`` transposed times the scale."""

    type = "embedding"

    def factors(self, module: Kind) -> tuple[np.ndarray, np.ndarray]:
        return module.low_rank()

    def down(self, b: Branch, x, inputs: dict):
        return b.op("Gather", [inputs["lora_A"], x], f"{self.path}/lora_A/Gather", {"axis": 0})
