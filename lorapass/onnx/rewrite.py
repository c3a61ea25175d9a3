"""The ONNX pass: load an ONNX model, find its sites, select targets, apply a strategy, save atomically."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lorapass import provenance
from lorapass.adapter import Adapter, load_adapter
from lorapass.errors import RuleError
from lorapass.onnx.load import load_model
from lorapass.onnx.merge import merge
from lorapass.onnx.save import SaveStats, save_model
from lorapass.onnx.sites import SiteReport, find_sites
from lorapass.plan import Target, plan
from lorapass.rules import LoraRule, RuleSet

Strategy = Literal["merge", "dynamic"]


@dataclass
class RewriteResult:
    """What a rewrite did, for the CLI's summary and for callers."""

    output: Path
    strategy: str
    report: SiteReport
    targets: list[Target]
    stats: SaveStats = field(default_factory=SaveStats)


def resolve_inputs(adapter: str | os.PathLike | Adapter | None, rules: str | os.PathLike | LoraRule | RuleSet | None,
                   allow_pickle: bool = False) -> tuple[Adapter | None, LoraRule | RuleSet]:
    """The adapter (if any) and the rules: given rules win, else the adapter's own config."""
    if isinstance(adapter, (str, os.PathLike)):
        adapter = load_adapter(adapter, allow_pickle=allow_pickle)
    if isinstance(rules, (str, os.PathLike)):
        rules = RuleSet.from_yaml(rules)
    if rules is None:
        if adapter is None:
            raise RuleError("nothing to apply: give an adapter directory or a rules file")
        rules = adapter.rule
    return adapter, rules


def strategy_of(rules: LoraRule | RuleSet, strategy: Strategy | None) -> Strategy:
    if strategy is not None:
        return strategy
    found = {r.strategy for r in (rules.rules if isinstance(rules, RuleSet) else [rules])}
    if len(found) != 1:
        raise RuleError(f"rules ask for different strategies {sorted(found)}; choose one with --strategy")
    return found.pop()


def rewrite(model: str | os.PathLike, output: str | os.PathLike, adapter: str | os.PathLike | Adapter | None = None,
            rules: str | os.PathLike | LoraRule | RuleSet | None = None, strategy: Strategy | None = None,
            prefix: str | None = None, allow_pickle: bool = False, progress: bool | None = None,
            force: bool = False) -> RewriteResult:
    """Apply LoRA to the ONNX file ``model`` and write ``output``; the input is never modified.

    The output records what was applied (:mod:`lorapass.provenance`); applying LoRA to a graph that already
    has lorapass slots, or merging the same adapter twice, is refused unless ``force``.
    """
    rules_file = rules if isinstance(rules, (str, os.PathLike)) else None
    adapter, rules = resolve_inputs(adapter, rules, allow_pickle)
    strategy = strategy_of(rules, strategy)
    graph = load_model(model)
    report = find_sites(graph, prefix=prefix, wanted=adapter.modules if adapter else ())
    targets = plan(report.sites, rules, report.output_heads, adapter)
    provenance.stamp(graph, model, adapter, strategy, targets, force, rules_file)
    if strategy == "merge":
        if adapter is None:
            raise RuleError("strategy merge needs an adapter's weights (--adapter)")
        merge(graph, targets, adapter)
    else:
        from lorapass.onnx.dynamic import insert_lora

        insert_lora(graph, targets, adapter)
    stats = save_model(graph, model, output, progress=progress, inputs=provenance.input_files(adapter, rules_file))
    return RewriteResult(Path(output), strategy, report, targets, stats)
