"""Strategies that name a linear node by its torch module path, each from one kind of evidence.

- ``name_scopes``: the dynamo exporter's node metadata ``pkg.torch.onnx.name_scopes``.
- ``parameter``: an initializer named after the torch parameter (``<path>.weight`` / ``<path>.bias``),
  directly or through the constant folder's ``pkg.onnxscript.optimizer.folded_from`` record.
- ``node_name``: TorchScript-style node names ``/model/layers.0/self_attn/q_proj/MatMul``.

Each returns a path (with any wrapper prefix still on it) or None; none guesses.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable

import onnx_ir as ir

NAME_SCOPES = "pkg.torch.onnx.name_scopes"
CLASS_HIERARCHY = "pkg.torch.onnx.class_hierarchy"
FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"

_PARAM = re.compile(r"^(?P<path>.+)\.(weight|bias)$")


def _literal_list(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def module_class(node: ir.Node) -> str | None:
    """The class of the innermost module the dynamo exporter recorded for ``node``, if any."""
    classes = _literal_list(node.metadata_props.get(CLASS_HIERARCHY))
    return classes[-2] if len(classes) >= 2 else None


def from_name_scopes(node: ir.Node, weight: ir.Value, bias: ir.Value | None) -> str | None:
    """The innermost module scope: the scopes end with the fx node's own name, the module comes before it."""
    scopes = _literal_list(node.metadata_props.get(NAME_SCOPES))
    return scopes[-2] if len(scopes) >= 2 and scopes[-2] else None


def _parameter_path(value: ir.Value | None, kind: str) -> str | None:
    # a tensor several nodes read (tied, or deduplicated by the exporter) names only one of them
    if value is None or len(value.consumers()) != 1:
        return None
    names = [value.name or ""]
    names += _literal_list(value.metadata_props.get(FOLDED_FROM))
    for name in names:
        match = _PARAM.match(name)
        if match and name.endswith("." + kind):
            return match.group("path")
    return None


def from_parameter(node: ir.Node, weight: ir.Value, bias: ir.Value | None) -> str | None:
    """``<path>.weight`` on the weight (or its folded source), else ``<path>.bias`` on the bias."""
    return _parameter_path(weight, "weight") or _parameter_path(bias, "bias")


def from_node_name(node: ir.Node, weight: ir.Value, bias: ir.Value | None) -> str | None:
    """``/a/b.0/c/MatMul`` -> ``a.b.0.c``: scope components joined by dots, the op name dropped."""
    name = node.name or ""
    if not name.startswith("/"):
        return None
    parts = [p for p in name.split("/") if p]
    return ".".join(parts[:-1]) or None


Strategy = Callable[[ir.Node, ir.Value, "ir.Value | None"], "str | None"]

STRATEGIES: dict[str, Strategy] = {
    "name_scopes": from_name_scopes,
    "parameter": from_parameter,
    "node_name": from_node_name,
}


def learn_scope_map(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Heads TorchScript node names drop, learnt from sites named both ways.

    TorchScript names skip some module scopes (``/m/decoder/...`` for ``m.model.decoder...``). For each
    (node-name path, parameter path) pair that share a tail of components, the differing heads map onto
    each other; such a map is applied only where it was learnt from evidence.
    """
    mapping: dict[str, str] = {}
    conflicts: set[str] = set()
    for node_path, param_path in pairs:
        a, b = node_path.split("."), param_path.split(".")
        common = 0
        while common < min(len(a), len(b)) and a[-1 - common] == b[-1 - common]:
            common += 1
        if common == 0 or a == b:
            continue
        # keep the first shared component in the head, so the map only fires below that scope
        head_a = ".".join(a[: len(a) - common + 1])
        head_b = ".".join(b[: len(b) - common + 1])
        if mapping.setdefault(head_a, head_b) != head_b:
            conflicts.add(head_a)
    return {k: v for k, v in mapping.items() if k not in conflicts}


def apply_scope_map(path: str, mapping: dict[str, str]) -> str:
    """Rewrite the longest learnt head of ``path``."""
    for head in sorted(mapping, key=len, reverse=True):
        if path == head or path.startswith(head + "."):
            return mapping[head] + path[len(head):]
    return path
