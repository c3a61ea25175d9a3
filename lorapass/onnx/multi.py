"""Strategy ``multi``: one graph, one run, a different adapter for every batch row (PEFT's mixed batches).

The graph gains one input, ``lora_ids`` int64 [batch] (its batch dim is the one the graph's first input
has): row b uses adapter ``lora_ids[b]``, 0 the base model, k the k-th adapter. Every module path any adapter
targets gets a bank (:class:`lorapass.onnx.slots.BankSlot`): overridable graph inputs stacking all adapters'
weights, from which each row gathers its own. Rows are found through that batch dim: the site's input is
seen as [batch, tokens, in] (a Reshape for flattened [batch*seq, in] activations such as TorchScript's Gemm
graphs, nothing for [batch, seq, in]) and the delta is given the site output's shape before it joins.

Bad ids are errors in the graph itself: ``lora_ids/bounds`` gathers from a tensor of the bank's size, so ONNX
Runtime (CPU) fails the run naming that node for an id outside [0, slots) (a negative id is reported as
``idx=<slots>``), and ``lora_ids/rows_of_batch`` fails for a length other than the batch;
:class:`lorapass.ort_adapter.Session` checks both before every run. Rules'
``fuse_shared_inputs`` does not apply (banks are gathered per site).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from lorapass.adapter import Adapter
from lorapass.errors import ModelError, RuleError, UnsupportedError
from lorapass.onnx.dynamic import SlotGraph, refuse_existing, slot_for
from lorapass.onnx.slots import BankSlot, Branch
from lorapass.plan import Target
from lorapass.site import Site

IDS = "lora_ids"
"""The graph input naming each row's adapter."""


def bank_names(adapters: Sequence[Adapter], slots: int | None = None) -> list[str | None]:
    """The name of each id from 1: the adapters in order (their directory or file names, repeats made unique
    with ``_k``), then empty slots (None) up to ``slots``."""
    if slots is None and not adapters:
        raise RuleError("strategy multi needs adapters (--adapter ...) or empty slots (--slots N with --target)")
    if slots is not None and slots < max(1, len(adapters)):
        raise RuleError(f"{slots} slot(s) cannot hold {len(adapters)} adapter(s)" if adapters else
                        f"--slots {slots}: a bank needs at least one slot")
    names: list[str | None] = []
    for k, adapter in enumerate(adapters, start=1):
        name = adapter.source.name
        names.append(f"{name}_{k}" if name in names else name)
    return names + [None] * ((slots or 0) - len(adapters))


def _rows(graph: ir.Graph) -> tuple[ir.Value, ir.Value]:
    """The new ``lora_ids`` input, batch-sized like the graph's first input (returned too)."""
    taken = {v.name for v in graph.inputs} | set(graph.initializers)
    if IDS in taken:
        raise ModelError(f"the model already has an input {IDS!r} (rewrite the base model, not a multi graph)")
    first = next((v for v in graph.inputs if v.name not in graph.initializers), None)
    if first is None or first.shape is None or len(first.shape) == 0:
        raise UnsupportedError("strategy multi needs a graph input with a batch dimension to size lora_ids")
    ids = ir.Value(name=IDS, shape=ir.Shape([first.shape[0]]), type=ir.TensorType(ir.DataType.INT64))
    graph.inputs.append(ids)
    return ids, first


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.Tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _ints(graph: ir.Graph, *values: int) -> ir.Value:
    """A shared int64 vector constant."""
    name = f"{IDS}.ints_" + "_".join(str(v) for v in values)
    if name in graph.initializers:
        return graph.initializers[name]
    return _constant(graph, name, np.array(values, np.int64))


def _checked(graph: ir.Graph, b: Branch, ids: ir.Value, first: ir.Value, bank: ir.Value) -> ir.Value:
    """``ids`` unchanged, through a Reshape to the batch size of ``first`` (fails for another length) and a
    Gather that fails for ids outside [0, slots) (the bound check)."""
    ids = b.op("Reshape", [ids, b.op("Shape", [first], f"{IDS}/batch", {"start": 0, "end": 1})], f"{IDS}/rows_of_batch")
    slots = b.op("Shape", [bank], f"{IDS}/slots", {"start": 0, "end": 1})
    negative = b.op("Less", [ids, _constant(graph, f"{IDS}.zero", np.array(0, np.int64))], f"{IDS}/negative")
    index = b.op("Where", [negative, slots, ids], f"{IDS}/index")
    zeros = b.op("ConstantOfShape", [slots], f"{IDS}/zeros", {"value": ir.tensor(np.zeros(1, np.int64))})
    return b.op("Add", [ids, b.op("Gather", [zeros, index], f"{IDS}/bounds")], f"{IDS}/checked")


