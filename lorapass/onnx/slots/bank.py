"""The bank slot (strategy ``multi``): every adapter's LoRA weights for one site, chosen per batch row.

A bank stacks, for slot 0 (the base model: zeros) and then each adapter, what the site's dynamic slot would
hold for that adapter (its ``inner`` slot: a linear site's A and B, or a packed node's side-by-side A and
block-structured B): ``p.lora_A_bank`` [slots, in, r] and ``p.lora_B_bank`` [slots, r, out], B with the scale
folded in, zeros where an adapter does not target the site, and, where an adapter has PEFT's ``lora_bias``,
``p.lora_bias_bank`` [slots, out] (the bias times the scale; linear sites). ``r`` is the largest rank among the
adapters, smaller ranks padded with zeros (exact: padded columns of A meet zero rows of B). Row b of the batch
gathers slot ``lora_ids[b]`` of the banks, ``delta[b] = (x[b] @ A[ids[b]]) @ B[ids[b]] (+ bias[ids[b]])``: PEFT's
mixed-batch forward (``adapter_names``), one batched MatMul per side. ``slots`` and ``r`` are symbolic, so a bank of any size and
rank can replace the default at run time (an ONNX Runtime adapter file written by ``export-adapter``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lorapass.errors import UnsupportedError
from lorapass.kinds import Kind
from lorapass.onnx.slots.base import Branch, Slot, SlotInput, from_record, register

SLOTS = "lora_slots"
"""The symbolic bank size (base slot + adapters) every bank shares."""


def input_names(path: str) -> tuple[str, str]:
    """The graph input names of a site's banks (stable: bank files are keyed by them)."""
    return f"{path}.lora_A_bank", f"{path}.lora_B_bank"


@register
class BankSlot(Slot):
    type = "bank"
    banked = True
    parts = frozenset({"low_rank"})  # additive LoRA only: strategy multi refuses the other kinds

    @classmethod
    def around(cls, inner: Slot, modules: Sequence[dict[str, Kind]], names: Sequence[str | None], ids: str) -> BankSlot:
        """The bank of ``inner``'s site for adapters ``names`` (ids 1..N), ``modules[k]`` adapter k's modules there
        (by path; empty: none). Its rank is the largest adapter's (the inner slot's when all are empty)."""
        a, b = input_names(inner.path)
        rec = inner.record
        ranks = [sum(m.r for m in ms.values()) for ms in modules]
        biased = [m for ms in modules for m in ms.values() if m.lora_bias() is not None]
        if biased and rec["slot"] != "linear":
            raise UnsupportedError(f"{biased[0].source}: {biased[0].key('lora_bias')} is a LoRA bias at "
                                   f"{inner.path!r}, a {rec['slot']} site: multi banks carry LoRA biases on linear "
                                   "sites only")
        bias = {"lora_bias": f"{inner.path}.lora_bias_bank"} if biased else {}
        return cls({"slot": cls.type, "path": inner.path, "lora_A": a, "lora_B": b, **bias, "in": rec["in"],
                    "out": rec["out"], "r": max(ranks, default=0) or rec["r"], "slots": len(names) + 1, "ids": ids,
                    "adapters": list(names), "ranks": ranks,
                    "modules": [{p: {"r": m.r, "alpha": m.alpha, "scale": m.scale} for p, m in ms.items()}
                                for ms in modules], "inner": rec})

    @property
    def paths(self) -> list[str]:
        return from_record(self.record["inner"]).paths

    def inputs(self) -> list[SlotInput]:
        rank, rec = f"{self.path}.r", self.record
        bias = [SlotInput(rec["lora_bias"], (SLOTS, rec["out"]), "lora_bias")] if "lora_bias" in rec else []
        return [SlotInput(rec["lora_A"], (SLOTS, rec["in"], rank), "lora_A"),
                SlotInput(rec["lora_B"], (SLOTS, rank, rec["out"]), "lora_B"), *bias]

    def values(self, module: Kind | None, weights=None) -> dict[str, np.ndarray]:
        """A bank holding one adapter (id 1)."""
        return self.stacked([{} if module is None else {module.path: module}])

    def stacked(self, adapters: Sequence[dict[str, Kind]]) -> dict[str, np.ndarray]:
        """The banks for each adapter's modules here (by path, in id order): slot 0 zeros, then each adapter's
        inner-slot values (shapes checked), padded to the largest rank (the record's if no adapter has one)."""
        rec = self.record
        inner = from_record(rec["inner"])
        parts = [inner.values_for(modules) if modules else None for modules in adapters]
        downs = [None if p is None else p[inner.record["lora_A"]] for p in parts]
        ups = [None if p is None else p[inner.record["lora_B"]] for p in parts]
        rank = max([d.shape[1] for d in downs if d is not None] or [rec["r"]])
        a = np.zeros((len(adapters) + 1, rec["in"], rank), np.float32)
        b = np.zeros((len(adapters) + 1, rank, rec["out"]), np.float32)
        for k, (down, up) in enumerate(zip(downs, ups), start=1):
            if down is not None:
                a[k, :, :down.shape[1]], b[k, :up.shape[0]] = down, up
        out = {rec["lora_A"]: a, rec["lora_B"]: b}
        if "lora_bias" in rec:  # the inner (linear) slot's bias input: each adapter's LoRA bias times its scale
            bias = np.zeros((len(adapters) + 1, rec["out"]), np.float32)
            for k, part in enumerate(parts, start=1):
                if part is not None:
                    bias[k] = part[inner.record["lora_bias"]]
            out[rec["lora_bias"]] = bias
        return out

    def branch(self, b: Branch, x, inputs: dict) -> object:
        """``x``: the site's input as [batch, tokens, in]; ``inputs["ids"]``: the checked row ids."""
        a = b.op("Gather", [inputs["lora_A"], inputs["ids"]], f"{self.path}/lora_A/Gather")
        down = b.op("MatMul", [x, a], f"{self.path}/lora_A/MatMul")
        up = b.op("Gather", [inputs["lora_B"], inputs["ids"]], f"{self.path}/lora_B/Gather")
        delta = b.op("MatMul", [down, up], f"{self.path}/lora_B/MatMul")
        if "lora_bias" not in inputs:
            return delta
        rows = b.op("Gather", [inputs["lora_bias"], inputs["ids"]], f"{self.path}/lora_bias/Gather")  # [batch, out]
        axes = b.const(np.array([1], np.int64), f"{self.path}/lora_bias/axes")
        row_bias = b.op("Unsqueeze", [rows, axes], f"{self.path}/lora_bias/Unsqueeze")  # [batch, 1, out]
        return b.op("Add", [delta, row_bias], f"{self.path}/lora_bias/Add")
