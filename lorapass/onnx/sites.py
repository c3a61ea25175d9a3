"""Find every adaptable layer (site: linear, embedding) of an ONNX graph and name it by its torch module path."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace

import onnx_ir as ir

from lorapass.onnx import naming, packing
from lorapass.onnx.dialects import SOURCE, detect
from lorapass.onnx.patterns import PATTERNS, Branch, Match, Unsupported
from lorapass.onnx.slots import METADATA_KEY, read_records
from lorapass.site import Site

_PASS_THROUGH = {"Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten"}
NAMESPACE = "namespace"
_MODEL_PACKAGES = ("transformers.models.", "diffusers.models.")
Spell = Callable[[list[str]], set[str]]


@dataclass
class SiteReport:
    """What discovery found: the sites, the nodes it could not name, and the prefix it stripped."""

    sites: list[Site]
    unresolved: list[str] = field(default_factory=list)
    unsupported: list[tuple[str, str]] = field(default_factory=list)  # (node, reason)
    prefix: str = ""
    prefix_source: str = "none"
    output_heads: list[str] = field(default_factory=list)
    dialect: str = "torch"

    def by_path(self) -> dict[str, list[Site]]:
        out: dict[str, list[Site]] = {}
        for site in self.sites:
            out.setdefault(site.path, []).append(site)
        return out

    def by_node(self) -> dict[str, Site]:
        """One site per graph node, as the node computes it (for costing nodes): the row-block sites of a packed
        node as one site of all its rows (named by the packed node's path), a split module as one site per node."""
        out: dict[str, Site] = {}
        for site in self.sites:
            if site.packed:
                rows = site.storage.store.shape[0]
                out.setdefault(site.node, replace(site, path=site.packed, out_features=rows, kind="linear", packed=None))
            elif site.joins:
                for view, (output, rows) in zip(site.storage.parts, site.joins):
                    out[view.node.name or ""] = replace(site, node=view.node.name or "", output=output,
                                                        out_features=rows, joins=(), storage=view)
            else:
                out[site.node] = site
        return out


def _root_scope(node: ir.Node) -> str | None:
    """The scope of the outermost transformers or diffusers model in the dynamo exporter's ``namespace`` record."""
    text = node.metadata_props.get(NAMESPACE)
    if not text:
        return None
    for entry in text.split("/"):
        scope, _, cls = entry.partition(": ")
        if cls.strip().startswith(_MODEL_PACKAGES):
            return scope.strip()
    return None


def strip_prefix(path: str, prefix: str) -> str:
    return path[len(prefix) + 1:] if prefix and path.startswith(prefix + ".") else path


def guess_prefix(paths: list[str], wanted: Collection[str], spell: Spell | None = None) -> str:
    """The leading scope whose removal makes the most ``wanted`` module names exist in the graph; ``spell`` gives
    the names an adapter would write for a list of site paths (default: the paths themselves)."""
    candidates = {""}
    for path in paths:
        parts = path.split(".")
        candidates.update(".".join(parts[:k]) for k in range(1, min(3, len(parts))))
    wanted = set(wanted)
    spell = spell or set

    def hits(prefix: str) -> int:
        return len(wanted & spell([strip_prefix(p, prefix) for p in paths if not prefix or p.startswith(prefix + ".")]))

    return max(sorted(candidates, key=len), key=hits)


def _is_output_head(output: ir.Value) -> bool:
    value = output
    while not value.is_graph_output():
        consumers = value.consumers()
        if len(consumers) != 1 or consumers[0].op_type not in _PASS_THROUGH:
            return False
        value = consumers[0].outputs[0]
    return True


def _matches(model: ir.Model) -> tuple[list[Match], list[tuple[str, str]], list[Branch]]:
    """Every node of the graph and of its subgraphs (If / Loop / Scan bodies) tried against the patterns."""
    found, unsupported, branches = [], [], []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for pattern in PATTERNS:
            result = pattern(node)
            if isinstance(result, Match):
                found.append(result)
                break
            if isinstance(result, Branch):
                branches.append(result)
                break
            if isinstance(result, Unsupported):
                unsupported.append((node.name or f"<unnamed {node.op_type}>", result.reason))
                break
    return found, unsupported, branches


def _share_stores(matches: list[Match]) -> None:
    """One store per stored weight: the sites of every node reading it (both branches of an If) edit it together."""
    stores: dict[tuple, object] = {}
    for m in matches:
        m.storage.store = stores.setdefault(m.storage.store.identity(), m.storage.store)


def _existing_lora(model: ir.Model, branches: list[Branch]) -> tuple[dict[ir.Value, str], set[str]]:
    """(joined value -> its branch's first node) from A/B MatMuls in the graph, and lorapass's own slot paths."""
    joined: dict[ir.Value, str] = {}
    for b in branches:
        joined.setdefault(b.joins, f"branch {b.node.name or b.node.op_type}")
    records = model.metadata_props.get(METADATA_KEY)
    paths: set[str] = set()
    for slot in read_records(records, model.graph.meta.get(SOURCE, "model")) if records else []:
        paths.add(slot.path)
        paths.update(part["path"] for part in slot.record.get("parts", []))
    return joined, paths


def find_sites(model: ir.Model, prefix: str | None = None, wanted: Collection[str] = (),
               aliases: Mapping[str, str] | None = None, spell: Spell | None = None) -> SiteReport:
    """Every adaptable layer the site patterns recognise, named by module path.

    ``prefix`` is the wrapper scope to strip (``m`` for a module that holds the model as ``self.m``);
    when None it is read from the dynamo exporter's class records, else chosen so that the most
    ``wanted`` paths (e.g. an adapter's module names, as ``spell`` writes site paths; a path -> kind mapping also
    gives packed row counts) exist. The exporter's dialect (:mod:`lorapass.onnx.dialects`) maps its names to PEFT's;
    ``aliases`` (graph components -> PEFT's) go on top. Packed nodes become row-block sites, split modules one site
    (:mod:`lorapass.onnx.packing`); nodes of LoRA branches already in the graph are never sites. Norm layers are
    sites only where ``wanted`` names them (an adapter that replaces them: nothing else applies to a norm).
    """
    matches, unsupported, branches = _matches(model)
    _share_stores(matches)
    dialect = detect(model, [(m.node, m.weight) for m in matches if m.kind != "norm"], aliases)  # layers decide
    named: list[tuple[Match, str, str]] = []
    unresolved: list[str] = []
    from_nodes: list[tuple[Match, str]] = []
    for m in matches:
        for source, strategy in naming.STRATEGIES.items():
            path = strategy(m.node, m.weight, m.bias)
            if path:
                break
        if not path:
            if m.kind != "norm":  # an unnamed norm is no layer anyone adapts
                unresolved.append(m.node.name or f"<unnamed {m.node.op_type}>")
        elif source == "node_name":
            from_nodes.append((m, dialect.module_path(path)))
        else:
            named.append((m, dialect.module_path(path), source))

    # TorchScript node names may drop scopes: map them with what parameter names taught us.
    pairs = [(dialect.module_path(p), path) for m, path, source in named
             if (p := naming.from_node_name(m.node, m.weight, m.bias))]
    scope_map = naming.learn_scope_map(pairs)
    named += [(m, naming.apply_scope_map(path, scope_map), "node_name") for m, path in from_nodes]

    root_scopes = {s for m, _, _ in named if (s := _root_scope(m.node)) is not None}
    if prefix is not None:
        chosen, prefix_source = prefix, "given"
    elif len(root_scopes) == 1:
        chosen, prefix_source = root_scopes.pop(), "exporter class records"
    elif wanted:
        chosen, prefix_source = guess_prefix([p for _, p, _ in named], wanted, spell), "adapter module names"
    else:
        chosen, prefix_source = "", "none"

    joined, slot_paths = _existing_lora(model, branches)
    sites = []
    for m, path, source in named:
        for view in (m.storage, m.bias_storage):
            if view is not None:
                view.path = strip_prefix(path, chosen)
        sites.append(
            Site(
                path=m.storage.path,
                op=m.node.op_type,
                node=m.node.name or "",
                weight=m.storage.store.name,
                layout=m.storage.describe(),
                in_features=m.in_features,
                out_features=m.out_features,
                dtype=m.dtype,
                output=m.output.name or "",
                input=m.input.name or "",
                bias=m.bias.name if m.bias is not None else None,
                source=source,
                module_class=naming.module_class(m.node),
                kind=m.kind,
                dialect=dialect.name,
                lora=joined.get(m.output),
                kernel=m.kernel,
                storage=m.storage,
                bias_storage=m.bias_storage,
            )
        )
    heads = sorted({s.path for s, (m, _, _) in zip(sites, named) if m.kind != "norm" and _is_output_head(m.output)})
    sites = [s for s in sites if s.kind != "norm" or s.path in wanted]  # norms: only where an adapter replaces one
    sites, kept_whole = packing.expand(sites, dialect, wanted)
    sites = [replace(s, lora="lorapass slot") if s.path in slot_paths else s for s in sites]
    return SiteReport(sites, unresolved, unsupported + kept_whole, chosen, prefix_source if chosen else "none", heads,
                      dialect.name)
