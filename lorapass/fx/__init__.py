"""The torch.fx / torch.export frontend: the same sites, rules and strategies as the ONNX pass, on fx graphs.

``lorapass.fx.rewrite(model_or_program, adapter_or_rules, strategy=...)`` traces a module (torch.export, or
torch.fx.symbolic_trace without example inputs), names each linear site by its module path from the
``nn_module_stack`` metadata, matches the rules with :func:`lorapass.plan.plan`, and either merges the
adapter into the parameters or inserts LoRA nodes into the graph.

Modules: ``trace`` (module → graph), ``program`` (the state of an ExportedProgram or GraphModule),
``sites`` (graph → sites), ``merge`` and ``dynamic`` (the strategies), ``api`` (the pass: ``rewrite`` /
``apply``), ``promote`` (the ONNX post-export step of the dynamic contract), ``cli`` (``lorapass export``).
torch is imported on first use of ``rewrite``/``apply``, so ``lorapass.fx.cli`` registers its subcommand
without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorapass.lazy import attributes

if TYPE_CHECKING:
    from lorapass.fx.api import FxResult, apply, rewrite

__all__ = ["FxResult", "apply", "rewrite"]
__getattr__, __dir__ = attributes(__name__, dict.fromkeys(__all__, "lorapass.fx.api"))
