"""lorapass: a declarative graph-rewriting pass that applies LoRA adapters to ONNX and torch.fx graphs.

- :func:`rewrite`: ONNX file in, ONNX file out (strategies ``merge`` and ``dynamic``).
- :func:`export`: torch module + adapter -> ONNX, through torch.export and the fx pass.
- :class:`Session`: run a dynamic model in ONNX Runtime with hot-swappable adapters.
- :mod:`lorapass.fx`: the same pass on torch.fx / torch.export graphs.
"""

from lorapass.fx.export import export
from lorapass.ort_adapter import Session, export_adapter
from lorapass.onnx.rewrite import rewrite
from lorapass.rules import LoraRule, RuleSet

__all__ = ["LoraRule", "RuleSet", "Session", "export", "export_adapter", "rewrite"]
