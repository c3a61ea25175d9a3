"""Site patterns: each recognises one kind of adaptable layer at a node and says how its weight is stored.

A pattern is a function ``node -> Match | Unsupported | Branch | None``: a :class:`Match` is a site before naming,
an :class:`Unsupported` a node that looks adaptable but that lorapass cannot handle (reported by name, never
silently absent), a :class:`Branch` a node of a LoRA branch already in the graph (never a site). :data:`PATTERNS`
lists them in the order discovery tries them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir

from lorapass.onnx.storage import View
from lorapass.site import SiteKind


@dataclass
class Match:
    """One adaptable layer at ``node``: its weight's storage, the activation it reads and where a branch joins."""

    node: ir.Node
    storage: View
    kind: SiteKind
    input: ir.Value
    output: ir.Value  # after the bias: where a LoRA branch joins
    bias: ir.Value | None
    weight: ir.Value  # the weight operand as the graph names it (naming evidence)
    in_features: int
    out_features: int
    dtype: str  # the activation's element type (the branch computes in it)
    bias_storage: View | None = None  # the bias as a storage view (one that adds it when the layer has none)
    kernel: tuple[int, ...] = ()  # a convolution's spatial kernel size


@dataclass
class Unsupported:
    """A node that holds a weight lorapass cannot adapt, and why."""

    node: ir.Node
    reason: str


@dataclass
class Branch:
    """A node of a LoRA branch already in the graph (``x @ A @ B`` added to a linear's output): not a site.
    ``joins`` is the value the branch is added to (the adapted linear's output, after its bias)."""

    node: ir.Node
    joins: ir.Value


Pattern = Callable[[ir.Node], "Match | Unsupported | Branch | None"]

FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
"""The weight dtypes a float delta can be merged into."""


def standard(node: ir.Node) -> bool:
    """Whether ``node`` is in the default ONNX domain."""
    return node.domain in ("", "ai.onnx")


def constant(value: ir.Value | None) -> ir.Value | None:
    """The initializer behind ``value``, seeing through the ``Identity`` nodes exporters use to share one."""
    while value is not None and value.const_value is None:
        producer = value.producer()
        if producer is None or producer.op_type != "Identity" or not standard(producer):
            return None
        value = producer.inputs[0]
    return value


def fixed(value: ir.Value | None) -> ir.Value | None:
    """The initializer behind ``value`` unless it is also a graph input (an overridable input, such as a LoRA
    slot, is no weight)."""
    source = constant(value)
    return None if source is None or source.is_graph_input() else source


def weight_constant(value: ir.Value | None, rank: int = 2) -> ir.Value | None:
    """An initializer of ``rank`` dimensions behind ``value`` that is not also a graph input."""
    source = fixed(value)
    return source if source is not None and len(source.const_value.shape) == rank else None


def _patterns() -> list[Pattern]:
    from lorapass.onnx.patterns import conv, embedding, integer, linear, lora, nbits, norm, qdq

    return [lora.match, linear.match, conv.match, nbits.match, qdq.match, integer.match, embedding.match, norm.match]


PATTERNS: list[Pattern] = _patterns()
