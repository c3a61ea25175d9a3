"""Strategy ``dynamic``: a LoRA branch beside each targeted site, its weights overridable graph inputs.

Each targeted module path gets one slot (:mod:`lorapass.onnx.slots`: its graph inputs with default
initializers, its branch nodes, its metadata record); a module computed by several nodes (both branches
of an ``If``, a weight read twice) shares the slot. The branch's delta joins the site's output (after its
bias) with ``Add``. Sites that read one activation may share one A product (``fuse_shared_inputs``: their A
inputs are concatenated at run time and the product split by each input's rank); measured slower at decode
on ONNX Runtime CPU, so off by default.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from lorapass.errors import UnsupportedError
from lorapass.onnx.slots import METADATA_KEY, Branch, ConvSlot, LinearSlot, PackedSlot, Slot
from lorapass.plan import Target
from lorapass.site import Site

SLOT_TYPES: dict[str, type] = {"linear": LinearSlot, "packed": PackedSlot, "conv": ConvSlot}
"""Site kind -> the slot type a dynamic rewrite gives it."""


def slot_for(targets: list[Target]) -> Slot:
    """The slot of the targets sharing one slot path (one site, the row blocks of one packed node, or one module
    computed by several nodes)."""
    return SLOT_TYPES[targets[0].site.kind].for_targets(targets)


class SlotGraph:
    """The graph being rewritten: its values by scope, the slots made so far and their input values."""

    def __init__(self, model: ir.Model) -> None:
        self.model, self.graph = model, model.graph
        self.scopes: dict[ir.Graph, dict[str, ir.Value]] = {}
        self.parents: dict[ir.Graph, ir.Graph | None] = {self.graph: None}
        for graph in [self.graph, *self.graph.subgraphs()]:
            self.scopes[graph] = {v.name: v for v in graph.inputs} | {v.name: v for n in graph for v in n.outputs}
            for node in graph:
                for sub in _subgraphs(node):
                    self.parents[sub] = graph
        self.joined: dict[tuple[ir.Graph, str], ir.Value] = {}  # (scope, name) -> its value with LoRA joined
        self.slots: dict[str, tuple[Slot, dict[str, ir.Value]]] = {}

    def _scope(self, site: Site, name: str) -> ir.Graph:
        """The graph defining ``name`` as the site's node sees it (its own graph first, then the enclosing ones:
        the branches of an If may reuse one name)."""
        graph = site.storage.node.graph if site.storage is not None else self.graph
        while graph is not None and name not in self.scopes.get(graph, {}):
            graph = self.parents.get(graph)
        return graph if graph is not None else self.graph

    def base(self, site: Site, name: str) -> ir.Value:
        """The value ``name`` as the graph had it (before any LoRA was joined)."""
        return self.scopes[self._scope(site, name)][name]

    def value(self, site: Site, name: str) -> ir.Value:
        """The value ``name`` with every branch joined so far: a targeted site reading another one's output
        (``v(q(x))``) reads it with q's LoRA applied."""
        scope = self._scope(site, name)
        return self.joined.get((scope, name), self.scopes[scope][name])

    def slot(self, targets: list[Target]) -> tuple[Slot, dict[str, ir.Value]]:
        """The slot of a slot path and its graph inputs (role -> value), made once per path."""
        path = targets[0].site.slot_path
        if path not in self.slots:
            slot = slot_for(targets)
            self.add(slot, slot.values_for({t.site.path: t.module for t in targets if t.module is not None}),
                     targets[0].site.dtype)
        return self.slots[path]

    def add(self, slot: Slot, defaults: dict, dtype: str) -> dict[str, ir.Value]:
        """Make ``slot``'s graph inputs, initialised to ``defaults`` in the site's ``dtype``; role -> value."""
        element = ir.DataType[dtype.upper()]
        inputs = {}
        for spec in slot.inputs():
            tensor = ir.Tensor(defaults[spec.name].astype(element.numpy()), name=spec.name)
            value = ir.Value(name=spec.name, shape=ir.Shape(list(spec.dims)), type=ir.TensorType(element),
                             const_value=tensor)
            self.graph.inputs.append(value)
            self.graph.register_initializer(value)
            inputs[spec.role] = value
        self.slots[slot.path] = (slot, inputs)
        return inputs

    def records(self) -> None:
        """Write every slot's record into the model's ``lorapass.lora`` metadata."""
        self.model.metadata_props[METADATA_KEY] = json.dumps([slot.record for slot, _ in self.slots.values()])

    def join(self, b: Branch, site: Site, delta: ir.Value) -> None:
        """``y + delta`` in place of the site's output ``y``; a module split over several nodes gets each
        node's rows of ``delta``."""
        if not site.joins:
            self._join(b, site, site.output, delta, site.path)
            return
        sizes = ir.tensor(np.array([rows for _, rows in site.joins], np.int64), name=f"{site.path}/lora/sizes")
        split_sizes = b.op("Constant", [], f"{site.path}/lora/sizes", {"value": sizes})
        parts = b.op("Split", [delta, split_sizes], f"{site.path}/lora/Split", {"axis": -1}, outputs=len(site.joins))
        for i, ((name, _), part) in enumerate(zip(site.joins, parts)):
            self._join(b, site, name, part, f"{site.path}/lora/{i}")

    def _join(self, b: Branch, site: Site, name: str, delta: ir.Value, tag: str) -> None:
        """``y + delta`` in place of ``y``, keeping ``y``'s name where it is a graph output; later lookups of
        ``name`` give the joined value."""
        y = self.base(site, name)
        joined = b.op("Add", [y, delta], f"{tag}/Add" if site.joins else f"{site.path}/lora/Add")
        add = joined.producer()
        if y.is_graph_output():
            outputs = y.producer().graph.outputs
            name, y.name = y.name, f"{y.name}.base"
            joined.name = name
            outputs[[o is y for o in outputs].index(True)] = joined
        else:
            joined.name = f"{tag}.out" if site.joins else f"{site.path}.lora.out"
        for node, index in list(y.uses()):
            if node is not add:
                node.replace_input_with(index, joined)
        self.joined[(self._scope(site, name), name)] = joined

    def insert(self, b: Branch, site: Site) -> None:
        """Place the branch's nodes right after the node producing the site's output (in that node's graph)."""
        producer = self.base(site, site.output).producer()
        producer.graph.insert_after(producer, b.nodes)


