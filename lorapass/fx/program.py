"""One fx graph to rewrite, whatever holds its weights: the state layer merge and dynamic share.

Two forms reach the pass:

* an ``ExportedProgram`` (torch.export): weights are *lifted*, i.e. placeholders the graph signature maps
  to state-dict keys (``m.model.layers.0.self_attn.q_proj.weight``);
* a plain ``GraphModule`` (``torch.fx.symbolic_trace`` or ``ExportedProgram.module()``): weights are
  ``get_attr`` nodes, or parameters of the ``call_module`` leaves symbolic_trace keeps.

:class:`Program` copies its input first (graph and module tree; tensors are shared, never written), then
offers reading a weight, replacing it with a new tensor, adding a named tensor with a node that reads it,
and ``finish()`` giving back the same form it was given. The input is never modified.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    TensorArgument,
)
from torch.fx import GraphModule, Node

from lorapass.errors import ModelError

Graphable = ExportedProgram | GraphModule


def _fake_mode(graph: torch.fx.Graph):
    from torch._guards import detect_fake_mode

    vals = [n.meta["val"] for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    return detect_fake_mode(vals) if vals else None


class Program:
    """A private, writable copy of an ExportedProgram or GraphModule."""

    def __init__(self, source: Graphable) -> None:
        self.exported = isinstance(source, ExportedProgram)
        if self.exported:
            self._source = source
            self.module = torch.fx.GraphModule(source.graph_module, copy.deepcopy(source.graph))
            self.module.meta.update(source.graph_module.meta)
            self.state: dict[str, torch.Tensor] = dict(source.state_dict)
            self.specs: list[InputSpec] = list(source.graph_signature.input_specs)
            self._by_name = {s.arg.name: s for s in self.specs if isinstance(s.arg, TensorArgument)}
        elif isinstance(source, GraphModule):
            # share every parameter and buffer (never written in place), copy modules and graph
            shared = itertools.chain(source.named_parameters(remove_duplicate=False),
                                     source.named_buffers(remove_duplicate=False))
            self.module = copy.deepcopy(source, memo={id(t): t for _, t in shared})
        else:
            raise ModelError(f"expected an ExportedProgram or a torch.fx.GraphModule, got {type(source).__name__}")
        self.graph = self.module.graph
        self.fake_mode = _fake_mode(self.graph)
        self._last_attr: Node | None = None  # new get_attr nodes go in order, before the first computation

    # --- reading -------------------------------------------------------------------------------------
    def target(self, node: object) -> str | None:
        """The state key of the parameter or buffer ``node`` reads, or None when it is computed."""
        if not isinstance(node, Node):
            return None
        if self.exported:
            if node.op != "placeholder":
                return None
            spec = self._spec(node.name)
            if spec is not None and spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target in self.state:
                return spec.target
            return None
        if node.op == "get_attr":
            value = _resolve(self.module, node.target)
            return node.target if isinstance(value, torch.Tensor) else None
        return None

    def tensor(self, target: str) -> torch.Tensor:
        if self.exported:
            return self.state[target]
        value = _resolve(self.module, target)
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"{target!r} is not a tensor of the graph module")
        return value

    def has(self, target: str) -> bool:
        if self.exported:
            return target in self.state or any(s.target == target for s in self.specs)
        try:
            _resolve(self.module, target)
        except AttributeError:
            return False
        return True

    def readers(self, node: Node) -> set[Node]:
        """The nodes computing with ``node``, seeing through transposes and aliases (how weights are read)."""
        out: set[Node] = set()
        for user in node.users:
            if user.op == "call_function" and user.target in PASS_WEIGHT and user.args and user.args[0] is node:
                out |= self.readers(user)
            else:
                out.add(user)
        return out

    # --- writing -------------------------------------------------------------------------------------
    def replace(self, target: str, tensor: torch.Tensor) -> None:
        """Point ``target`` at ``tensor`` (a Parameter stays a Parameter); the old tensor is left untouched."""
        old = self.tensor(target)
        if isinstance(old, torch.nn.Parameter):
            tensor = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
        if self.exported:
            self.state[target] = tensor
        else:
            _assign(self.module, target, tensor)

    def add(self, target: str, tensor: torch.Tensor, parameter: bool = False) -> Node:
        """A new state tensor at ``target`` (a buffer, or a parameter) and the node that reads it."""
        if self.has(target):
            raise ModelError(f"cannot add {target!r}: the graph already has state by that name")
        if parameter:
            tensor = torch.nn.Parameter(tensor, requires_grad=False)
        if self.exported:
            # state placeholders precede the user inputs, in the order of the signature's input specs
            name = ("p_" if parameter else "b_") + target.replace(".", "_")
            index = next((i for i, s in enumerate(self.specs) if s.kind == InputKind.USER_INPUT), len(self.specs))
            placeholders = {n.name: n for n in self.graph.nodes if n.op == "placeholder"}
            anchor = placeholders.get(getattr(self.specs[index].arg, "name", "")) if index < len(self.specs) else None
            if anchor is not None:
                with self.graph.inserting_before(anchor):
                    node = self.graph.placeholder(name)
            else:
                node = self._append_placeholder(name)
            kind = InputKind.PARAMETER if parameter else InputKind.BUFFER
            spec = InputSpec(kind, TensorArgument(node.name), target, persistent=None if parameter else True)
            self.specs.insert(index, spec)
            self._by_name[node.name] = spec
            self.state[target] = tensor
        else:
            _assign(self.module, target, tensor)
            if self._last_attr is not None:
                where = self.graph.inserting_after(self._last_attr)
            else:
                where = self.graph.inserting_before(next((n for n in self.graph.nodes if n.op != "placeholder"), None))
            with where:
                node = self._last_attr = self.graph.get_attr(target)
        if self.fake_mode is not None:
            node.meta["val"] = self.fake_mode.from_tensor(tensor, static_shapes=True)
        return node

    def call(self, op, args: tuple, *, after: Node | None = None, before: Node | None = None,
             like: Node | None = None) -> Node:
        """``op(*args)`` inserted right after ``after`` (or before ``before``), with a fake value when the graph
        carries them and ``like``'s provenance (stack trace; not the module stack: the new node belongs to no
        module, so no frontend, fx or ONNX (name scopes), takes it for a linear layer of the model)."""
        where = self.graph.inserting_after(after) if after is not None else self.graph.inserting_before(before)
        with where:
            node = self.graph.call_function(op, args)
        if like is not None:
            for key in ("stack_trace", "from_node"):
                if key in like.meta:
                    node.meta[key] = copy.copy(like.meta[key])
        if self.fake_mode is not None:
            vals = [a.meta.get("val") if isinstance(a, Node) else a for a in args]
            if all(v is not None for v in vals):
                with self.fake_mode:
                    node.meta["val"] = op(*vals)
        return node

    def erase_if_unused(self, node: object) -> None:
        """Remove ``node`` and the weight-passing ops feeding it once nothing reads them."""
        while isinstance(node, Node) and node.op == "call_function" and node.target in PASS_WEIGHT and not node.users:
            source = node.args[0]
            self.graph.erase_node(node)
            node = source

    def finish(self) -> Graphable:
        """The rewritten program, in the form it was given."""
        self.graph.lint()
        if not self.exported:
            self.module.recompile()
            return self.module
        source = self._source
        self.module.recompile()
        signature = ExportGraphSignature(input_specs=self.specs, output_specs=self._output_specs())
        return ExportedProgram(
            root=self.module,
            graph=self.module.graph,
            graph_signature=signature,
            state_dict=self.state,
            range_constraints=copy.deepcopy(source.range_constraints),
            module_call_graph=copy.deepcopy(source.module_call_graph),
            example_inputs=source.example_inputs,
            constants=dict(source.constants),
            verifiers=source.verifiers,
        )

    # --- internals -----------------------------------------------------------------------------------
    def _output_specs(self) -> list:
        """The source's output specs, renamed where a rewritten value now feeds the output."""
        output = next(n for n in self.graph.nodes if n.op == "output")
        values = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
        specs = []
        for spec, value in zip(self._source.graph_signature.output_specs, values):
            if isinstance(spec.arg, TensorArgument) and isinstance(value, Node):
                spec = dataclasses.replace(spec, arg=TensorArgument(value.name))
            specs.append(spec)
        return specs

    def _spec(self, name: str) -> InputSpec | None:
        return self._by_name.get(name)

    def _append_placeholder(self, name: str) -> Node:
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        anchor = placeholders[-1] if placeholders else None
        if anchor is None:
            with self.graph.inserting_before(next(iter(self.graph.nodes), None)):
                return self.graph.placeholder(name)
        with self.graph.inserting_after(anchor):
            return self.graph.placeholder(name)


