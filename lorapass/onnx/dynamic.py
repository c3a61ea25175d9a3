"""Strategy ``dynamic``: a LoRA branch beside each targeted site, its weights overridable graph inputs.

Each targeted module path gets its slots (:mod:`lorapass.onnx.slots`: graph inputs with default initializers,
branch nodes, a metadata record), one per slot type it wants (low-rank, replaced weight/bias, token rows); a
module computed by several nodes (both branches of an ``If``, a weight read twice) shares them. A plain branch's
delta joins the site's output (after its bias) with ``Add``; a DoRA branch joins before the bias (see
:class:`Joint`). Sites that read one activation may share one A product (``fuse_shared_inputs``: their A
inputs are concatenated at run time and the product split by each input's rank); measured slower at decode
on ONNX Runtime CPU, so off by default.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from lorapass.onnx.edit import reroute
from lorapass.onnx.fold import read
from lorapass.onnx.slots import METADATA_KEY, Branch, EmbeddingSlot, LinearSlot, ReplaceSlot, Slot, TokensSlot
from lorapass.plan import Target
from lorapass.site import Site

SLOT_TYPES: dict[str, list[type[Slot]]] = {"linear": [LinearSlot, ReplaceSlot, TokensSlot],
                                           "embedding": [EmbeddingSlot, ReplaceSlot, TokensSlot]}
"""Site kind -> the slot types a dynamic rewrite may give it, in the order they join; a target gets each one that
``wants`` it (a LoRA-ready target, without an adapter module, gets the first)."""


def slots_for(target: Target) -> list[Slot]:
    """The slots a target's site gets."""
    return [cls.for_target(target) for cls in SLOT_TYPES[target.site.kind] if cls.wants(target)]


class _Weights:
    """The base weights of the graph being rewritten (slot defaults that depend on them), read before any edit."""

    def __init__(self, graph: ir.Graph, targets: list[Target]) -> None:
        self.graph = graph
        self.sites = {t.site.path: t.site for t in targets}

    def site(self, path: str) -> np.ndarray:
        return self.sites[path].storage.read()

    def tensor(self, name: str) -> np.ndarray:
        return read(self.graph.initializers[name].const_value).astype(np.float32)


class Joint:
    """Where a site's slots meet the graph: the activation ``x``, the current output ``y`` (after earlier slots),
    the value before the bias, and rerouting of readers to a slot's new value."""

    def __init__(self, g: _Graph, site: Site) -> None:
        self.g, self.graph, self.site = g, g.graph, site
        self.x, self.y = g.values[site.input], g.base[site.output]

    def replace(self, b: Branch, old: ir.Value, new: ir.Value) -> None:
        """Readers of ``old`` (but the branch's own nodes) read ``new``, named after the node making it. Later
        lookups of the site's output give the joined value, so a targeted site reading it (``v(q(x))``) reads it
        with this one's branch applied."""
        reroute(self.graph, old, new, keep=b.nodes, name=new.producer().name.rsplit("/", 1)[0].replace("/", ".") + ".out")
        if old is self.y:
            self.y = self.g.values[self.site.output] = new

    def before_bias(self) -> ir.Value:
        """The site's value before its bias; a Gemm's bias is split out into an ``Add`` after it first."""
        node = self.site.storage.node
        if self.site.bias is None or node.op_type == "MatMul":
            return node.outputs[0] if self.site.kind == "linear" else self.y
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias, pre = node.inputs[2], node.outputs[0]
            node.resize_inputs(2)
            add = ir.Node("", "Add", [pre, bias], name=f"{self.site.path}/bias/Add")
            self.graph.insert_after(node, add)
            reroute(self.graph, pre, add.outputs[0], keep={add}, name=f"{self.site.path}.biased")
            if pre is self.y:
                self.y = self.g.values[self.site.output] = add.outputs[0]
        return node.outputs[0]


