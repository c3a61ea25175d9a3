"""Strategy ``dynamic`` on an fx graph: a LoRA branch of real graph nodes beside each targeted linear.

For a site at module path ``p`` (traced as ``<prefix>.p``) reading ``x`` and producing ``y``::

    y' = aten.add(y, aten.matmul(aten.matmul(x, <prefix>.p.lora_A), <prefix>.p.lora_B))

``lora_A`` [in, r] and ``lora_B`` [r, out] are new buffers of the program (placeholders of an
ExportedProgram, ``get_attr`` of a GraphModule) holding exactly what the ONNX dynamic strategy stores
(:class:`lorapass.onnx.slots.LinearSlot`: PEFT's A transposed, PEFT's B transposed with the scale
alpha/r or alpha/sqrt(r) folded in, zeros without an adapter), in the weight's dtype. Folding the scale
into B keeps one weight contract for every frontend: ONNX Runtime adapter files carry no alpha. No module
is swapped: the graph gains nodes and state, the model's own modules and weights are untouched.

A module called several times gets one pair of buffers and one branch per call.
"""

from __future__ import annotations

import torch

from lorapass.fx.program import Program, aten
from lorapass.fx.sites import full_path
from lorapass.onnx.slots import METADATA_KEY, LinearSlot
from lorapass.onnx.sites import SiteReport
from lorapass.plan import Target


def _matmul(x: torch.fx.Node):
    val = x.meta.get("val")
    return aten.mm.default if isinstance(val, torch.Tensor) and val.dim() == 2 else aten.matmul.default


def insert_lora(program: Program, report: SiteReport, targets: list[Target]) -> dict[str, tuple[str, str]]:
    """Add a LoRA branch for every target; returns path -> (A state key, B state key) in the program.

    The ``lorapass.lora`` records are stored in the graph module's ``meta`` under ``METADATA_KEY``.
    """
    nodes = {n.name: n for n in program.graph.nodes}
    slots: dict[str, tuple[torch.fx.Node, torch.fx.Node]] = {}
    keys: dict[str, tuple[str, str]] = {}
    records = []
    for target in targets:
        site = target.site
        if site.path not in slots:
            weight = program.tensor(site.weight)
            slot = LinearSlot.for_target(target)
            values = slot.values(target.module)
            a, b = values[slot.record["lora_A"]], values[slot.record["lora_B"]]
            full = full_path(report, site.path)
            keys[site.path] = (f"{full}.lora_A", f"{full}.lora_B")
            slots[site.path] = tuple(
                program.add(key, torch.from_numpy(array).to(device=weight.device, dtype=weight.dtype))
                for key, array in zip(keys[site.path], (a, b)))
            records.append(slot.record)
        a_node, b_node = slots[site.path]
        y, x = nodes[site.output], nodes[site.input]
        down = program.call(_matmul(x), (x, a_node), after=y, like=y)
        up = program.call(_matmul(down), (down, b_node), after=down, like=y)
        joined = program.call(aten.add.Tensor, (y, up), after=up, like=y)
        y.replace_all_uses_with(joined, delete_user_cb=lambda user, keep=joined: user is not keep)
    program.module.meta[METADATA_KEY] = records
    return keys
