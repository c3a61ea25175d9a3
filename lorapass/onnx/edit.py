"""Small graph edits shared by the strategies: reroute a value's readers to a new value."""

from __future__ import annotations

from collections.abc import Collection

import onnx_ir as ir


def reroute(old: ir.Value, new: ir.Value, keep: Collection[ir.Node] = (), name: str | None = None) -> None:
    """Every reader of ``old`` (a node's output) except the nodes in ``keep`` reads ``new`` instead.

    An output of its graph (or subgraph) keeps its name: ``new`` takes it and ``old`` becomes ``<name>.base``;
    otherwise ``new`` is named ``name`` (when given)."""
    if old.is_graph_output():
        outputs = old.producer().graph.outputs
        taken, old.name = old.name, f"{old.name}.base"
        new.name = taken
        outputs[[o is old for o in outputs].index(True)] = new
    elif name is not None:
        new.name = name
    keep = set(keep)
    for node, index in list(old.uses()):
        if node not in keep:
            node.replace_input_with(index, new)
