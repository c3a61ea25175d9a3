"""Packed projections, both ways: one node holding several PEFT modules' rows, and one PEFT module split over
several nodes.

- A node the dialect says packs modules (the genai builder's ``qkv_proj`` holds q_proj, k_proj, v_proj rows)
  becomes one ``packed`` site per module, each a row-block view of the one weight. Row counts come from the
  model's config (genai_config.json / config.json) and the adapter's own shapes; a mismatch names both.
- Nodes an exporter split from a module the HF model packs itself (Phi-3's ``qkv_proj`` as q/k/v nodes reading
  one activation) become one site over their stacked rows (:class:`~lorapass.onnx.storage.Joined`).

Which way a node is read is decided by the model type (a Phi-3's ``qkv_proj`` is its own module) and, without
one, by the adapter's module names (the whole module when the adapter names it and none of its parts).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace

from lorapass.errors import ShapeMismatchError
from lorapass.onnx.dialects import Dialect
from lorapass.onnx.storage import Joined, View
from lorapass.site import Site


def _wants_whole(path: str, parts: list[str], wanted: Collection[str]) -> bool:
    return path in wanted and not any(p in wanted for p in parts)


def _adapter_rows(wanted: Collection[str], paths: list[str]) -> dict[str, tuple[int, object]]:
    """Part path -> (output rows, adapter module) for the parts an adapter (a path -> kind mapping) has."""
    if not isinstance(wanted, Mapping):
        return {}
    return {p: (wanted[p].out_features, wanted[p]) for p in paths if p in wanted and hasattr(wanted[p], "out_features")}


def _rows(site: Site, paths: list[str], dialect: Dialect, wanted: Collection[str]) -> list[int] | None:
    """Rows of each part: from the config, checked against the adapter; else from the adapter (one part may be
    missing: it has the rows left); None when neither says."""
    config = dialect.part_rows(site.path, tuple(p.rpartition(".")[2] for p in paths), site.out_features)
    known = _adapter_rows(wanted, paths)
    if config is not None:
        for path, rows in zip(paths, config):
            if path in known and known[path][0] != rows:
                module = known[path][1]
                raise ShapeMismatchError(
                    f"{module.source}: module {path!r} ({module.key()}) has {known[path][0]} output rows, but "
                    f"{dialect.config_file or 'the packing'} gives it rows of {rows} in the packed node {site.node!r} "
                    f"({site.path!r}, {site.out_features} rows)")
        return config
    missing = [p for p in paths if p not in known]
    left = site.out_features - sum(r for r, _ in known.values())
    if len(missing) > 1 or left < 0 or (not missing and left):
        return None
    return [known[p][0] if p in known else left for p in paths]


def _packed_parts(site: Site, dialect: Dialect, wanted: Collection[str]) -> list[Site] | str:
    """The row-block sites of a packed node, or why it stays one site."""
    parent, _, name = site.path.rpartition(".")
    parts = [f"{parent}.{p}" if parent else p for p in dialect.packs(name)]
    rows = _rows(site, parts, dialect, wanted)
    if rows is None:
        return (f"packs {', '.join(p.rpartition('.')[2] for p in parts)}, but their rows are unknown (no "
                "genai_config.json or config.json beside the model, and no adapter shapes): kept whole")
    out, start = [], 0
    for path, count in zip(parts, rows):
        view = View(site.storage.store, site.storage.node, path, slice(start, start + count))
        out.append(replace(site, path=path, out_features=count, kind="packed", packed=site.path,
                           layout=view.describe(), storage=view))
        start += count
    return out


def _joined(parts: list[Site], path: str) -> Site:
    view = Joined([s.storage for s in parts])
    view.path = path
    first = parts[0]
    lora = "; ".join(s.lora for s in parts if s.lora) or None
    return replace(first, path=path, out_features=view.shape[0], layout=view.describe(), kind="linear",
                   joins=tuple((s.output, s.out_features) for s in parts), lora=lora, storage=view,
                   module_class=None, bias=None)


def _join_split(sites: list[Site], dialect: Dialect, wanted: Collection[str]) -> list[Site]:
    """Sites of one HF-packed module that the exporter split (same activation, same parent scope) as one site."""
    tables = dialect.native() if dialect.model_type else {}
    if not dialect.model_type:  # no model type: only where the adapter names the packed module itself
        tables = {name: parts for table in dialect.hf_packed.values() for name, parts in table.items()}
    by_scope: dict[tuple[str, str, str], dict[str, Site]] = {}
    for site in sites:
        parent, _, name = site.path.rpartition(".")
        by_scope.setdefault((parent, site.input, site.dtype), {})[name] = site
    replaced: dict[int, Site | None] = {}
    for (parent, _, _), named in by_scope.items():
        for module, parts in tables.items():
            if not all(p in named for p in parts):
                continue
            path = f"{parent}.{module}" if parent else module
            if not dialect.model_type and not _wants_whole(path, [f"{parent}.{p}" for p in parts], wanted):
                continue
            group = [named[p] for p in parts]
            if len({s.in_features for s in group}) != 1 or any(s.kind != "linear" for s in group):
                continue
            replaced[id(group[0])] = _joined(group, path)
            replaced.update({id(s): None for s in group[1:]})
    return [replaced.get(id(s), s) for s in sites if replaced.get(id(s), s) is not None]


def expand(sites: list[Site], dialect: Dialect, wanted: Collection[str] = ()) -> tuple[list[Site], list[tuple[str, str]]]:
    """Sites with packed nodes as row-block sites and split modules joined; plus (node, reason) for packed
    nodes kept whole."""
    out: list[Site] = []
    unsupported: list[tuple[str, str]] = []
    for site in _join_split(sites, dialect, wanted):
        parent, _, name = site.path.rpartition(".")
        parts = [f"{parent}.{p}" if parent else p for p in dialect.packs(name)]
        if not parts or site.kind != "linear" or site.joins or _wants_whole(site.path, parts, wanted):
            out.append(site)
            continue
        result = _packed_parts(site, dialect, wanted)
        if isinstance(result, str):
            unsupported.append((site.node, result))
            out.append(site)
        else:
            out.extend(result)
    return out, unsupported
