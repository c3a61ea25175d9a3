"""Dynamic slots: the overridable graph inputs of one site's branch, and the nodes that compute it.

A slot type knows its inputs (names, dims with symbolic sizes, defaults), how to build its branch beside the
site, what it records in the model's ``lorapass.lora`` metadata, and how to turn an adapter module into its input
values (``lorapass export-adapter``). Every slot type registers under the ``slot`` name its records carry, so a
dynamic graph's slots can be rebuilt from its metadata alone (:func:`from_record`). Types: ``linear`` and
``embedding`` (low-rank, with optional DoRA factor and LoRA bias), ``packed`` (the row blocks of one packed node),
``replace`` (whole weight / bias), ``tokens`` (trainable token rows), ``bank`` (strategy multi).
"""

from __future__ import annotations

from lorapass.onnx.slots.base import (METADATA_KEY, SITES_KEY, Branch, Slot, SlotInput, Weights, from_record,
                                      read_records, register)
from lorapass.onnx.slots.bank import BankSlot
from lorapass.onnx.slots.conv import ConvSlot
from lorapass.onnx.slots.linear import EmbeddingSlot, LinearSlot
from lorapass.onnx.slots.packed import PackedSlot
from lorapass.onnx.slots.replace import ReplaceSlot, TokensSlot

__all__ = ["METADATA_KEY", "SITES_KEY", "BankSlot", "Branch", "ConvSlot", "EmbeddingSlot", "LinearSlot", "PackedSlot",
           "ReplaceSlot", "Slot", "SlotInput", "TokensSlot", "Weights", "from_record", "read_records", "register"]
