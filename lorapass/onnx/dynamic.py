"""Strategy ``dynamic``: a LoRA branch beside each targeted linear, its weights overridable graph inputs.

For a site at module path ``p`` reading ``x`` and producing ``y`` (after its bias)::

    y' = y + (x @ p.lora_A) @ p.lora_B

``p.lora_A`` is [in, r] (PEFT's A transposed), ``p.lora_B`` is [r, out] (PEFT's B transposed, with the
scale alpha/r or alpha/sqrt(r) already multiplied in: ONNX Runtime adapter files carry no alpha). Both
are graph inputs with default initializers and a symbolic rank dimension ``p.r``, so ONNX Runtime can
feed an adapter of any rank per run. Sites that read one activation (q/k/v, gate/up) may share one A
matmul: their A inputs are concatenated at run time and the product split by each input's rank.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from lorapass.plan import Target
from lorapass.site import Site

METADATA_KEY = "lorapass.lora"
"""Model metadata: JSON list of {path, lora_A, lora_B, in, out, r, alpha, scale} for every LoRA slot."""


def input_names(path: str) -> tuple[str, str]:
    """The graph input names of a site's LoRA weights (stable: adapters are keyed by them)."""
    return f"{path}.lora_A", f"{path}.lora_B"


def record(target: Target) -> dict:
    """The ``lorapass.lora`` metadata entry of one LoRA slot."""
    site, params = target.site, target.params
    a, b = input_names(site.path)
    return {"path": site.path, "lora_A": a, "lora_B": b, "in": site.in_features, "out": site.out_features,
            "r": params.r, "alpha": params.alpha, "scale": params.scale}


def lora_weights(target: Target) -> tuple[np.ndarray, np.ndarray]:
    """(A as [in, r], scale·B as [r, out]) in float32; zeros without an adapter module (the graph equals the base)."""
    site, params = target.site, target.params
    if target.module is None:
        return np.zeros((site.in_features, params.r), np.float32), np.zeros((params.r, site.out_features), np.float32)
    up, down = target.module.low_rank()
    return np.ascontiguousarray(down.T), np.ascontiguousarray(up.T)


def _op(op_type: str, inputs: list[ir.Value], name: str, attributes: dict | None = None, outputs: int = 1) -> ir.Node:
    attrs = [ir.convenience.convert_attribute(k, v) for k, v in (attributes or {}).items()]
    return ir.Node("", op_type, inputs, attrs, num_outputs=outputs, name=name)


class _Builder:
    """Adds LoRA inputs and nodes to one graph."""

    def __init__(self, model: ir.Model) -> None:
        self.model, self.graph = model, model.graph
        self.nodes = {n.name: n for n in self.graph}
        self.values = {v.name: v for n in self.graph for v in n.outputs} | {v.name: v for v in self.graph.inputs}
        self.slots: dict[str, tuple[ir.Value, ir.Value]] = {}
        self.records: list[dict] = []

    def slot(self, target: Target) -> tuple[ir.Value, ir.Value]:
        """The (A, B) graph inputs of a module path, made once however many nodes use the module."""
        site = target.site
        if site.path in self.slots:
            return self.slots[site.path]
        dtype = ir.DataType[site.dtype.upper()]
        a, b = lora_weights(target)
        rank = f"{site.path}.r"
        made = []
        for name, array, dims in zip(input_names(site.path), (a, b), ([site.in_features, rank], [rank, site.out_features])):
            tensor = ir.Tensor(array.astype(dtype.numpy()), name=name)
            value = ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(dtype), const_value=tensor)
            self.graph.inputs.append(value)
            self.graph.register_initializer(value)
            made.append(value)
        self.slots[site.path] = (made[0], made[1])
        self.records.append(record(target))
        return self.slots[site.path]

    def join(self, site: Site, down: ir.Value, b: ir.Value) -> list[ir.Node]:
        """``y + down @ B`` in place of ``y``, keeping ``y``'s name where it is a graph output."""
        up = _op("MatMul", [down, b], f"{site.path}/lora_B/MatMul")
        y = self.values[site.output]
        add = _op("Add", [y, up.outputs[0]], f"{site.path}/lora/Add")
        joined = add.outputs[0]
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
        return [up, add]

    def after(self, site: Site) -> ir.Node:
        """The node that produces the site's output: new nodes go right after it."""
        return self.values[site.output].producer()


def insert_lora(model: ir.Model, targets: list[Target]) -> int:
    """Insert a LoRA branch for every target (one per node); returns how many branches were added."""
    builder = _Builder(model)
    groups: dict[tuple[str, str], list[Target]] = defaultdict(list)
    for target in targets:
        groups[(target.site.input, target.site.dtype)].append(target)
    for (x_name, _), group in groups.items():
        x = builder.values[x_name]
        fusable = [t for t in group if t.rule.fuse_shared_inputs]
        if len({t.site.path for t in fusable}) >= 2:
            _fused(builder, x, fusable)
            group = [t for t in group if t not in fusable]
        for target in group:
            a, b = builder.slot(target)
            down = _op("MatMul", [x, a], f"{target.site.path}/lora_A/MatMul")
            builder.graph.insert_after(builder.after(target.site), [down, *builder.join(target.site, down.outputs[0], b)])
    builder.graph.sort()  # joins may now feed nodes placed before them
    model.metadata_props[METADATA_KEY] = json.dumps(builder.records)
    return len(targets)


def _fused(builder: _Builder, x: ir.Value, group: list[Target]) -> None:
    """One A matmul for all sites reading ``x``: Concat the A inputs, MatMul once, Split by each rank."""
    paths = list(dict.fromkeys(t.site.path for t in group))
    slots = {t.site.path: builder.slot(t) for t in group}
    tag = f"{paths[0]}+{len(paths) - 1}"
    concat = _op("Concat", [slots[p][0] for p in paths], f"{tag}/lora_A/Concat", {"axis": 1})
    down = _op("MatMul", [x, concat.outputs[0]], f"{tag}/lora_A/MatMul")
    shapes = [_op("Shape", [slots[p][0]], f"{p}/lora_A/Shape", {"start": 1, "end": 2}) for p in paths]
    sizes = _op("Concat", [s.outputs[0] for s in shapes], f"{tag}/lora_A/ranks", {"axis": 0})
    split = _op("Split", [down.outputs[0], sizes.outputs[0]], f"{tag}/lora_A/Split", {"axis": -1}, outputs=len(paths))
    parts = dict(zip(paths, split.outputs))
    anchor = builder.after(group[0].site)  # insert_lora sorts the graph afterwards
    new_nodes = [concat, down, *shapes, sizes, split]
    for target in group:
        new_nodes += builder.join(target.site, parts[target.site.path], slots[target.site.path][1])
    builder.graph.insert_after(anchor, new_nodes)