class _Graph:
    """The graph being rewritten: its values by name, the slots made so far and their input values."""

    def __init__(self, model: ir.Model, targets: list[Target]) -> None:
        self.model, self.graph = model, model.graph
        self.base = {v.name: v for n in self.graph for v in n.outputs} | {v.name: v for v in self.graph.inputs}
        self.values = dict(self.base)  # name -> its value with every branch joined so far
        self.slots: dict[tuple[str, str], tuple[Slot, dict[str, ir.Value]]] = {}
        self.weights = _Weights(self.graph, targets)

    def slot(self, target: Target, slot: Slot) -> tuple[Slot, dict[str, ir.Value]]:
        """A slot of a module path and its graph inputs (role -> value), made once per path and type."""
        key = (target.site.path, slot.type)
        if key not in self.slots:
            activation = ir.DataType[target.site.dtype.upper()]
            defaults = slot.values(target.module, self.weights)
            inputs = {}
            for spec in slot.inputs():
                dtype = ir.DataType[spec.dtype.upper()] if spec.dtype else activation
                tensor = ir.Tensor(defaults[spec.name].astype(dtype.numpy()), name=spec.name)
                value = ir.Value(name=spec.name, shape=ir.Shape(list(spec.dims)), type=ir.TensorType(dtype),
                                 const_value=tensor)
                self.graph.inputs.append(value)
                self.graph.register_initializer(value)
                inputs[spec.role] = value
            self.slots[key] = (slot, inputs)
        return self.slots[key]

    def insert(self, b: Branch, site: Site) -> None:
        """Place the branch's nodes right after the node producing the site's (base) output."""
        self.graph.insert_after(self.base[site.output].producer(), b.nodes)


def insert_lora(model: ir.Model, targets: list[Target]) -> int:
    """Insert a LoRA branch for every target (one per node); returns how many branches were added."""
    g = _Graph(model, targets)
    groups: dict[tuple[str, str], list[Target]] = defaultdict(list)
    for target in targets:
        groups[(target.site.input, target.site.dtype)].append(target)
    for (x_name, _), group in groups.items():
        x = g.values[x_name]
        fusable = [t for t in group if t.rule.fuse_shared_inputs and t.site.kind == "linear" and LinearSlot.wants(t)]
        if len({t.site.path for t in fusable}) >= 2:
            _fused(g, x, fusable)
            group = [t for t in group if t not in fusable]
        for target in group:
            joint, b = Joint(g, target.site), Branch()
            for slot in slots_for(target):
                slot, inputs = g.slot(target, slot)
                slot.build(b, joint, inputs)
            g.insert(b, target.site)
    g.graph.sort()  # joins may now feed nodes placed before them
    model.metadata_props[METADATA_KEY] = json.dumps([slot.record for slot, _ in g.slots.values()])
    return len(targets)


def _fused(g: _Graph, x: ir.Value, group: list[Target]) -> None:
    """One A matmul for all linear sites reading ``x``: Concat the A inputs, MatMul once, Split by each rank."""
    slots: dict[str, tuple[Slot, dict]] = {}
    others: dict[str, list[Slot]] = {}
    for t in group:
        first, *rest = slots_for(t)
        slots[t.site.path] = g.slot(t, first)
        others[t.site.path] = rest
    paths = list(slots)
    tag = f"{paths[0]}+{len(paths) - 1}"
    b = Branch()
    concat = b.op("Concat", [slots[p][1]["lora_A"] for p in paths], f"{tag}/lora_A/Concat", {"axis": 1})
    down = b.op("MatMul", [x, concat], f"{tag}/lora_A/MatMul")
    shapes = [b.op("Shape", [slots[p][1]["lora_A"]], f"{p}/lora_A/Shape", {"start": 1, "end": 2}) for p in paths]
    sizes = b.op("Concat", shapes, f"{tag}/lora_A/ranks", {"axis": 0})
    parts = dict(zip(paths, b.op("Split", [down, sizes], f"{tag}/lora_A/Split", {"axis": -1}, outputs=len(paths))))
    for target in group:
        joint = Joint(g, target.site)
        slot, inputs = slots[target.site.path]
        slot.build(b, joint, inputs, down=parts[target.site.path])
        for other in others[target.site.path]:
            other, inputs = g.slot(target, other)
            other.build(b, joint, inputs)
    g.insert(b, group[0].site)  # insert_lora sorts the graph afterwards
