"""Adapter kinds: what one module's delta is, how it merges into a weight and feeds a dynamic slot.

Every file format reads into these; strategies only call a kind's verbs (:class:`~lorapass.kinds.base.Kind`).
"""

from lorapass.kinds.base import Kind
from lorapass.kinds.lora import Dora, EmbeddingDora, EmbeddingLora, Lora
from lorapass.kinds.replace import Replace, TrainableTokens

__all__ = ["Dora", "EmbeddingDora", "EmbeddingLora", "Kind", "Lora", "Replace", "TrainableTokens"]
