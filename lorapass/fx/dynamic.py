"""Strategy ``dynamic`` on an fx graph: a LoRA branch of real graph nodes beside each targeted linear or embedding.

For a site at module path ``p`` (traced as ``<prefix>.p``) reading ``x`` and producing ``y``::

    y' = aten.add(y, aten.matmul(aten.matmul(x, <prefix>.p.lora_A), <prefix>.p.lora_B))

(an embedding gathers rows of ``lora_A`` by the ids instead of the first matmul; DoRA computes
``(y_no_bias + branch) * <prefix>.p.dora_factor + bias``, the site's bias split out of its linear; a LoRA bias is
added to the branch). The inputs are new buffers of the program (placeholders of an ExportedProgram, ``get_attr``
of a GraphModule) holding exactly what the ONNX dynamic strategy stores (:mod:`lorapass.onnx.slots`: PEFT's A
transposed, PEFT's B transposed with the scale alpha/r or alpha/sqrt(r) folded in, DoRA's factor computed from
the weight; neutral values without an adapter), in the weight's dtype. Folding the scale into B keeps one
weight contract for every frontend: ONNX Runtime adapter files carry no alpha. No module is swapped: the graph
gains nodes and state, the model's own modules and weights are untouched. Replaced modules and trainable
tokens are refused by name (the ONNX pass applies them).

A module called several times gets one set of buffers and one branch per call.
"""

from __future__ import annotations

import numpy as np
import torch

from lorapass.fx.program import Program, aten
from lorapass.fx.sites import ADDMM, full_path
from lorapass.onnx.dynamic import slots_for
from lorapass.onnx.slots import METADATA_KEY
from lorapass.onnx.sites import SiteReport
from lorapass.plan import Target


def _matmul(x: torch.fx.Node):
    val = x.meta.get("val")
    return aten.mm.default if isinstance(val, torch.Tensor) and val.dim() == 2 else aten.matmul.default


class _Weights:
    """The program's weights in torch's layout, for slot values that depend on them (DoRA's factor)."""

    def __init__(self, program: Program, targets: list[Target]) -> None:
        self.program, self.sites = program, {t.site.path: t.site for t in targets}


    def site(self, path: str) -> np.ndarray:
        return self.sites[path].storage.read()

    def tensor(self, name: str) -> np.ndarray:
        return self.program.tensor(name).detach().to(torch.float32).cpu().numpy()


def _split_bias(program: Program, y: torch.fx.Node) -> torch.fx.Node | None:
    """Take the bias out of the linear ``y`` (``linear(x, w, b)`` -> ``linear(x, w)``, ``addmm`` -> ``mm``); returns
    the bias node, or None when there is none."""
    if y.target in ADDMM:
        bias, x, w = y.args[:3]
        y.target, y.args = aten.mm.default, (x, w)
        return bias
    if y.target == aten.linear.default and len(y.args) > 2 and y.args[2] is not None:
        bias = y.args[2]
        y.args = y.args[:2]
        return bias
    return None


def insert_lora(program: Program, report: SiteReport, targets: list[Target]) -> dict[str, dict[str, str]]:
    """Add a LoRA branch for every target; returns path -> {slot input name: state key in the program}.

    The ``lorapass.lora`` records are stored in the graph module's ``meta`` under ``METADATA_KEY``.
    """
    nodes = {n.name: n for n in program.graph.nodes}
    weights = _Weights(program, targets)
    state: dict[str, dict[str, torch.fx.Node]] = {}
    keys: dict[str, dict[str, str]] = {}
    records = []
    for target in targets:
        site = target.site
        slot, = slots_for([target])  # one low-rank slot: lorapass.fx.api refuses the other kinds
        if site.path not in state:
            weight = program.tensor(site.weight)
            values = slot.values(target.module, weights)
            full = full_path(report, site.path)
            keys[site.path] = {spec.name: full + spec.name[len(site.path):] for spec in slot.inputs()}
            state[site.path] = {spec.role: program.add(keys[site.path][spec.name], torch.from_numpy(
                np.ascontiguousarray(values[spec.name])).to(device=weight.device, dtype=weight.dtype)) for spec in slot.inputs()}
            records.append(slot.record)
        inputs = state[site.path]
        y, x = nodes[site.output], nodes[site.input]
        if site.kind == "embedding":
            down = program.call(aten.embedding.default, (inputs["lora_A"], x), after=y, like=y)
        else:
            down = program.call(_matmul(x), (x, inputs["lora_A"]), after=y, like=y)
        delta = program.call(_matmul(down), (down, inputs["lora_B"]), after=down, like=y)
        if "lora_bias" in inputs:
            delta = program.call(aten.add.Tensor, (delta, inputs["lora_bias"]), after=delta, like=y)
        summed = program.call(aten.add.Tensor, (y, delta), after=delta, like=y)
        joined = summed
        if "dora_factor" in inputs:
            bias = _split_bias(program, y)
            joined = program.call(aten.mul.Tensor, (summed, inputs["dora_factor"]), after=summed, like=y)
            if bias is not None:
                joined = program.call(aten.add.Tensor, (joined, bias), after=joined, like=y)
        y.replace_all_uses_with(joined, delete_user_cb=lambda user, keep=summed: user is not keep)
    program.module.meta[METADATA_KEY] = records
    return keys
