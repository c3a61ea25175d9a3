"""Strategy ``merge`` on an fx graph: each targeted parameter becomes its kind's merged weight (W + scale·B·A, DoRA,
embedding LoRA, trainable token rows), in its own layout and dtype, from the adapter's replacement of it where it
has one (``modules_to_save``, a saved embedding); a site's bias becomes its replacement (``bias="all"`` /
``"lora_only"``) plus, times the scale, a LoRA bias (PEFT's ``lora_bias``).

The graph keeps its shape; only state changes. A weight read only by its own site is replaced under its own
name (a new tensor: the traced model's parameters are never written). One that other nodes also read (a
weight shared between modules, or with non-site readers) is copied: the site gets a new parameter
``<path>.weight`` (made unique) and the others keep the original. A site without a bias gets one, a new
parameter ``<path>.bias``, when it is an ``aten.linear`` with a LoRA bias (PEFT's own merge refuses that case;
its unmerged output is the reference); other bias-less forms, and a bias other nodes also read, are refused by
name.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch.fx import Node

from lorapass.errors import UnsupportedError
from lorapass.fx.program import PASS_WEIGHT, Program, aten
from lorapass.fx.sites import ADDMM, full_path
from lorapass.onnx.sites import SiteReport
from lorapass.plan import Target


_WEIGHT_PARTS = frozenset({"low_rank", "weight", "tokens"})


def merged(weight: torch.Tensor, target: Target) -> torch.Tensor:
    """The target's merged weight in ``weight``'s own layout and dtype: its kind computes W' in float32, torch's
    layout, from W or the adapter's replacement of W (W + s·B·A, DoRA's rescale, an embedding table's s·(B·A)ᵀ,
    token rows)."""
    site, module = target.site, target.module
    base = module.replacement(site, "weight")
    w = site.storage.read() if base is None else base.reshape(site.storage.shape).astype(np.float32)
    new = torch.from_numpy(np.ascontiguousarray(module.merged(w)))
    new = new if target.site.layout == "out_in" else new.T
    return new.to(device=weight.device, dtype=weight.dtype).contiguous()


def _holders(program: Program) -> dict[str, list[Node]]:
    """State key -> the nodes reading it directly: placeholders, get_attr, and call_module of its owner module
    (keyed ``<module>.weight``, as its sites name their weight)."""
    out: dict[str, list[Node]] = defaultdict(list)
    for node in program.graph.nodes:
        if (target := program.target(node)) is not None:
            out[target].append(node)
        elif node.op == "call_module":
            out[f"{node.target}.weight"].append(node)
    return out


def _readers(program: Program, holders: list[Node]) -> set[Node]:
    out: set[Node] = set()
    for node in holders:
        out |= {node} if node.op == "call_module" else program.readers(node)
    return out


def merge(program: Program, report: SiteReport, targets: list[Target]) -> int:
    """Fold every target's update into its weight; returns how many weights changed."""
    nodes = {n.name: n for n in program.graph.nodes}
    by_weight: dict[str, list[Target]] = defaultdict(list)
    for target in targets:
        if target.module.parts(target.site) & _WEIGHT_PARTS:
            by_weight[target.site.weight].append(target)
    holders_of = _holders(program)
    changed = 0
    for weight, group in by_weight.items():
        holders = holders_of[weight]
        group_nodes = {nodes[t.site.node] for t in group}
        tensor = program.tensor(weight)
        if len({t.site.path for t in group}) == 1 and _readers(program, holders) <= group_nodes:
            program.replace(weight, merged(tensor, group[0]))
            changed += 1
            continue
        for target in group:  # copy-on-write: the site reads its own merged copy
            node = nodes[target.site.node]
            if node.op == "call_module":
                raise UnsupportedError(f"site {target.site.path!r}: its weight {weight!r} is also read outside the "
                                       "module; trace with torch.export (example inputs) to merge it")
            name = _unique(program, f"{full_path(report, target.site.path)}.weight")
            fresh = program.add(name, merged(tensor, target), parameter=True)
            _rewire_weight(program, node, fresh)
            changed += 1
    for target in targets:
        changed += _merge_bias(program, report, target, nodes[target.site.node], holders_of)
    return changed


def _merge_bias(program: Program, report: SiteReport, target: Target, node: Node,
                holders_of: dict[str, list[Node]]) -> int:
    """Give the target's site its new bias: the adapter's replacement of it (else its own) plus the scaled LoRA
    bias (made if the site is a bias-less linear); returns 1 if it did, 0 when the module changes no bias."""
    module, site = target.module, target.site
    replaced, bias = module.replacement(site, "bias"), module.lora_bias()
    if replaced is None and bias is None:
        return 0
    key = module.key("lora_bias" if bias is not None else "bias")
    delta = torch.from_numpy(np.ascontiguousarray(0 if bias is None else bias, np.float32))
    if site.bias is not None:
        if not _readers(program, holders_of.get(site.bias, [])) <= {node}:
            raise UnsupportedError(f"{module.source}: {key} changes the bias {site.bias!r} of site "
                                   f"{site.path!r}, which other nodes also read; apply it to the ONNX export")
        old = program.tensor(site.bias)
        start = old.float() if replaced is None else torch.from_numpy(np.ascontiguousarray(replaced, np.float32))
        program.replace(site.bias, (start.reshape(old.shape).to(old.device) + delta.to(old.device)).to(old.dtype))
        return 1
    if node.op != "call_function" or node.target != aten.linear.default or len(node.args) != 2:
        raise UnsupportedError(f"{module.source}: {key} needs a bias at site {site.path!r} ({node.target}), "
                               "which has none to add it to; apply it to the ONNX export (lorapass rewrite)")
    weight = program.tensor(site.weight)  # a replaced bias needs a biased site (Kind.check): only the LoRA bias here
    fresh = program.add(_unique(program, f"{full_path(report, site.path)}.bias"),
                        delta.to(device=weight.device, dtype=weight.dtype), parameter=True)
    node.args = (*node.args, fresh)
    return 1


def _rewire_weight(program: Program, node: Node, fresh: Node) -> None:
    """Make ``node`` read ``fresh`` where it read the shared weight, replaying any transposes in between."""
    index = 2 if node.target in ADDMM else 0 if node.target == aten.embedding.default else 1
    chain, current = [], node.args[index]
    while isinstance(current, Node) and current.op == "call_function" and current.target in PASS_WEIGHT:
        chain.append(current)
        current = current.args[0]
    value = fresh
    for step in reversed(chain):
        value = program.call(step.target, (value, *step.args[1:]), before=node, like=step)
    args, old = list(node.args), node.args[index]
    args[index] = value
    node.args = tuple(args)
    program.erase_if_unused(old)


def _unique(program: Program, name: str) -> str:
    candidate, i = name, 1
    while program.has(candidate):
        candidate, i = f"{name}_{i}", i + 1
    return candidate
