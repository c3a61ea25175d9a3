"""The site: one adaptable layer found in a graph, named by its torch module path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Layout = Literal["in_out", "out_in"]
"""How a linear weight is stored: ``in_out`` is [in, out] (y = x @ W: MatMul, Gemm transB=0, GPT-2 Conv1D);
``out_in`` is [out, in] (y = x @ W.T: Gemm transB=1, torch.nn.Linear's own layout)."""

SiteKind = Literal["linear", "packed", "conv", "embedding", "norm"]
"""``packed``: a row block of a linear whose one weight holds several modules (the genai builder's q/k/v)."""


@dataclass(frozen=True)
class Site:
    """One adaptable layer of a graph.

    ``path`` is the module path relative to the model root PEFT sees (``model.layers.0.self_attn.q_proj``);
    ``node`` names the graph node computing with the weight, ``weight`` the tensor holding it, ``output`` the
    value after the bias (where a LoRA branch joins), ``source`` the naming strategy and ``dialect`` the
    exporter naming table that gave the path. ``storage`` is the frontend's view of the weight (read it as
    float32 in torch's layout, record edits); ``layout`` describes it (``in_out``/``out_in`` for a plain
    linear, more for packed or quantized weights). ``bias_storage`` is the view of its bias (one that adds a bias
    when the layer has none). An embedding site (``kind="embedding"``) has ``in_features`` = rows of its table,
    ``out_features`` = the embedding width, and reads the ids.
    A convolution's ``in_features``/``out_features`` are its channels and ``kernel`` its spatial kernel size
    (empty for a linear).

    ``packed`` is the path of the packed node a ``packed`` site is a row block of (the sites of one packed node
    share its dynamic slot); ``joins`` lists (value, rows) for a module an exporter split over several nodes
    (each computes the next rows of its output; ``output`` is the first); ``lora`` names the LoRA branch the
    graph already has at this site (lorapass's own slot, or A/B MatMuls beside it), if any.
    """

    path: str
    op: str
    node: str
    weight: str
    layout: str
    in_features: int
    out_features: int
    dtype: str
    output: str
    input: str
    bias: str | None = None
    source: str = ""
    module_class: str | None = None
    kind: SiteKind = "linear"
    dialect: str = ""
    packed: str | None = None
    joins: tuple[tuple[str, int], ...] = ()
    lora: str | None = None
    kernel: tuple[int, ...] = ()
    storage: Any = field(default=None, compare=False, repr=False)
    bias_storage: Any = field(default=None, compare=False, repr=False)

    @property
    def slot_path(self) -> str:
        """The path of the dynamic slot this site belongs to (its packed node's, else its own)."""
        return self.packed or self.path

    @property
    def layer_shape(self) -> tuple[int, int]:
        """(out_features, in_features): the shape of the weight in torch.nn.Linear's layout."""
        return (self.out_features, self.in_features)

    def to_dict(self) -> dict:
        """The site as plain data (for ``inspect --json``)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("storage", "bias_storage")}
