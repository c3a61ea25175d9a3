"""The bank slot (strategy ``multi``): every adapter's LoRA weights for one linear site, chosen per batch row.

``p.lora_A_bank`` [slots, in, r] and ``p.lora_B_bank`` [slots, r, out] stack what a linear slot holds (PEFT's
A transposed; PEFT's B transposed with the scale folded in): slot 0 is the base model (zeros), slot k the k-th
adapter, zeros where that adapter does not target the site; ``r`` is the largest rank among them, smaller ranks
padded with zeros (exact: padded columns of A meet zero rows of B). Row b of the batch gathers slot
``lora_ids[b]`` of both banks, ``delta[b] = (x[b] @ A[ids[b]]) @ B[ids[b]]``: PEFT's mixed-batch forward
(``adapter_names``), one batched MatMul per side. ``slots`` and ``r`` are symbolic, so a bank of any size and
rank can replace the default at run time (an ONNX Runtime adapter file written by ``export-adapter``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lorapass.kinds import Kind
from lorapass.onnx.slots.base import Branch, Slot, SlotInput, register
from lorapass.onnx.slots.linear import LinearSlot

SLOTS = "lora_slots"
"""The symbolic bank size (base slot + adapters) every bank shares."""


def input_names(path: str) -> tuple[str, str]:
    """The graph input names of a site's banks (stable: bank files are keyed by them)."""
    return f"{path}.lora_A_bank", f"{path}.lora_B_bank"


@register
class BankSlot(Slot):
    type = "bank"
    banked = True

    @classmethod
    def for_site(cls, site, params: Sequence, modules: Sequence[Kind | None], names: Sequence[str | None],
                 ids: str) -> BankSlot:
        """The bank of ``site`` for adapters ``names`` (slots 1..N); ``params``: the LoRA parameters each rule
        gives the site (the largest rank is the bank's), ``modules``: each adapter's module there (None: none)."""
        a, b = input_names(site.path)
        return cls({"slot": cls.type, "path": site.path, "lora_A": a, "lora_B": b, "in": site.in_features,
                    "out": site.out_features, "r": max(p.r for p in params), "slots": len(names) + 1, "ids": ids,
                    "adapters": list(names), "ranks": [m.r if m else 0 for m in modules],
                    "alphas": [m.alpha if m else None for m in modules],
                    "scales": [m.scale if m else None for m in modules]})

    def inputs(self) -> list[SlotInput]:
        rank, rec = f"{self.path}.r", self.record
        return [SlotInput(rec["lora_A"], (SLOTS, rec["in"], rank), "lora_A"),
                SlotInput(rec["lora_B"], (SLOTS, rank, rec["out"]), "lora_B")]

    def values(self, modules: Sequence[Kind | None]) -> dict[str, np.ndarray]:
        """The banks for one module (or None) per adapter, in id order: slot 0 zeros, then each adapter's
        linear-slot values (shapes checked), padded to the largest rank (the record's rank if none has one)."""
        rec = self.record
        linear = LinearSlot({**rec, "slot": LinearSlot.type})
        rank = max([m.r for m in modules if m is not None] or [rec["r"]])
        a = np.zeros((len(modules) + 1, rec["in"], rank), np.float32)
        b = np.zeros((len(modules) + 1, rank, rec["out"]), np.float32)
        for k, m in enumerate(modules, start=1):
            if m is not None:
                part = linear.values(m)
                down, up = part[rec["lora_A"]], part[rec["lora_B"]]
                a[k, :, :down.shape[1]], b[k, :up.shape[0]] = down, up
        return {rec["lora_A"]: a, rec["lora_B"]: b}

    def branch(self, b: Branch, x, inputs: dict) -> object:
        """``x``: the site's input as [batch, tokens, in]; ``inputs["ids"]``: the checked row ids."""
        a = b.op("Gather", [inputs["lora_A"], inputs["ids"]], f"{self.path}/lora_A/Gather")
        down = b.op("MatMul", [x, a], f"{self.path}/lora_A/MatMul")
        up = b.op("Gather", [inputs["lora_B"], inputs["ids"]], f"{self.path}/lora_B/Gather")
        return b.op("MatMul", [down, up], f"{self.path}/lora_B/MatMul")
