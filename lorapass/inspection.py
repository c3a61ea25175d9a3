"""Dry run: list every site of a graph, which rule hits it, and which adapter modules fit nothing."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field

from lorapass.adapter import Adapter
from lorapass.formats.names import KeyReport
from lorapass.errors import LorapassError
from lorapass.onnx.load import load_model
from lorapass.onnx.loss import summary
from lorapass.onnx.merge import record
from lorapass.onnx.storage import dry_run
from lorapass.onnx.sites import SiteReport
from lorapass.plan import check_adapter, plan, select
from lorapass.rules import LoraRule, RuleSet


@dataclass
class Inspection:
    """Sites with the rule that hits each, plus every problem a rewrite would stop on."""

    model: str
    report: SiteReport
    hits: dict[str, dict] = field(default_factory=dict)  # site path -> {"rule", "r", "alpha", "scale"}
    problems: list[str] = field(default_factory=list)
    unmatched_adapter_modules: dict[str, str | None] = field(default_factory=dict)  # module -> closest site
    modules: dict[str, dict] = field(default_factory=dict)  # adapter module -> its kind, sizes and notes
    requantization: dict | None = None  # what a merge would keep of the adapter's delta in quantized weights
    binding: KeyReport | None = None  # a single file's modules bound to the sites

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "prefix": self.report.prefix,
            "prefix_source": self.report.prefix_source,
            "dialect": self.report.dialect,
            "output_heads": self.report.output_heads,
            "unresolved_nodes": self.report.unresolved,
            "unsupported_nodes": [{"node": n, "reason": r} for n, r in self.report.unsupported],
            "sites": [s.to_dict() | {"target": self.hits.get(s.path)} for s in self.report.sites],
            "unmatched_adapter_modules": self.unmatched_adapter_modules,
            "adapter_keys": self.binding.to_dict() if self.binding else None,
            "adapter_modules": self.modules,
            "problems": self.problems,
            "requantization": self.requantization,
        }


def inspect_model(model: str | os.PathLike, adapter: Adapter | None = None, rules: LoraRule | RuleSet | None = None,
                  prefix: str | None = None, aliases: dict[str, str] | None = None, component: str | None = None,
                  strict: bool = False, unet_config: str | os.PathLike | None = None) -> Inspection:
    """Find the sites of ``model`` and, given rules or an adapter, what a rewrite would target (a single-file
    adapter bound to the sites first, see :func:`lorapass.onnx.rewrite.find_and_bind`)."""
    from lorapass.onnx.rewrite import find_and_bind

    aliases = {**(getattr(rules, "aliases", None) or {}), **(aliases or {})}
    report, bound = find_and_bind(load_model(model), [adapter] if adapter else [], prefix, component, strict,
                                  unet_config, aliases)
    adapter = bound[0] if bound else None
    result = Inspection(str(model), report, binding=adapter.binding if adapter else None)
    paths = list(dict.fromkeys(s.path for s in report.sites))
    if adapter is not None:
        sites = {s.path: s for s in report.sites}
        for module, kind in adapter.modules.items():
            if module not in paths:
                close = difflib.get_close_matches(module, paths, n=1, cutoff=0.6)
                result.unmatched_adapter_modules[module] = close[0] if close else None
            else:
                result.modules[module] = kind.describe(sites[module])
    rules = rules if rules is not None else (adapter.rule if adapter is not None else None)
    if rules is None:
        return result
    try:
        targets = select(report.sites, rules, report.output_heads, adapter)
    except LorapassError as exc:
        result.problems.append(str(exc))
        return result
    for t in targets:
        result.hits[t.site.path] = {"rule": t.rule.name, "r": t.params.r, "alpha": t.params.alpha, "scale": t.params.scale}
        kind = adapter.modules.get(t.site.path) if adapter is not None else None
        if kind is not None and not kind.targeted:  # applied by name (modules_to_save, trainable tokens, biases)
            result.hits[t.site.path] = {"rule": t.rule.name, "by_name": kind.name}
    if adapter is not None:
        try:
            check_adapter(targets, adapter, paths)
        except LorapassError as exc:
            result.problems.append(str(exc))
            return result
        try:
            result.requantization = _requantization(report, rules, adapter)
        except LorapassError as exc:  # rules that rescale the adapter's own r / alpha
            result.problems.append(str(exc))
    return result


def _requantization(report: SiteReport, rules: LoraRule | RuleSet, adapter: Adapter) -> dict | None:
    """What merging ``adapter`` would keep of its delta where the weights are stored lossily (a dry run)."""
    if not any(store.lossy for site in report.sites for store in site.storage.stores):
        return None
    return summary(dry_run(record(plan(report.sites, rules, report.output_heads, adapter))))


def format_table(result: Inspection) -> str:
    """A plain-text table of the sites, then the problems."""
    rep = result.report
    lines = [f"{result.model}: {len(rep.sites)} sites, prefix {rep.prefix!r} ({rep.prefix_source}), "
             f"dialect {rep.dialect}"]
    rows = [("path", "op", "layout", "packing", "in->out", "dtype", "named by", "target")]
    for s in rep.sites:
        hit = result.hits.get(s.path)
        target = "-" if not hit else f"{hit['rule']}: {hit['by_name']}" if "by_name" in hit else (
            f"{hit['rule']} r={hit['r']} alpha={hit['alpha']:g} scale={hit['scale']:.4g}")
        if s.lora:
            target += f" (has LoRA: {s.lora})"
        shape = f"{s.in_features}->{s.out_features}" + (f" {'x'.join(map(str, s.kernel))}" if s.kernel else "")
        rows.append((s.path, s.op, s.layout, _packing(s), shape, s.dtype,
                     f"{s.source} ({s.dialect})", target))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for node, reason in rep.unsupported:
        lines.append(f"not adapted: {node}: {reason}")
    if rep.unresolved:
        lines.append(f"unnamed linear nodes (not targeted): {', '.join(rep.unresolved)}")
    for module, info in result.modules.items():
        if info["kind"] != "lora" or len(info) > 3:
            notes = "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in info.items() if k not in ("kind", "elements", "bytes"))
            lines.append(f"adapter module {module!r}: {info['kind']}, {info['elements']} elements "
                         f"({info['bytes'] / 2**20:.2f} MiB in the graph's dtype)" + (f"; {notes}" if notes else ""))
    if result.binding is not None:
        lines.append(result.binding.summary())
    for module, close in result.unmatched_adapter_modules.items():
        lines.append(f"adapter module {module!r} matches no site" + (f" (closest: {close!r})" if close else ""))
    lines += [f"problem: {p}" for p in result.problems]
    if result.requantization is not None:
        q = result.requantization
        worst = min(q["sites"].items(), key=lambda kv: kv[1]["kept"])
        lines.append(f"merge would keep {q['delta_kept']:.1%} of the adapter's delta after requantization "
                     f"(least: {worst[0]} {worst[1]['kept']:.1%})")
        if q["warning"]:
            lines.append(f"warning: {q['warning']}")
    return "\n".join(lines)


def _packing(site) -> str:
    """How a site shares or splits a node: a row block of a packed node, or a module over several nodes."""
    if site.packed:
        return f"part of {site.packed}"
    if site.joins:
        return f"split over {len(site.joins)} nodes"
    return "-"
