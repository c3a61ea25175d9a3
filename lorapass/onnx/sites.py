"""Find every adaptable layer (site: linear, embedding) of an ONNX graph and name it by its torch module path."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import onnx_ir as ir

from lorapass.onnx import naming
from lorapass.onnx.patterns import PATTERNS, Match, Unsupported
from lorapass.site import Site

_PASS_THROUGH = {"Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten"}
NAMESPACE = "namespace"


@dataclass
class SiteReport:
    """What discovery found: the sites, the nodes it could not name, and the prefix it stripped."""

    sites: list[Site]
    unresolved: list[str] = field(default_factory=list)
    unsupported: list[tuple[str, str]] = field(default_factory=list)  # (node, reason)
    prefix: str = ""
    prefix_source: str = "none"
    output_heads: list[str] = field(default_factory=list)

    def by_path(self) -> dict[str, list[Site]]:
        out: dict[str, list[Site]] = {}
        for site in self.sites:
            out.setdefault(site.path, []).append(site)
        return out


def _root_scope(node: ir.Node) -> str | None:
    """The scope of the outermost transformers model in the dynamo exporter's ``namespace`` record."""
    text = node.metadata_props.get(NAMESPACE)
    if not text:
        return None
    for entry in text.split("/"):
        scope, _, cls = entry.partition(": ")
        if cls.strip().startswith("transformers.models."):
            return scope.strip()
    return None


def strip_prefix(path: str, prefix: str) -> str:
    return path[len(prefix) + 1:] if prefix and path.startswith(prefix + ".") else path


def guess_prefix(paths: list[str], wanted: Collection[str]) -> str:
    """The leading scope whose removal makes the most ``wanted`` module paths exist in the graph."""
    candidates = {""}
    for path in paths:
        parts = path.split(".")
        candidates.update(".".join(parts[:k]) for k in range(1, min(3, len(parts))))
    wanted = set(wanted)

    def hits(prefix: str) -> int:
        return len(wanted & {strip_prefix(p, prefix) for p in paths if not prefix or p.startswith(prefix + ".")})

    return max(sorted(candidates, key=len), key=hits)


def _is_output_head(output: ir.Value) -> bool:
    value = output
    while not value.is_graph_output():
        consumers = value.consumers()
        if len(consumers) != 1 or consumers[0].op_type not in _PASS_THROUGH:
            return False
        value = consumers[0].outputs[0]
    return True


def _matches(model: ir.Model) -> tuple[list[Match], list[tuple[str, str]]]:
    found, unsupported = [], []
    for node in model.graph:
        for pattern in PATTERNS:
            result = pattern(node)
            if isinstance(result, Match):
                found.append(result)
                break
            if isinstance(result, Unsupported):
                unsupported.append((node.name or f"<unnamed {node.op_type}>", result.reason))
                break
    return found, unsupported


def find_sites(model: ir.Model, prefix: str | None = None, wanted: Collection[str] = ()) -> SiteReport:
    """Every adaptable layer the site patterns recognise, named by module path.

    ``prefix`` is the wrapper scope to strip (``m`` for a module that holds the model as ``self.m``);
    when None it is read from the dynamo exporter's class records, else chosen so that the most
    ``wanted`` paths (e.g. an adapter's module names) exist.
    """
    matches, unsupported = _matches(model)
    named: list[tuple[Match, str, str]] = []
    unresolved: list[str] = []
    from_nodes: list[tuple[Match, str]] = []
    for m in matches:
        for source, strategy in naming.STRATEGIES.items():
            path = strategy(m.node, m.weight, m.bias)
            if path:
                break
        if not path:
            unresolved.append(m.node.name or f"<unnamed {m.node.op_type}>")
        elif source == "node_name":
            from_nodes.append((m, path))
        else:
            named.append((m, path, source))

    # TorchScript node names may drop scopes: map them with what parameter names taught us.
    pairs = [(p, path) for m, path, source in named if (p := naming.from_node_name(m.node, m.weight, m.bias))]
    scope_map = naming.learn_scope_map(pairs)
    named += [(m, naming.apply_scope_map(path, scope_map), "node_name") for m, path in from_nodes]

    root_scopes = {s for m, _, _ in named if (s := _root_scope(m.node)) is not None}
    if prefix is not None:
        chosen, prefix_source = prefix, "given"
    elif len(root_scopes) == 1:
        chosen, prefix_source = root_scopes.pop(), "exporter class records"
    elif wanted:
        chosen, prefix_source = guess_prefix([p for _, p, _ in named], wanted), "adapter module names"
    else:
        chosen, prefix_source = "", "none"

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
                dialect="torch",
                storage=m.storage,
                bias_storage=m.bias_storage,
            )
        )
    heads = sorted({s.path for s, (m, _, _) in zip(sites, named) if _is_output_head(m.output)})
    return SiteReport(sites, unresolved, unsupported, chosen, prefix_source if chosen else "none", heads)
