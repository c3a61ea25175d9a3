"""The ONNX pass: load an ONNX model, find its sites, select targets, apply a strategy, save atomically."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lorapass import provenance
from lorapass.adapter import Adapter, load_adapter
from lorapass.errors import RuleError, UnsupportedError
from lorapass.onnx import genai
from lorapass.onnx.load import load_model
from lorapass.onnx.loss import summary
from lorapass.onnx.merge import merge
from lorapass.onnx.multi import bank_names, insert_banks
from lorapass.onnx.save import SaveStats, save_model
from lorapass.onnx.sites import SiteReport, find_sites
from lorapass.onnx.slots import SITES_KEY
from lorapass.plan import Target, blend, plan
from lorapass.rules import LoraRule, RuleSet

Strategy = Literal["merge", "dynamic", "multi"]


@dataclass
class RewriteResult:
    """What a rewrite did, for the CLI's summary and for callers."""

    output: Path
    strategy: str
    report: SiteReport
    targets: list[Target]
    stats: SaveStats = field(default_factory=SaveStats)
    requantization: dict | None = None  # merge into lossy (quantized) weights: how much delta survived (onnx/loss.py)
    adapters: list[str | None] = field(default_factory=list)  # multi: the adapter of each id from 1 (None: empty)
    applied: list[Adapter] = field(default_factory=list)  # the adapters as applied (single files bound: see .binding)


def as_adapters(adapter, allow_pickle: bool = False) -> list[Adapter]:
    """``adapter`` (one spec or a list; a spec is an Adapter, a path, or ``PATH:WEIGHT``) as loaded adapters."""
    from lorapass.formats import parse_spec

    specs = [] if adapter is None else list(adapter) if isinstance(adapter, (list, tuple)) else [adapter]
    out = []
    for spec in specs:
        if isinstance(spec, Adapter):
            out.append(spec)
        else:
            path, weight = parse_spec(spec)
            out.append(load_adapter(path, allow_pickle=allow_pickle, weight=weight))
    return out


def resolve_inputs(adapter, rules: str | os.PathLike | LoraRule | RuleSet | None,
                   allow_pickle: bool = False) -> tuple[Adapter | None, LoraRule | RuleSet]:
    """One adapter (if any) and the rules: given rules win, else the adapter's own config."""
    adapters = as_adapters(adapter, allow_pickle)
    if len(adapters) > 1:
        raise RuleError("this command takes one adapter")
    if adapters and adapters[0].namespace is not None:
        raise UnsupportedError(f"{adapters[0].source}: a {adapters[0].format} file names modules its own way and is "
                               "bound to an ONNX graph's sites by `lorapass rewrite` / `inspect` / `export-adapter`; "
                               "this command takes a PEFT adapter directory")
    return (adapters[0] if adapters else None), _rules(rules, adapters[0] if adapters else None)


def _rules(rules, adapter: Adapter | None) -> LoraRule | RuleSet:
    if isinstance(rules, (str, os.PathLike)):
        rules = RuleSet.from_yaml(rules)
    if rules is None:
        if adapter is None:
            raise RuleError("nothing to apply: give an adapter or a rules file")
        rules = adapter.rule
    return rules


def strategy_of(rules: LoraRule | RuleSet, strategy: Strategy | None) -> Strategy:
    if strategy is not None:
        return strategy
    found = {r.strategy for r in (rules.rules if isinstance(rules, RuleSet) else [rules])}
    if len(found) != 1:
        raise RuleError(f"rules ask for different strategies {sorted(found)}; choose one with --strategy")
    return found.pop()


def find_and_bind(graph, adapters: list[Adapter], prefix: str | None = None, component: str | None = None,
                  strict: bool = False, unet_config: str | os.PathLike | None = None,
                  aliases: dict[str, str] | None = None) -> tuple[SiteReport, list[Adapter]]:
    """The graph's sites (wrapper prefix chosen to fit the adapters' module names) and the adapters with single
    files bound to those sites (:func:`lorapass.formats.names.bind`; ``component`` / ``strict`` / a diffusers UNet
    ``config.json`` for SGM names as there)."""
    from lorapass.formats.names import bind
    from lorapass.formats.sgm import UnetLayout

    def spell(paths: list[str]) -> set[str]:
        return set().union(*(a.spelled(paths) for a in adapters))

    report = find_sites(graph, prefix=prefix, wanted={m: k for a in adapters for m, k in a.modules.items()},
                        aliases=aliases, spell=spell)
    layout = UnetLayout.from_config(unet_config) if unet_config is not None else None
    paths = [s.path for s in report.sites]
    return report, [bind(a, paths, component, layout, strict) for a in adapters]


