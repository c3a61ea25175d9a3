"""Binding a single-file adapter's module names to a graph's site paths, per component.

Underscored names (kohya ``lora_unet_down_blocks_0_attentions_0_proj_in``) cannot be inverted (``to_out_0``,
``ff_net_0_proj``), so binding goes the other way: every site path is spelled as the file would spell it and
looked up; two site paths spelled alike are an error wherever a key uses that spelling. A spelling is a prefix
(``lora_unet_``, ``unet.``), underscores or not, and for UNets also the SGM/LDM names SDXL kohya files use
(:mod:`lorapass.formats.sgm`). Text encoder files name modules from transformers' ``CLIPTextModel`` root, which
held a ``text_model`` scope that newer transformers flatten away; a graph without that scope is spelled both ways.

Files may hold several components (``unet``, ``text_encoder``, ``text_encoder_2``, ``transformer``): the one to
bind is given, or the only one the file holds, or the only one whose keys name sites of this graph. Every module of
that component is reported matched (with its site path) or unmatched (with the closest site); ``strict`` makes an
unmatched module an error. The bound adapter's module paths are site paths, and its rule targets exactly them.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lorapass.errors import AdapterError
from lorapass.formats.sgm import SGM_SCOPES, UnetLayout
from lorapass.rules import LoraRule

if TYPE_CHECKING:
    from lorapass.adapter import Adapter

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")
TEXT_ROOT = "text_model."


@dataclass(frozen=True)
class Spelling:
    """How a file writes one component's module paths: ``prefix`` + the path, dots as underscores or not."""

    component: str | None  # None: the file holds one model's modules, fit for any graph
    prefix: str
    underscored: bool

    def spell(self, path: str) -> str:
        return self.prefix + (path.replace(".", "_") if self.underscored else path)


@dataclass
class Namespace:
    """Each file module name's spelling (so its component), and whether UNet names are SGM ones."""

    spellings: dict[str, Spelling]

    def components(self) -> dict[str | None, list[str]]:
        out: dict[str | None, list[str]] = {}
        for name, spelling in self.spellings.items():
            out.setdefault(spelling.component, []).append(name)
        return out

    def sgm(self, names: Collection[str]) -> bool:
        """Whether these module names use SGM UNet scopes."""
        return any(scope in name for name in names for scope in SGM_SCOPES)

    def spelled(self, component: str | None, paths: list[str], layout: UnetLayout | None = None) -> dict[str, set[str]]:
        """Every name this component's modules could carry for ``paths`` -> the site paths spelled so."""
        spellings = {s for s in self.spellings.values() if s.component == component}
        names = [n for n, s in self.spellings.items() if s.component == component]
        rooted = any(p.startswith(TEXT_ROOT) for p in paths)
        variants: list[tuple[str, str]] = [(p, p) for p in paths]
        if component in ("text_encoder", "text_encoder_2", None) and not rooted:
            variants += [(TEXT_ROOT + p, p) for p in paths]
        if component in ("unet", None) and any(s.underscored for s in spellings) and self.sgm(names):
            layout = layout or UnetLayout.from_paths(paths)
            if layout is not None:
                variants += [(sgm, p) for p in paths if (sgm := layout.sgm(p)) is not None]
        out: dict[str, set[str]] = {}
        for spelling in spellings:
            for written, path in variants:
                out.setdefault(spelling.spell(written), set()).add(path)
        return out

    def all_spelled(self, paths: list[str]) -> set[str]:
        """Every name any component of the file could carry for ``paths`` (for choosing a wrapper prefix)."""
        return {name for component in self.components() for name in self.spelled(component, paths)}


@dataclass
class KeyReport:
    """How one file's modules bound to a graph: matched (module -> site path), unmatched (module -> closest
    site path), and the modules of other components left out."""

    source: Path
    format: str
    component: str | None
    matched: dict[str, str] = field(default_factory=dict)
    unmatched: dict[str, str | None] = field(default_factory=dict)
    other_components: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"source": str(self.source), "format": self.format, "component": self.component,
                "matched": self.matched, "unmatched": self.unmatched, "other_components": self.other_components}

    def summary(self) -> str:
        text = (f"{self.source}: {self.format}, component {self.component or '(single model)'}: "
                f"{len(self.matched)} module(s) matched, {len(self.unmatched)} unmatched")
        if self.other_components:
            text += " (left out: " + ", ".join(f"{c} {n}" for c, n in self.other_components.items()) + ")"
        lines = [text] + [f"  unmatched {m!r}" + (f" (closest site {c!r})" if c else "") for m, c in self.unmatched.items()]
        return "\n".join(lines)


