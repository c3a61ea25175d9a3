"""Match rules (and an adapter) against the sites of a graph: which site gets which LoRA, checked."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from lorapass.adapter import Adapter
from lorapass.errors import AdapterError, ShapeMismatchError
from lorapass.rules import LoraParams, LoraRule, RuleSet
from lorapass.site import Site


@dataclass(frozen=True)
class Target:
    """One site a rule selected, with the LoRA parameters it resolved for it."""

    site: Site
    rule: LoraRule
    params: LoraParams


def _near(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (closest site: {close[0]!r})" if close else ""


def plan(sites: list[Site], rules: LoraRule | RuleSet, output_heads: list[str] = (), adapter: Adapter | None = None) -> list[Target]:
    """The targets ``rules`` select among ``sites``; with ``adapter``, check its modules and shapes fit them.

    Raises RuleError when a rule selects nothing, AdapterError when adapter modules fit no selected site
    (each named, with the closest site path), and ShapeMismatchError naming key, shapes and site.
    """
    ruleset = rules if isinstance(rules, RuleSet) else RuleSet(rules=[rules])
    paths = list(dict.fromkeys(s.path for s in sites))
    selected = ruleset.select(paths, output_heads)
    targets = [Target(s, *selected[s.path]) for s in sites if s.path in selected]
    if adapter is not None:
        check_adapter(targets, adapter, paths)
    return targets


def check_adapter(targets: list[Target], adapter: Adapter, paths: list[str]) -> None:
    """Every adapter module must be a selected site, every selected site needs weights, shapes must fit."""
    chosen = {t.site.path for t in targets}
    stray = [m for m in adapter.modules if m not in chosen]
    if stray:
        lines = []
        for module in stray[:10]:
            why = "is a site the rules do not select" if module in paths else "matches no site in the graph"
            lines.append(f"  {adapter.key(module, 'lora_A')}: module {module!r} {why}{_near(module, paths) if module not in paths else ''}")
        more = f"\n  ... and {len(stray) - 10} more" if len(stray) > 10 else ""
        raise AdapterError(f"{adapter.directory}: {len(stray)} adapter module(s) fit no target:\n" + "\n".join(lines) + more)
    missing = sorted(chosen - set(adapter.modules))
    if missing:
        raise AdapterError(
            f"{adapter.directory}: the rules select {len(missing)} site(s) the adapter has no weights for, "
            f"e.g. {missing[:3]}"
        )
    for target in targets:
        site, r = target.site, target.params.r
        expected = {"lora_A": (r, site.in_features), "lora_B": (site.out_features, r)}
        for kind, shape in expected.items():
            actual = adapter.shape(site.path, kind)
            if actual != shape:
                raise ShapeMismatchError(
                    f"{adapter.directory}: {adapter.key(site.path, kind)} has shape {list(actual)}, "
                    f"site {site.path!r} ({site.op} {site.node!r}, {site.in_features}->{site.out_features}, r={r}) "
                    f"needs {list(shape)}"
                )