def rewrite(model: str | os.PathLike, output: str | os.PathLike, adapter=None,
            rules: str | os.PathLike | LoraRule | RuleSet | None = None, strategy: Strategy | None = None,
            prefix: str | None = None, allow_pickle: bool = False, progress: bool | None = None,
            force: bool = False, aliases: dict[str, str] | None = None, slots: int | None = None,
            component: str | None = None, strict: bool = False,
            unet_config: str | os.PathLike | None = None) -> RewriteResult:
    """Apply LoRA to the ONNX file ``model`` and write ``output``; the input is never modified.

    ``adapter`` is one adapter or a list (an Adapter, a path, or ``PATH:WEIGHT``); several adapters merge as the
    sum of their weighted deltas, share one dynamic slot per site as one blend (ranks concatenated), or with
    strategy ``multi`` become ids 1, 2, ... of the ``lora_ids`` input. ``rules`` select the targets (default: each
    adapter's own config). Single-file adapters (kohya, LyCORIS, diffusers) are bound to the graph's sites first
    (``component``, ``strict``, ``unet_config``: see :func:`find_and_bind`). ``slots`` (multi): the bank size in
    adapters, empty slots after the given adapters (all empty without adapters). The output records what was
    applied (:mod:`lorapass.provenance`); applying LoRA to a graph that already has lorapass slots, or merging
    the same adapter twice, is refused unless ``force``. ``aliases`` map graph path components to PEFT's (on top
    of the exporter's dialect and the rules' own). An onnxruntime-genai folder's other files (genai_config.json,
    tokenizer) are written beside the output, in the same all-or-nothing commit.
    """
    rules_file = rules if isinstance(rules, (str, os.PathLike)) else None
    adapters = as_adapters(adapter, allow_pickle)
    aliases = {**_rule_aliases([_rules(rules, a) for a in adapters] or [_rules(rules, None)]), **dict(aliases or {})}
    graph = load_model(model)
    data_files = genai.external_files(graph)
    report, adapters = find_and_bind(graph, adapters, prefix, component, strict, unet_config, aliases)
    rule_sets = [_rules(rules, a) for a in adapters] or [_rules(rules, None)]
    strategy = strategy_of(rule_sets[0], strategy)
    if strategy == "merge" and not adapters:
        raise RuleError("strategy merge needs an adapter's weights (--adapter)")
    if slots is not None and strategy != "multi":
        raise RuleError("slots are for strategy multi")
    if strategy == "multi" and not adapters and any(r.use_dora for rs in rule_sets for r in getattr(rs, "rules", [rs])):
        raise UnsupportedError("use_dora (--dora): multi banks hold additive LoRA only, so they cannot be DoRA-ready; "
                               "use strategy dynamic")
    names = bank_names(adapters, slots) if strategy == "multi" else []
    chosen = [plan(report.sites, r, report.output_heads, a) for a, r in zip(adapters or [None], rule_sets)]
    targets = [t for ts in chosen for t in ts]
    provenance.stamp(graph, model, adapters, strategy, targets, force, rules_file)
    if strategy == "merge":
        merge(graph, targets)
    elif strategy == "multi":
        insert_banks(graph, chosen if adapters else chosen * len(names), names)  # no adapters: all slots empty
    else:
        from lorapass.onnx.dynamic import insert_lora

        targets = blend(targets)
        insert_lora(graph, targets)
        graph.metadata_props[SITES_KEY] = json.dumps(list(dict.fromkeys(s.path for s in report.sites)))
    stats = save_model(graph, model, output, progress=progress, inputs=provenance.input_files(adapters, rules_file),
                       companions=genai.companions(Path(model), Path(output), data_files))  # computes merged weights
    stores = {id(s): s for t in targets for s in t.site.storage.stores}.values()  # ... and records their losses
    return RewriteResult(Path(output), strategy, report, targets, stats,
                         summary([x for s in stores for x in s.losses]), names, adapters)


def _rule_aliases(rule_sets: list) -> dict[str, str]:
    """The ``aliases`` of the rules files (graph components -> PEFT's)."""
    out: dict[str, str] = {}
    for rules in rule_sets:
        out.update(getattr(rules, "aliases", {}) or {})
    return out
