"""Strategy ``dynamic``: a LoRA branch beside each targeted site, its weights overridable graph inputs.

Each targeted slot path (a site, or the row blocks of one packed node) gets its slots (:mod:`lorapass.onnx.slots`:
graph inputs with default initializers, branch nodes, a metadata record), one per slot type it wants (low-rank,
replaced weight/bias, token rows); a module computed by several nodes (both branches of an ``If``, a weight read
twice) shares them. A plain branch's delta joins the site's output (after its bias) with ``Add``; a DoRA branch
joins before the bias (see :class:`Joint`). Sites that read one activation may share one A product
(``fuse_shared_inputs``: their A inputs are concatenated at run time and the product split by each input's rank);
measured slower at decode on ONNX Runtime CPU, so off by default.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from lorapass.errors import UnsupportedError
from lorapass.onnx.edit import reroute
from lorapass.onnx.fold import read
from lorapass.onnx.slots import (METADATA_KEY, Branch, ConvSlot, EmbeddingSlot, LinearSlot, PackedSlot, ReplaceSlot,
                                 Slot, TokensSlot)
from lorapass.plan import Target
from lorapass.site import Site

SLOT_TYPES: dict[str, list[type[Slot]]] = {"linear": [LinearSlot, ReplaceSlot, TokensSlot], "packed": [PackedSlot],
                                           "embedding": [EmbeddingSlot, ReplaceSlot, TokensSlot], "conv": [ConvSlot],
                                           "norm": [ReplaceSlot]}
"""Site kind -> the slot types a dynamic rewrite may give it, in the order they join; targets get each one that
``wants`` one of them (a LoRA-ready target, without an adapter module, wants the first)."""


def slots_for(targets: list[Target]) -> list[Slot]:
    """The slots of the targets sharing one slot path (one site, the row blocks of one packed node, or one module
    computed by several nodes)."""
    return [cls.for_targets(targets) for cls in SLOT_TYPES[targets[0].site.kind] if any(cls.wants(t) for t in targets)]


def slot_for(targets: list[Target]) -> Slot:
    """The low-rank slot of the targets sharing one slot path (its site kind's first slot type)."""
    return SLOT_TYPES[targets[0].site.kind][0].for_targets(targets)


class _Weights:
    """The base weights of the graph being rewritten (slot defaults that depend on them), read before any edit."""

    def __init__(self, graph: ir.Graph, targets: list[Target]) -> None:
        self.graph = graph
        self.sites = {t.site.path: t.site for t in targets}

    def site(self, path: str) -> np.ndarray:
        return self.sites[path].storage.read()

    def tensor(self, name: str) -> np.ndarray:
        return read(self.graph.initializers[name].const_value).astype(np.float32)


class SlotGraph:
    """The graph being rewritten: its values by scope, the slots made so far and their input values."""

    def __init__(self, model: ir.Model, targets: list[Target] = ()) -> None:
        self.model, self.graph = model, model.graph
        self.scopes: dict[ir.Graph, dict[str, ir.Value]] = {}
        self.parents: dict[ir.Graph, ir.Graph | None] = {self.graph: None}
        for graph in [self.graph, *self.graph.subgraphs()]:
            self.scopes[graph] = {v.name: v for v in graph.inputs} | {v.name: v for n in graph for v in n.outputs}
            for node in graph:
                for sub in _subgraphs(node):
                    self.parents[sub] = graph
        self.joined: dict[tuple[ir.Graph, str], ir.Value] = {}  # (scope, name) -> its value with LoRA joined
        self.slots: dict[tuple[str, str], tuple[Slot, dict[str, ir.Value]]] = {}
        self.weights = _Weights(self.graph, targets)

    def scope(self, site: Site, name: str) -> ir.Graph:
        """The graph defining ``name`` as the site's node sees it (its own graph first, then the enclosing ones:
        the branches of an If may reuse one name)."""
        graph = site.storage.node.graph if site.storage is not None else self.graph
        while graph is not None and name not in self.scopes.get(graph, {}):
            graph = self.parents.get(graph)
        return graph if graph is not None else self.graph

    def base(self, site: Site, name: str) -> ir.Value:
        """The value ``name`` as the graph had it (before any LoRA was joined)."""
        return self.scopes[self.scope(site, name)][name]

    def value(self, site: Site, name: str) -> ir.Value:
        """The value ``name`` with every branch joined so far: a targeted site reading another one's output
        (``v(q(x))``) reads it with q's LoRA applied."""
        scope = self.scope(site, name)
        return self.joined.get((scope, name), self.scopes[scope][name])

    def slot(self, targets: list[Target], slot: Slot) -> tuple[Slot, dict[str, ir.Value]]:
        """A slot of a slot path and its graph inputs (role -> value), made once per path and type."""
        key = (targets[0].site.slot_path, slot.type)
        if key not in self.slots:
            self.add(slot, slot.values_for({t.module.path: t.module for t in targets if t.module is not None},
                                           self.weights), targets[0].site.dtype)
        return self.slots[key]

    def add(self, slot: Slot, defaults: dict, dtype: str) -> dict[str, ir.Value]:
        """Make ``slot``'s graph inputs, initialised to ``defaults`` in the site's ``dtype`` (or the input's own);
        role -> value."""
        activation = ir.DataType[dtype.upper()]
        inputs = {}
        for spec in slot.inputs():
            element = ir.DataType[spec.dtype.upper()] if spec.dtype else activation
            tensor = ir.Tensor(defaults[spec.name].astype(element.numpy()), name=spec.name)
            value = ir.Value(name=spec.name, shape=ir.Shape(list(spec.dims)), type=ir.TensorType(element),
                             const_value=tensor)
            self.graph.inputs.append(value)
            self.graph.register_initializer(value)
            inputs[spec.role] = value
        self.slots[(slot.path, slot.type)] = (slot, inputs)
        return inputs

    def records(self) -> None:
        """Write every slot's record into the model's ``lorapass.lora`` metadata."""
        self.model.metadata_props[METADATA_KEY] = json.dumps([slot.record for slot, _ in self.slots.values()])

    def join(self, b: Branch, site: Site, delta: ir.Value) -> None:
        """``y + delta`` in place of the site's output (each node's rows of a module split over several nodes)."""
        Joint(self, site).add(b, delta, "lora")

    def insert(self, b: Branch, site: Site) -> None:
        """Place the branch's nodes right after the node producing the site's output (in that node's graph)."""
        producer = self.base(site, site.output).producer()
        producer.graph.insert_after(producer, b.nodes)


class Joint:
    """Where a site's slots meet the graph: the activation ``x``, the current output ``y`` (after earlier slots),
    the value before the bias, and rerouting of readers to a slot's new value."""

    def __init__(self, g: SlotGraph, site: Site, x: ir.Value | None = None) -> None:
        self.g, self.site, self.x = g, site, x
        self.y = g.base(site, site.output)

    def replace(self, b: Branch, old: ir.Value, new: ir.Value) -> None:
        """Readers of ``old`` (but the branch's own nodes) read ``new``, named after the node making it. Later
        lookups of the site's output give the joined value."""
        reroute(old, new, keep=b.nodes, name=new.producer().name.rsplit("/", 1)[0].replace("/", ".") + ".out")
        if old is self.y:
            self.y = new
            self.g.joined[(self.g.scope(self.site, self.site.output), self.site.output)] = new

    def add(self, b: Branch, delta: ir.Value, tag: str) -> None:
        """``y + delta`` in place of the site's output; a module split over several nodes gets each node's rows."""
        site = self.site
        if not site.joins:
            self.replace(b, self.y, b.op("Add", [self.y, delta], f"{site.path}/{tag}/Add"))
            return
        sizes = b.const(np.array([rows for _, rows in site.joins], np.int64), f"{site.path}/{tag}/sizes")
        parts = b.op("Split", [delta, sizes], f"{site.path}/{tag}/Split", {"axis": -1}, outputs=len(site.joins))
        for i, ((name, _), part) in enumerate(zip(site.joins, parts)):
            y = self.g.base(site, name)
            joined = b.op("Add", [y, part], f"{site.path}/{tag}/{i}/Add")
            reroute(y, joined, keep=b.nodes, name=f"{site.path}.{tag}.{i}.out")
            self.g.joined[(self.g.scope(site, name), name)] = joined

    def before_bias(self) -> ir.Value:
        """The site's value before its bias; a Gemm's bias is split out into an ``Add`` after it first."""
        site, node = self.site, self.site.storage.node
        if site.joins:
            raise UnsupportedError(f"site {site.path!r} is split over {len(site.joins)} nodes: a DoRA factor there "
                                   "is not supported in dynamic (merge applies it)")
        if site.bias is None or node.op_type == "MatMul":
            return node.outputs[0] if site.kind == "linear" else self.y
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias, pre = node.inputs[2], node.outputs[0]
            node.resize_inputs(2)
            add = ir.Node("", "Add", [pre, bias], name=f"{site.path}/bias/Add")
            node.graph.insert_after(node, add)
            reroute(pre, add.outputs[0], keep={add}, name=f"{site.path}.biased")
            if pre is self.y:
                self.y = add.outputs[0]
        return node.outputs[0]


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
    """Insert the slots' branches for every target (one per node); returns how many targets got them."""
    refuse_existing(targets)
    g = SlotGraph(model, targets)
    groups: dict[tuple[str, str, int], list[Target]] = defaultdict(list)
    for target in targets:
        scope = id(target.site.storage.node.graph) if target.site.storage is not None else 0
        groups[(target.site.input, target.site.dtype, scope)].append(target)
    for group in groups.values():
        x = g.value(group[0].site, group[0].site.input)
        fusable = [t for t in group if t.rule.fuse_shared_inputs and t.site.kind == "linear" and not t.site.joins
                   and LinearSlot.wants(t)]
        if len({t.site.path for t in fusable}) >= 2:
            _fused(g, x, fusable)
            group = [t for t in group if t not in fusable]
        by_slot: dict[str, list[Target]] = defaultdict(list)
        for target in group:
            by_slot[target.site.slot_path].append(target)
        for members in by_slot.values():
            slots = [g.slot(members, slot) for slot in slots_for(members)]
            for site in {t.site.output: t.site for t in members}.values():  # one branch per node computing it
                joint, b = Joint(g, site, x), Branch()
                for slot, inputs in slots:
                    slot.build(b, joint, inputs)
                g.insert(b, site)
    g.graph.sort()  # joins may now feed nodes placed before them
    g.records()
    return len(targets)


def _fused(g: SlotGraph, x: ir.Value, group: list[Target]) -> None:
    """One A matmul for all linear sites reading ``x``: Concat the A inputs, MatMul once, Split by each rank."""
    slots: dict[str, tuple[Slot, dict]] = {}
    others: dict[str, list[tuple[Slot, dict]]] = {}
    for t in group:
        first, *rest = slots_for([t])
        slots[t.site.path] = g.slot([t], first)
        others[t.site.path] = [g.slot([t], slot) for slot in rest]
    paths = list(slots)
    tag = f"{paths[0]}+{len(paths) - 1}"
    b = Branch()
    concat = b.op("Concat", [slots[p][1]["lora_A"] for p in paths], f"{tag}/lora_A/Concat", {"axis": 1})
    down = b.op("MatMul", [x, concat], f"{tag}/lora_A/MatMul")
    shapes = [b.op("Shape", [slots[p][1]["lora_A"]], f"{p}/lora_A/Shape", {"start": 1, "end": 2}) for p in paths]
    sizes = b.op("Concat", shapes, f"{tag}/lora_A/ranks", {"axis": 0})
    parts = dict(zip(paths, b.op("Split", [down, sizes], f"{tag}/lora_A/Split", {"axis": -1}, outputs=len(paths))))
    for target in group:
        joint = Joint(g, target.site, x)
        slot, inputs = slots[target.site.path]
        slot.build(b, joint, inputs, down=parts[target.site.path])
        for other, other_inputs in others[target.site.path]:
            other.build(b, joint, other_inputs)
    g.insert(b, group[0].site)  # insert_lora sorts the graph afterwards
