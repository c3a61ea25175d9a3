"""Cost analyser: what a LoRA adapter costs on hardware you do not have, at a parallel layout, merged or dynamic.

Modules, one job each:

- :mod:`~lorapass.cost.hw`: hardware spec schema (``hw_specs/*.yaml``) and loader.
- :mod:`~lorapass.cost.config`: model configs (``models/*.yaml``) expanded into operators with module paths.
- :mod:`~lorapass.cost.onnx_ops`: an ONNX graph (also a LoRA-rewritten one) as the same operator list.
- :mod:`~lorapass.cost.ops`: operators, their FLOP and byte formulas, the operator graph.
- :mod:`~lorapass.cost.lora`: site selection with the rewrite's rules; dynamic operators and merge cost.
- :mod:`~lorapass.cost.collectives`: ring/tree collective times.
- :mod:`~lorapass.cost.parallel`: layouts, TP splitting, pipeline stages (networkx graph view), the sweep space.
- :mod:`~lorapass.cost.analysis`: roofline per operator, phases, memory, LoRA overhead, sweep.
- :mod:`~lorapass.cost.report`: tables, JSON, CSV, roofline plot.
- :mod:`~lorapass.cost.calibrate`: measure this machine with ONNX Runtime.
- :mod:`~lorapass.cost.serving`: many adapters served with continuous batching (``analyse --workload``):
  merge / dynamic / multi policies simulated over the per-step roofline, and an advisor.
- :mod:`~lorapass.cost.cli`: the ``analyse`` and ``calibrate`` subcommands.

Decisions (see each module's docstring for the formulas):

- Roofline per operator, no overlap of compute, memory and communication between operators; collectives
  serialised after the operator that needs them. Efficiency factors from the spec scale peak and bandwidth.
- Decode is ``gen`` steps, costed at the average context seq + (gen+1)/2 (exact for the linear terms).
- Config attention defaults to a fused, causal-block-skipping kernel (``flash``); ``dense`` reproduces what an
  exported graph computes. Config prefill computes logits of the last token only (``logits: last``).
- LoRA under TP: A replicated / B split at column sites, A split / B replicated at row sites: no collective.
- EP runs attention data-parallel inside the EP group; DP replicas never communicate.
- Memory: worst pipeline stage; activations = largest single-operator working set of a prefill micro-batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorapass.lazy import attributes

if TYPE_CHECKING:
    from lorapass.cost.analysis import Analyser, Analysis, ModelSource, Workload, analyse, sweep
    from lorapass.cost.config import ModelConfig, build_graph, load_config
    from lorapass.cost.hw import HardwareSpec, load_spec
    from lorapass.cost.onnx_ops import load_onnx_graph
    from lorapass.cost.parallel import Layout, enumerate_layouts

_HOMES = {"analysis": ["Analyser", "Analysis", "ModelSource", "Workload", "analyse", "sweep"],
          "config": ["ModelConfig", "build_graph", "load_config"], "hw": ["HardwareSpec", "load_spec"],
          "onnx_ops": ["load_onnx_graph"], "parallel": ["Layout", "enumerate_layouts"]}
__all__ = sorted(name for names in _HOMES.values() for name in names)
__getattr__, __dir__ = attributes(__name__, {name: f"{__name__}.{module}" for module, names in _HOMES.items() for name in names})
