"""Match rules (and an adapter) against the sites of a graph: which site gets which LoRA, checked."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from lorapass.adapter import Adapter
from lorapass.errors import AdapterError, RuleError, UnsupportedError
from lorapass.kinds import Blend, Kind
from lorapass.rules import LoraParams, LoraRule, RuleSet
from lorapass.site import Site

_SCALE_FIELDS = {"r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora"}


@dataclass(frozen=True)
class Target:
    """One site a rule selected, with its LoRA parameters and (given an adapter) the module applied to it."""

    site: Site
    rule: LoraRule
    params: LoraParams
    module: Kind | None = None


def _near(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (closest site: {close[0]!r})" if close else ""


def select(sites: list[Site], rules: LoraRule | RuleSet, output_heads: list[str] = (),
           adapter: Adapter | None = None) -> list[Target]:
    """The sites ``rules`` select (``all-linear`` covers linear sites only), plus the sites of the adapter's modules
    PEFT applies by name (``modules_to_save``, trainable tokens, replaced biases), in graph order."""
    ruleset = rules if isinstance(rules, RuleSet) else RuleSet(rules=[rules])
    paths = list(dict.fromkeys(s.path for s in sites))
    not_linear = [s.path for s in sites if s.kind not in ("linear", "packed")]  # packed: a linear's row block
    selected = ruleset.select(paths, [*output_heads, *not_linear])
    named = {m for m, kind in (adapter.modules.items() if adapter is not None else ()) if not kind.targeted}
    return [Target(s, *selected[s.path]) if s.path in selected else Target(s, adapter.rule, adapter.rule.params(s.path))
            for s in sites if s.path in selected or s.path in named]


def plan(sites: list[Site], rules: LoraRule | RuleSet, output_heads: list[str] = (), adapter: Adapter | None = None) -> list[Target]:
    """The targets ``rules`` select among ``sites``; with ``adapter``, each gets its module, checked to fit.

    With an adapter, rank, alpha and scale are the adapter's own (its format resolves them); rules that set
    them explicitly to something else are an error, never a silent rescale. Raises RuleError when a rule
    selects nothing, AdapterError when adapter modules fit no selected site (each named, with the closest
    site path), and ShapeMismatchError naming key, shapes and site. A module that also changes other sites (a
    tied output head) gets a target there too.
    """
    targets = select(sites, rules, output_heads, adapter)
    if adapter is None:
        return targets
    paths = list(dict.fromkeys(s.path for s in sites))
    check_adapter(targets, adapter, paths)
    out = []
    for t in targets:
        module = adapter.modules[t.site.path]
        params = LoraParams(r=module.r, alpha=module.alpha, scale=module.scale)
        if t.rule is not adapter.rule and t.rule.model_fields_set & _SCALE_FIELDS and t.params != params:
            raise RuleError(f"rule {t.rule.name!r} gives {t.site.path!r} r={t.params.r} alpha={t.params.alpha:g}, but the "
                            f"adapter {adapter.source} has r={module.r} alpha={module.alpha:g} there; drop r/lora_alpha/"
                            "patterns from the rules to use the adapter's own")
        out.append(Target(t.site, t.rule, params, module))
    taken = {t.site.node for t in out}
    for t in list(out):
        for site in t.module.tied_sites(t.site, sites):
            if site.node in taken:
                raise UnsupportedError(f"{adapter.source}: {t.module.key()} also changes {site.path!r} ({site.node!r}, "
                                       f"which shares {t.site.path!r}'s weight), which the adapter changes too")
            t.module.check(site)
            out.append(Target(site, t.rule, t.params, t.module))
    return out


def check_adapter(targets: list[Target], adapter: Adapter, paths: list[str]) -> None:
    """Every adapter module must be a selected site, every selected site needs weights, shapes must fit."""
    chosen = {t.site.path for t in targets}
    stray = [m for m in adapter.modules if m not in chosen]
    if stray:
        lines = []
        for module in stray[:10]:
            why = "is a site the rules do not select" if module in paths else "matches no site in the graph"
            where = _near(module, paths) if module not in paths else ""
            lines.append(f"  {adapter.key(module)}: module {module!r} {why}{where}")
        more = f"\n  ... and {len(stray) - 10} more" if len(stray) > 10 else ""
        raise AdapterError(f"{adapter.source}: {len(stray)} adapter module(s) fit no target:\n" + "\n".join(lines) + more)
    missing = sorted(chosen - set(adapter.modules))
    if missing:
        raise AdapterError(
            f"{adapter.source}: the rules select {len(missing)} site(s) the adapter has no weights for, "
            f"e.g. {missing[:3]}")
    for target in targets:
        adapter.modules[target.site.path].check(target.site)


def blend(targets: list[Target]) -> list[Target]:
    """One target per site: several adapters' modules on one site become one :class:`~lorapass.kinds.Blend`
    (their weighted deltas summed as one low-rank update), for a dynamic slot or an adapter file."""
    by_site: dict[int, list[Target]] = {}
    for t in targets:  # every adapter's plan holds the same site objects (nodes of two If branches may share names)
        by_site.setdefault(id(t.site), []).append(t)
    out = []
    for group in by_site.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        other = next((t.module for t in group if not t.module.additive), None)
        if other is not None:
            raise UnsupportedError(f"{other.source}: {other.key()} ({other.name} at {group[0].site.path!r}) is not a "
                                   "plain low-rank delta, so it cannot share a dynamic slot with another adapter's; "
                                   "merge them, or export each file on its own and swap them")
        module = Blend([t.module for t in group])
        out.append(Target(group[0].site, group[0].rule, LoraParams(r=module.r, alpha=module.alpha, scale=1.0), module))
    return out
