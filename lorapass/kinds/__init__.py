"""Adapter kinds: what one module's delta is, how it merges into a weight and feeds a dynamic slot.

Every file format reads into these; strategies only call a kind's verbs (:class:`~lorapass.kinds.base.Kind`).
LoRA (linear and conv, plus LoCon's CP form), LoHa and LoKr all give their delta as an exact low-rank update,
so every kind merges through the same storage edit and runs in the same dynamic slots; a :class:`Blend` sums
several adapters' modules on one site.
"""

from lorapass.kinds.base import Kind
from lorapass.kinds.blend import Blend
from lorapass.kinds.loha import Loha
from lorapass.kinds.lokr import Lokr
from lorapass.kinds.lora import Lora, LoraCP

__all__ = ["Blend", "Kind", "Loha", "Lokr", "Lora", "LoraCP"]