def _choose(adapter: Adapter, groups: dict[str | None, list[str]], spelled: dict, component: str | None) -> str | None:
    held = ", ".join(f"{c or '(single model)'} ({len(n)} modules)" for c, n in groups.items())
    if component is not None:
        if component not in COMPONENTS:
            raise AdapterError(f"--component {component!r} is not one of {', '.join(COMPONENTS)}")
        if component in groups:
            return component
        if list(groups) == [None]:
            return None
        raise AdapterError(f"{adapter.source}: holds no {component} modules; it holds {held}")
    if len(groups) == 1:
        return next(iter(groups))
    hits = [c for c, names in groups.items() if any(n in spelled[c] for n in names)]
    if len(hits) == 1:
        return hits[0]
    found = ", ".join(c for c in hits if c) or "none of them"
    raise AdapterError(f"{adapter.source}: holds {held}; modules of {found} name sites of this graph; "
                       f"choose one with --component {'|'.join(c for c in groups if c)}")


def exact_rule(name: str, modules: dict) -> LoraRule:
    """PEFT rule targeting exactly ``modules`` (site path -> kind), each with its own rank and effective alpha
    (scale·r: the user weight and LoKr's full-factor rule included), as exact-path patterns."""
    ranks = {p: k.r for p, k in modules.items()}
    alphas = {p: k.scale * k.r for p, k in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    exact = {p: "^" + re.escape(p) for p in modules}
    return LoraRule(name=name, target_modules=sorted(modules), r=max(1, r), lora_alpha=alpha,
                    rank_pattern={exact[p]: v for p, v in ranks.items() if v != r and v > 0},
                    alpha_pattern={exact[p]: v for p, v in alphas.items() if v != alpha})


def bind(adapter: Adapter, paths: list[str], component: str | None = None, unet_layout: UnetLayout | None = None,
         strict: bool = False) -> Adapter:
    """``adapter`` with module paths that are site paths among ``paths`` (see the module docstring); an adapter
    whose modules already are site paths (a PEFT directory) is returned as it is."""
    from lorapass.adapter import Adapter

    from lorapass.onnx.sites import guess_prefix, strip_prefix

    namespace = adapter.namespace
    if namespace is None:
        return adapter
    paths = list(dict.fromkeys(paths))
    # site paths that still carry a wrapper scope (a graph whose sites were named without this file) are matched
    # without it, and bound to the full path
    prefix = guess_prefix(paths, list(adapter.modules), namespace.all_spelled)
    full = {strip_prefix(p, prefix): p for p in paths if not prefix or p.startswith(prefix + ".")}
    groups = namespace.components()
    spelled = {c: {name: {full[p] for p in hit} for name, hit in namespace.spelled(c, list(full), unet_layout).items()}
               for c in groups}
    chosen = _choose(adapter, groups, spelled, component)
    names = spelled[chosen]
    report = KeyReport(adapter.source, adapter.format, chosen,
                       other_components={c or "(single model)": len(n) for c, n in groups.items() if c != chosen})
    modules = {}
    for module in groups[chosen]:
        hit = names.get(module)
        if hit is None:
            close = difflib.get_close_matches(module, list(names), n=1, cutoff=0.6)
            report.unmatched[module] = next(iter(names[close[0]])) if close else None
            continue
        if len(hit) > 1:
            raise AdapterError(f"{adapter.source}: module {module!r} ({adapter.key(module)}) is ambiguous: site paths "
                               f"{sorted(hit)} are all spelled so")
        path = next(iter(hit))
        if path in modules:
            raise AdapterError(f"{adapter.source}: modules {report_name(report, path)!r} and {module!r} both name site {path!r}")
        kind = adapter.modules[module]
        kind.path = path
        modules[path] = kind
        report.matched[module] = path
    if not modules:
        raise AdapterError(f"{adapter.source}: none of its {len(groups[chosen])} {chosen or ''} module(s) names a site of "
                           f"this graph (e.g. {groups[chosen][0]!r}; sites look like {paths[:3]})")
    if strict and report.unmatched:
        raise AdapterError(f"{adapter.source}: {len(report.unmatched)} module(s) match no site (--strict):\n"
                           + report.summary().split("\n", 1)[1])
    return Adapter(adapter.source, exact_rule(adapter.source.stem, modules), modules, format=adapter.format,
                   files=adapter.files, weight=adapter.weight, binding=report)


def report_name(report: KeyReport, path: str) -> str:
    return next(m for m, p in report.matched.items() if p == path)
