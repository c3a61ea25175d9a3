"""Dynamic slots: the overridable graph inputs of one site's LoRA branch, and the nodes that compute it.

A slot type knows its inputs (names, dims with a symbolic rank, defaults), how to build its branch beside
the site, what it records in the model's ``lorapass.lora`` metadata, and how to turn an adapter module into
its input values (``lorapass export-adapter``). Every slot type registers under the ``slot`` name its
records carry, so a dynamic graph's slots can be rebuilt from its metadata alone (:func:`from_record`).
"""

from __future__ import annotations

from lorapass.onnx.slots.base import METADATA_KEY, SITES_KEY, Branch, Slot, SlotInput, from_record, register
from lorapass.onnx.slots.bank import BankSlot
from lorapass.onnx.slots.conv import ConvSlot
from lorapass.onnx.slots.linear import LinearSlot
from lorapass.onnx.slots.packed import PackedSlot

__all__ = ["METADATA_KEY", "SITES_KEY", "BankSlot", "Branch", "ConvSlot", "LinearSlot", "PackedSlot", "Slot", "SlotInput",
           "from_record", "register"]
