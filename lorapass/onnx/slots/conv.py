"""The convolution slot: ``y' = y + Conv1x1(Conv(x, p.lora_A; the base's strides/pads/dilations), p.lora_B)``.

``p.lora_A`` is a kernel [p.r, in, kh, kw] (PEFT's / kohya's LoCon down kernel, any kernel-shaped kind's low-rank
down factor), ``p.lora_B`` a 1x1 kernel [out, p.r, 1, 1] with the scale folded in (ONNX Runtime adapter files carry
no alpha); ``p.r`` is symbolic, so files of any rank (LoHa's r1·r2, LoKr's, blends) hot-swap. The A convolution
repeats the base's geometry, so the branch's output lines up with the base's (as kohya's LoCon computes it).
"""

from __future__ import annotations

import numpy as np

from lorapass.errors import UnsupportedError
from lorapass.kinds import Kind
from lorapass.onnx.slots.base import Branch, SlotInput, Weights, register
from lorapass.onnx.slots.linear import LinearSlot

_GEOMETRY = ("strides", "pads", "dilations")


@register
class ConvSlot(LinearSlot):
    type = "conv"

    @classmethod
    def for_target(cls, target) -> ConvSlot:
        slot = super().for_target(target)
        extra = [role for role in ("dora_factor", "lora_bias") if role in slot.record]
        if extra:
            raise UnsupportedError(f"{target.site.path!r} ({target.site.node!r}) is a convolution: its dynamic slot "
                                   f"has no {' / '.join(extra)} input (DoRA and LoRA biases apply to linear layers)")
        node = target.site.storage.node
        geometry = {name: list(node.attributes[name].as_ints()) for name in _GEOMETRY if name in node.attributes}
        if "auto_pad" in node.attributes and node.attributes["auto_pad"].as_string() not in ("", "NOTSET"):
            geometry["auto_pad"] = node.attributes["auto_pad"].as_string()
        slot.record |= {"kernel": list(target.site.kernel), "geometry": geometry}
        return slot

    def inputs(self) -> list[SlotInput]:
        rank, rec = f"{self.path}.r", self.record
        ones = [1] * len(rec["kernel"])
        return [SlotInput(rec["lora_A"], (rank, rec["in"], *rec["kernel"]), "lora_A"),
                SlotInput(rec["lora_B"], (rec["out"], rank, *ones), "lora_B")]

    def values(self, module: Kind | None, weights: Weights | None = None) -> dict[str, np.ndarray]:
        rec = self.record
        ones = [1] * len(rec["kernel"])
        if module is None or "low_rank" not in module.own_parts():
            r = rec["r"]
            return {rec["lora_A"]: np.zeros((r, rec["in"], *rec["kernel"]), np.float32),
                    rec["lora_B"]: np.zeros((rec["out"], r, *ones), np.float32)}
        up, down = module.low_rank()
        r = down.shape[0]
        if down.shape[1] != rec["in"] * int(np.prod(rec["kernel"], dtype=int)):
            return self.checked(module, {rec["lora_A"]: down, rec["lora_B"]: up})  # names the misfit
        return self.checked(module, {rec["lora_A"]: np.ascontiguousarray(down.reshape(r, rec["in"], *rec["kernel"])),
                                     rec["lora_B"]: np.ascontiguousarray(up.reshape(rec["out"], r, *ones))})

    def build(self, b: Branch, joint, inputs: dict, down=None) -> None:
        down = b.op("Conv", [joint.x, inputs["lora_A"]], f"{self.path}/lora_A/Conv", self.record["geometry"])
        joint.add(b, b.op("Conv", [down, inputs["lora_B"]], f"{self.path}/lora_B/Conv"), "lora")