def _batch_first(x: ir.Value, ids: ir.Value) -> bool:
    """Whether ``x`` is known to be [batch, tokens, in] with the batch dim of ``lora_ids`` (a named or fixed dim:
    two unknown dims are not the same)."""
    batch = ids.shape[0]
    known = isinstance(batch, int) or batch.value is not None
    return known and x.shape is not None and len(x.shape) == 3 and x.shape[0] == batch


def insert_banks(model: ir.Model, targets: Sequence[Sequence[Target]], names: Sequence[str | None]) -> int:
    """Give every targeted slot path a bank and every targeted node a per-row branch; returns the branches added.

    ``targets[k]`` are the targets of adapter k+1 (named ``names[k]``; a target without a module is an empty
    slot; missing lists are empty slots). A path adapter k does not target holds zeros in its slot.
    """
    targets = list(targets) + [[]] * (len(names) - len(targets))
    flat = [t for adapter in targets for t in adapter]
    refuse_existing(flat)
    for t in flat:
        if t.module is not None and not t.module.additive_branch:
            why = ("PEFT refuses DoRA in mixed batches too" if t.module.dora else
                   "strategy multi banks low-rank deltas and LoRA biases only (PEFT runs this per sub-batch); use "
                   "strategy dynamic with one adapter per run")
            raise UnsupportedError(f"{t.module.source}: {t.module.key()} ({t.module.name} at {t.site.path!r}) is not "
                                   f"an additive low-rank delta; {why}")
    convs = sorted({t.site.path for t in flat if t.site.kind == "conv"})
    if convs:
        raise UnsupportedError(f"strategy multi has no banks for convolutions ({len(convs)} targeted, e.g. "
                               f"{convs[:3]}); use strategy dynamic and one adapter file per request")
    g = SlotGraph(model)
    ids, first = _rows(g.graph)
    by_slot: dict[str, list[Target]] = defaultdict(list)
    for t in flat:
        by_slot[t.site.slot_path].append(t)
    for path, members in by_slot.items():
        biased_last = sorted(members, key=lambda t: t.module is not None and t.module.lora_bias() is not None)
        sites = list({t.site.path: t for t in biased_last}.values())  # one per module (a biased one if any)
        modules = [{t.site.path: t.module for t in adapter if t.site.slot_path == path and t.module is not None}
                   for adapter in targets]
        bank = BankSlot.around(slot_for(sites), modules, names, IDS)
        g.add(bank, bank.stacked(modules), members[0].site.dtype)
    shared = Branch()
    checked = _checked(g.graph, shared, ids, first, next(iter(g.slots.values()))[1]["lora_A"])
    rows = shared.op("Shape", [checked], f"{IDS}/rows")
    g.graph.insert_before(g.graph[0], shared.nodes)
    groups: dict[tuple, list[Site]] = defaultdict(list)
    for t in flat:
        scope = t.site.storage.node.graph if t.site.storage is not None else g.graph
        groups[(t.site.input, t.site.dtype, id(scope))].append(t.site)
    branches = 0
    for group in groups.values():
        sites = list({site.output: site for site in group}.values())  # one branch per node computing a slot
        x = g.value(sites[0], sites[0].input)
        rows_first = _batch_first(x, ids)
        if not rows_first:  # [..., in] -> [batch, tokens, in] once per activation; each delta back to [..., out]
            b, tag = Branch(), sites[0].slot_path
            leading = b.op("Shape", [x], f"{tag}/lora/Shape", {"start": 0, "end": -1})
            shape = b.op("Concat", [rows, _ints(g.graph, -1, sites[0].in_features)], f"{tag}/lora/rows", {"axis": 0})
            x_rows = b.op("Reshape", [x, shape], f"{tag}/lora/Reshape")
            _insert_after(x, b.nodes, g.graph)
        for site in sites:
            slot, inputs = g.slots[(site.slot_path, BankSlot.type)]
            b = Branch()
            delta = slot.branch(b, x if rows_first else x_rows, inputs | {"ids": checked})
            if not rows_first:
                out = _ints(g.graph, slot.record["out"])
                delta = b.op("Reshape", [delta, b.op("Concat", [leading, out], f"{site.slot_path}/lora/shape",
                                                     {"axis": 0})], f"{site.slot_path}/lora/delta")
            g.join(b, site, delta)
            g.insert(b, site)
            branches += 1
    g.graph.sort()
    g.records()
    return branches


def _insert_after(x: ir.Value, nodes: list[ir.Node], graph: ir.Graph) -> None:
    """Place ``nodes`` right after ``x``'s producer, or first in the graph ``x`` is an input of."""
    producer = x.producer()
    if producer is not None:
        producer.graph.insert_after(producer, nodes)
    else:
        owner = x.graph or graph
        owner.insert_before(owner[0], nodes)
