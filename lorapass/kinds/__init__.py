"""Adapter kinds: what one module's delta is, how it merges into a weight and feeds a dynamic slot.

Every file format reads into these; strategies only call a kind's verbs (:class:`~lorapass.kinds.base.Kind`).
LoRA (linear and conv, plus LoCon's CP form), LoHa and LoKr give their delta as an exact low-rank update
(:class:`~lorapass.kinds.lowrank.LowRank`), so they merge through one storage edit and run in the same dynamic
slots; a :class:`Blend` sums several adapters' purely low-rank modules on one site.
"""

from lorapass.kinds.base import Kind
from lorapass.kinds.blend import Blend
from lorapass.kinds.loha import Loha
from lorapass.kinds.lokr import Lokr
from lorapass.kinds.lora import Dora, EmbeddingDora, EmbeddingLora, Lora, LoraCP
from lorapass.kinds.replace import Replace, TrainableTokens

__all__ = ["Blend", "Dora", "EmbeddingDora", "EmbeddingLora", "Kind", "Loha", "Lokr", "Lora", "LoraCP", "Replace",
           "TrainableTokens"]
