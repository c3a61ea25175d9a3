"""The site: one linear layer found in a graph, named by its torch module path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Layout = Literal["in_out", "out_in"]
"""How the weight is stored: ``in_out`` is [in, out] (y = x @ W: MatMul, Gemm transB=0, GPT-2 Conv1D);
``out_in`` is [out, in] (y = x @ W.T: Gemm transB=1, torch.nn.Linear's own layout)."""


@dataclass(frozen=True)
class Site:
    """One linear layer of a graph.

    ``path`` is the module path relative to the model root PEFT sees (``model.layers.0.self_attn.q_proj``);
    ``node`` names the graph node computing x @ W, ``weight`` the tensor holding W, ``output`` the value
    after the bias (where a LoRA branch joins), ``source`` the resolution strategy that named the path.
    """

    path: str
    op: str
    node: str
    weight: str
    layout: Layout
    in_features: int
    out_features: int
    dtype: str
    output: str
    input: str
    bias: str | None = None
    source: str = ""
    module_class: str | None = None

    @property
    def layer_shape(self) -> tuple[int, int]:
        """(out_features, in_features): the shape of the weight in torch.nn.Linear's layout."""
        return (self.out_features, self.in_features)