aten = torch.ops.aten
PASS_WEIGHT = {aten.t.default, aten.permute.default, aten.transpose.int, aten.alias.default, aten.detach.default,
               aten.numpy_T.default, aten.expand.default, aten.view.default, aten._unsafe_view.default,
               aten.reshape.default}
"""Ops a weight passes through on its way to its matmul: transposes (flip the layout), aliases, and the
expand + view a decomposed ``matmul`` uses to broadcast it to a ``bmm`` operand."""


def _resolve(root: torch.nn.Module, target: str) -> object:
    value: object = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _assign(root: torch.nn.Module, target: str, tensor: torch.Tensor) -> None:
    """Set ``root.<target>`` (creating plain container modules on the way), as a parameter or buffer."""
    *parents, field = target.split(".")
    module = root
    for part in parents:
        child = getattr(module, part, None)
        if child is None:
            child = torch.nn.Module()
            module.add_module(part, child)
        elif not isinstance(child, torch.nn.Module):
            raise ModelError(f"cannot place {target!r}: {part!r} is not a module")
        module = child
    if isinstance(tensor, torch.nn.Parameter):
        module._buffers.pop(field, None)
        module.register_parameter(field, tensor)
    else:
        module._parameters.pop(field, None)
        module.register_buffer(field, tensor)
