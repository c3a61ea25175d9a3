"""The fx pass: trace if needed, find sites, plan with the shared rules, apply merge or dynamic."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.fx import GraphModule

from lorapass.adapter import Adapter
from lorapass.errors import AdapterError, RuleError, UnsupportedError
from lorapass.fx.program import Program
from lorapass.fx.sites import find_sites
from lorapass.fx.trace import AUTO, trace
from lorapass.onnx.sites import SiteReport
from lorapass.plan import Target, plan
from lorapass.onnx.rewrite import Strategy, strategy_of, resolve_inputs
from lorapass.rules import LoraRule, RuleSet


@dataclass
class FxResult:
    """A rewritten program and what the pass did to it."""

    program: ExportedProgram | GraphModule
    strategy: str
    report: SiteReport
    targets: list[Target]
    adapter: Adapter | None = None
    slots: dict[str, dict[str, str]] = field(default_factory=dict)  # dynamic: path -> {input name: state key}


def _split(selection: Any, adapter: Any, rules: Any) -> tuple[Any, Any]:
    """Sort the positional ``rules_or_adapter`` into adapter or rules (a directory is an adapter)."""
    if selection is None:
        return adapter, rules
    if isinstance(selection, (str, os.PathLike)) and not Path(selection).exists():
        raise AdapterError(f"{selection}: no such adapter directory or rules file")
    if isinstance(selection, Adapter) or (isinstance(selection, (str, os.PathLike)) and Path(selection).is_dir()):
        if adapter is not None:
            raise RuleError("an adapter was given twice (positionally and as adapter=)")
        return selection, rules
    if rules is not None:
        raise RuleError("rules were given twice (positionally and as rules=)")
    return adapter, selection


def apply(model: torch.nn.Module | ExportedProgram | GraphModule, rules_or_adapter: Any = None,
          strategy: Strategy | None = None, *, adapter: Adapter | str | os.PathLike | None = None,
          rules: LoraRule | RuleSet | str | os.PathLike | None = None, example_inputs: Any = None,
          example_kwargs: dict | None = None, dynamic_shapes: Any = AUTO, prefix: str | None = None,
          allow_pickle: bool = False, strict: bool = False) -> FxResult:
    """:func:`rewrite`, returning the program together with its sites, targets and LoRA slots."""
    adapter, rules = _split(rules_or_adapter, adapter, rules)
    adapter, rules = resolve_inputs(adapter, rules, allow_pickle)
    strategy = strategy_of(rules, strategy)
    if strategy == "merge" and adapter is None:
        raise RuleError("strategy merge needs an adapter's weights")
    traced = trace(model, example_inputs, example_kwargs, dynamic_shapes, strict)
    program = Program(traced)
    report = find_sites(program, prefix=prefix, wanted=adapter.modules if adapter else ())
    targets = plan(report.sites, rules, report.output_heads, adapter)
    _refuse_unsupported(targets, strategy)
    slots: dict[str, dict[str, str]] = {}
    if strategy == "merge":
        from lorapass.fx.merge import merge

        merge(program, report, targets)
    else:
        from lorapass.fx.dynamic import insert_lora

        slots = insert_lora(program, report, targets)
    return FxResult(program.finish(), strategy, report, targets, adapter, slots)


def _refuse_unsupported(targets: list[Target], strategy: str) -> None:
    """The fx pass applies low-rank kinds (LoRA with or without a LoRA bias, DoRA, embedding LoRA) in both
    strategies, and what replaces tensors (replaced modules and biases, trainable tokens) in merge: refuse the
    rest by key and kind (the ONNX pass applies them)."""
    allowed = {"low_rank", "weight", "bias", "tokens"} if strategy == "merge" else {"low_rank"}
    for target in targets:
        module = target.module
        if module is None:
            continue
        parts = module.parts(target.site)
        if parts - allowed:
            raise UnsupportedError(f"{module.source}: {module.key()} ({module.name}, changes {sorted(parts)}) is not "
                                   f"supported by the fx frontend's {strategy}; apply it to the ONNX export "
                                   "(lorapass rewrite)")


def rewrite(model: torch.nn.Module | ExportedProgram | GraphModule, rules_or_adapter: Any = None,
            strategy: Strategy | None = None, **options: Any) -> ExportedProgram | GraphModule:
    """Apply LoRA to a torch model's graph; the model (or program) passed in is never modified.

    ``model``: an ``ExportedProgram``, a ``torch.fx.GraphModule`` (e.g. from ``symbolic_trace``), or an
    ``nn.Module`` (traced with torch.export given ``example_inputs``/``example_kwargs``, else with
    ``torch.fx.symbolic_trace``). ``rules_or_adapter``: a PEFT adapter directory or :class:`Adapter`, or a
    :class:`LoraRule`/:class:`RuleSet`/YAML rules file (also accepted as ``adapter=``/``rules=``).
    ``strategy``: ``"merge"`` (update the targeted parameters) or ``"dynamic"`` (insert LoRA nodes reading
    new ``<path>.lora_A``/``<path>.lora_B`` buffers); default: the rules' own. Other options: ``prefix``
    (wrapper path to strip, detected by default), ``dynamic_shapes`` (default ``"auto"``), ``strict``,
    ``allow_pickle``.

    Returns an ``ExportedProgram`` for a program or a module traced with torch.export (call ``.module()``
    to run it), a ``GraphModule`` for a GraphModule or a symbolically traced module.
    """
    return apply(model, rules_or_adapter, strategy, **options).program
