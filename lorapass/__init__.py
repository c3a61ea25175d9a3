"""lorapass: a declarative graph-rewriting pass that applies LoRA adapters to ONNX and torch.fx graphs.

- :func:`rewrite`: ONNX file in, ONNX file out (strategies ``merge`` and ``dynamic``).
- :func:`export`: torch module + adapter -> ONNX, through torch.export and the fx pass.
- :class:`Session`: run a dynamic model in ONNX Runtime with hot-swappable adapters.
- :mod:`lorapass.fx`: the same pass on torch.fx / torch.export graphs.

Each name is imported on first use: ``import lorapass`` (and the command line) costs neither onnx, ONNX Runtime,
pydantic nor torch until something needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorapass.lazy import attributes

if TYPE_CHECKING:
    from lorapass.fx.export import export
    from lorapass.onnx.rewrite import rewrite
    from lorapass.ort_adapter import Session, export_adapter
    from lorapass.rules import LoraRule, RuleSet

__all__ = ["LoraRule", "RuleSet", "Session", "export", "export_adapter", "rewrite"]
__getattr__, __dir__ = attributes(__name__, {
    "export": "lorapass.fx.export", "rewrite": "lorapass.onnx.rewrite", "Session": "lorapass.ort_adapter",
    "export_adapter": "lorapass.ort_adapter", "LoraRule": "lorapass.rules", "RuleSet": "lorapass.rules"})