def _subgraphs(node: ir.Node) -> list[ir.Graph]:
    out = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            out.append(attr.as_graph())
        elif attr.type == ir.AttributeType.GRAPHS:
            out.extend(attr.as_graphs())
    return out


def refuse_existing(targets: list[Target]) -> None:
    again = [t.site for t in targets if t.site.lora]
    if again:
        names = ", ".join(f"{s.path} ({s.lora})" for s in again[:4]) + (f" and {len(again) - 4} more" if len(again) > 4 else "")
        raise UnsupportedError(
            f"{len(again)} targeted site(s) already have a LoRA branch: {names}. A second dynamic rewrite of the same "
            "sites is refused (it would stack LoRA on LoRA); rewrite the base model, or target other sites")


def insert_lora(model: ir.Model, targets: list[Target]) -> int:
    """Insert a LoRA branch for every target (one per node); returns how many targets got one."""
    refuse_existing(targets)
    g = SlotGraph(model)
    groups: dict[tuple[str, str, int], list[Target]] = defaultdict(list)
    for target in targets:
        scope = id(target.site.storage.node.graph) if target.site.storage is not None else 0
        groups[(target.site.input, target.site.dtype, scope)].append(target)
    for group in groups.values():
        x = g.value(group[0].site, group[0].site.input)
        fusable = [t for t in group if t.rule.fuse_shared_inputs and t.site.kind == "linear" and not t.site.joins]
        if len({t.site.path for t in fusable}) >= 2:
            _fused(g, x, fusable)
            group = [t for t in group if t not in fusable]
        by_slot: dict[str, list[Target]] = defaultdict(list)
        for target in group:
            by_slot[target.site.slot_path].append(target)
        for members in by_slot.values():
            slot, inputs = g.slot(members)
            for site in {t.site.output: t.site for t in members}.values():  # one branch per node computing it
                b = Branch()
                g.join(b, site, slot.branch(b, x, inputs))
                g.insert(b, site)
    g.graph.sort()  # joins may now feed nodes placed before them
    g.records()
    return len(targets)


def _fused(g: SlotGraph, x: ir.Value, group: list[Target]) -> None:
    """One A matmul for all linear sites reading ``x``: Concat the A inputs, MatMul once, Split by each rank."""
    slots = {t.site.path: g.slot([t]) for t in group}
    paths = list(slots)
    tag = f"{paths[0]}+{len(paths) - 1}"
    b = Branch()
    concat = b.op("Concat", [slots[p][1]["lora_A"] for p in paths], f"{tag}/lora_A/Concat", {"axis": 1})
    down = b.op("MatMul", [x, concat], f"{tag}/lora_A/MatMul")
    shapes = [b.op("Shape", [slots[p][1]["lora_A"]], f"{p}/lora_A/Shape", {"start": 1, "end": 2}) for p in paths]
    sizes = b.op("Concat", shapes, f"{tag}/lora_A/ranks", {"axis": 0})
    parts = dict(zip(paths, b.op("Split", [down, sizes], f"{tag}/lora_A/Split", {"axis": -1}, outputs=len(paths))))
    for target in group:
        slot, inputs = slots[target.site.path]
        g.join(b, target.site, slot.up(b, parts[target.site.path], inputs))
    g.insert(b, group[0].site)  # insert_lora sorts the graph afterwards
