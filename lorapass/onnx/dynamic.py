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

import onnx_ir as ir

from lorapass.onnx.slots import METADATA_KEY, Branch, LinearSlot, Slot
from lorapass.plan import Target
from lorapass.site import Site

SLOT_TYPES: dict[str, type] = {"linear": LinearSlot}
"""Site kind -> the slot type a dynamic rewrite gives it."""


def slot_for(target: Target) -> Slot:
    """The slot a target's site gets."""
    return SLOT_TYPES[target.site.kind].for_target(target)


class SlotGraph:
    """The graph being rewritten: its values by name, the slots made so far and their input values."""

    def __init__(self, model: ir.Model) -> None:
        self.model, self.graph = model, model.graph
        self.base = {v.name: v for n in self.graph for v in n.outputs} | {v.name: v for v in self.graph.inputs}
        self.values = dict(self.base)  # name -> its value with every branch joined so far
        self.slots: dict[str, tuple[Slot, dict[str, ir.Value]]] = {}

    def slot(self, target: Target) -> tuple[Slot, dict[str, ir.Value]]:
        """The slot of a module path and its graph inputs (role -> value), made once per path."""
        path = target.site.path
        if path not in self.slots:
            slot = slot_for(target)
            self.add(slot, slot.values(target.module), target.site.dtype)
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
        """``y + delta`` in place of the site's output ``y``, keeping ``y``'s name where it is a graph output.

        Later lookups of the output's name give the joined value, so a targeted site reading this one's output
        (``v(q(x))``) reads it with q's LoRA applied."""
        y = self.base[site.output]
        joined = b.op("Add", [y, delta], f"{site.path}/lora/Add")
        add = joined.producer()
        if y.is_graph_output():
            name, y.name = y.name, f"{y.name}.base"
            joined.name = name
            outputs = self.graph.outputs
            outputs[[o is y for o in outputs].index(True)] = joined
        else:
            joined.name = f"{site.path}.lora.out"
        for node, index in list(y.uses()):
            if node is not add:
                node.replace_input_with(index, joined)
        self.values[site.output] = joined

    def insert(self, b: Branch, site: Site) -> None:
        """Place the branch's nodes right after the node producing the site's (base) output."""
        self.graph.insert_after(self.base[site.output].producer(), b.nodes)


def insert_lora(model: ir.Model, targets: list[Target]) -> int:
    """Insert a LoRA branch for every target (one per node); returns how many branches were added."""
    g = SlotGraph(model)
    groups: dict[tuple[str, str], list[Target]] = defaultdict(list)
    for target in targets:
        groups[(target.site.input, target.site.dtype)].append(target)
    for (x_name, _), group in groups.items():
        x = g.values[x_name]
        fusable = [t for t in group if t.rule.fuse_shared_inputs and t.site.kind == "linear"]
        if len({t.site.path for t in fusable}) >= 2:
            _fused(g, x, fusable)
            group = [t for t in group if t not in fusable]
        for target in group:
            slot, inputs = g.slot(target)
            b = Branch()
            g.join(b, target.site, slot.branch(b, x, inputs))
            g.insert(b, target.site)
    g.graph.sort()  # joins may now feed nodes placed before them
    g.records()
    return len(targets)


def _fused(g: SlotGraph, x: ir.Value, group: list[Target]) -> None:
    """One A matmul for all linear sites reading ``x``: Concat the A inputs, MatMul once, Split by each rank."""
    slots = {t.site.path: g.slot(t) for t in group}
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
