"""After torch.onnx.export of a ``dynamic`` program: give its LoRA weights the ONNX dynamic contract.

torch.onnx.export turns the program's ``<prefix>.<path>.lora_A``/``lora_B`` (and ``dora_factor``, ``lora_bias``)
buffers into initializers named by their state keys, with the rank fixed. This step makes each one what
``lorapass rewrite --strategy dynamic`` produces (:mod:`lorapass.onnx.dynamic`): a graph input named as its slot
names it (``<path>.lora_A`` [in, ``<path>.r``], ``<path>.lora_B`` [``<path>.r``, out] with B pre-scaled, ...) whose
initializer is its default, plus the ``lorapass.lora`` metadata, so ONNX Runtime adapter files and ``RunOptions.add_active_adapter`` work the
same on both. The rank is made symbolic on the down-projection's output too, so a run may feed any rank.
"""

from __future__ import annotations

import json

import onnx_ir as ir

from lorapass.errors import UnsupportedError
from lorapass.onnx.slots import METADATA_KEY, from_record


def promote_lora_inputs(model: ir.Model, records: list[dict], slots: dict[str, dict[str, str]]) -> int:
    """Rename, reshape and expose every slot initializer as an overridable graph input; returns how many slots.

    ``records`` are the fx pass's ``lorapass.lora`` records, ``slots`` its path -> {input name: state key}."""
    graph = model.graph
    taken = {v.name for v in graph.inputs} | {v.name for n in graph for v in n.outputs}
    for record in records:
        slot = from_record(record)
        for spec in slot.inputs():
            key, name = slots[slot.path][spec.name], spec.name
            value = graph.initializers.get(key)
            if value is None:
                raise UnsupportedError(f"torch.onnx.export did not keep the LoRA weight {key!r} as an initializer "
                                       f"(folded or deduplicated); cannot expose it as the input {name!r}")
            if value.is_graph_input() or (name != key and (name in taken or name in graph.initializers)):
                raise UnsupportedError(f"cannot expose {key!r} as graph input {name!r}: the name is already used")
            value.name = name
            value.shape = ir.Shape(list(spec.dims))
            graph.inputs.append(value)
        _symbolic_rank(graph.initializers[record["lora_A"]], record["r"], f"{slot.path}.r")
    model.metadata_props[METADATA_KEY] = json.dumps(records)
    return len(records)


def _symbolic_rank(a: ir.Value, r: int, rank: str) -> None:
    """The exporter recorded the down projection (x @ A) with the rank as a number: make it ``rank``."""
    for node in a.consumers():
        for out in node.outputs:
            if out.shape is not None and len(out.shape) and out.shape[-1] == r:
                out.shape = ir.Shape([*list(out.shape)[:-1], rank])
