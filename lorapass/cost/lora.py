"""LoRA on an operator graph: which sites the rules select, and what each strategy adds.

Selection calls the same :class:`~lorapass.rules.RuleSet` ``select(paths, output_heads)`` the ONNX rewrite
calls, on the module paths of the graph's linear and convolution operators (``all-linear`` skips the
convolutions, as in the rewrite), so the cost model targets exactly the sites a rewrite of that graph would. A
convolution is priced as its im2col GEMM (output positions x in*kh*kw x out), and so is its LoCon pair: A a
kernel-shaped conv to r channels, B a 1x1 conv.

- ``dynamic``: per targeted site a GEMM_LORA_A (2·t·in·r), a GEMM_LORA_B (2·t·r·out) and the ADD that joins
  the base output (t·out), every run; with DoRA (``use_dora``) one more per-output multiply (t·out) by the
  precomputed factor. As in the rewrite (``fuse_shared_inputs``), sites reading the same
  activation (q/k/v, gate/up) share one A product over their concatenated ranks. The scale is folded into B.
- ``merge``: nothing per token; once per site a MERGE of 2·r·in·out FLOPs that reads W, A and B and writes W
  (DoRA: + 3·in·out for the per-row norm and rescale).

Tensor parallelism (the layout of Punica/vLLM and S-LoRA's observation that the LoRA output can ride the base
model's reduction): at a column-parallel site A [r, in] is replicated and B is split on the output like W, so
x·A is computed whole and x·A·B lands in the device's own output shard; at a row-parallel site A is split on
its input like W and B is replicated, so the partial x_i·A_i·B is added to the base partial sum *before* the
all-reduce. Neither needs a collective of its own.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from lorapass.cost import ops as O
from lorapass.cost.hw import DTYPE_BYTES
from lorapass.cost.ops import Op, OpGraph

_A_MODE = {"col": "partial", "kv_col": "partial", "vocab": "partial", "row": "row"}
_B_MODE = {"col": "col", "kv_col": "kv_col", "vocab": "vocab", "row": "partial"}
_ADD_MODE = {"col": "heads", "kv_col": "kv_heads", "vocab": "heads", "row": "partial"}


def as_ruleset(rules: Any) -> Any:
    """A RuleSet from a LoraRule or RuleSet (anything with ``select(paths, output_heads)`` passes through)."""
    from lorapass.rules import LoraRule, RuleSet

    if isinstance(rules, LoraRule):
        return RuleSet(rules=[rules])
    return rules


class FileSelection:
    """A single-file adapter (kohya / LyCORIS / diffusers) as cost rules: the modules its file binds to the
    graph's site paths (as the rewrite binds them), each with its own rank and alpha."""

    def __init__(self, adapter: Any, component: str | None = None) -> None:
        self.adapter, self.component = adapter, component
        self.binding = None  # the last binding's KeyReport: which modules matched which sites

    @property
    def strategy(self) -> str:
        """The adapter's own rule's strategy (what ``--strategy`` overrides)."""
        return self.adapter.rule.strategy

    def select(self, paths, output_heads=()) -> dict[str, tuple[Any, Any]]:
        from lorapass.errors import RuleError
        from lorapass.formats.names import bind
        from lorapass.rules import LoraParams

        bound = bind(self.adapter, list(paths), self.component)
        self.binding = bound.binding
        chosen = {path: (bound.rule, LoraParams(r=m.r, alpha=m.alpha, scale=m.scale))
                  for path, m in bound.modules.items() if m.targeted}
        if not chosen:
            raise RuleError(f"{self.adapter.source}: none of its modules matches a linear or convolution of the graph")
        return {path: chosen[path] for path in paths if path in chosen}


def select(graph: OpGraph, rules: Any) -> dict[str, tuple[Any, Any]]:
    """Targeted module path -> (rule, LoraParams), exactly as ``RuleSet.select`` resolves it for these sites."""
    ruleset = as_ruleset(rules)
    convs = [op.path for op in graph.ops if op.kind == O.GEMM and op.path and op.onnx_op == "Conv"]
    return ruleset.select(graph.linear_paths(), [*graph.meta.output_heads, *convs])  # all-linear: linears only


def _fuse(rule: Any) -> bool:
    return bool(getattr(rule, "fuse_shared_inputs", False))


def apply_dynamic(graph: OpGraph, selection: dict[str, tuple[Any, Any]]) -> OpGraph:
    """A copy of ``graph`` with the LoRA operators of every selected site inserted after its base linear."""
    e = DTYPE_BYTES[graph.meta.dtype]
    sites = [op for op in graph.ops if op.kind == O.GEMM and op.path in selection and not op.blocks]
    groups: dict[str, list[Op]] = defaultdict(list)
    for op in sites:
        if _fuse(selection[op.path][0]):
            groups[op.inputs[0] if op.inputs else op.name].append(op)
    fused_first: dict[str, list[Op]] = {}  # first member's op name -> the group
    fused_tag: dict[str, str] = {}  # member op name -> the fused A's tag
    for members in groups.values():
        if len({m.path for m in members}) >= 2:
            fused_first[members[0].name] = members
            for m in members:
                fused_tag[m.name] = f"{members[0].path}+{len(members) - 1}"

    out: list[Op] = []
    tensors = dict(graph.tensors)
    for op in graph.ops:
        out.append(op)
        if op.kind == O.GEMM and op.blocks:
            out += _packed_branch(op, selection, e, tensors)
            continue
        if op.kind != O.GEMM or op.path not in selection:
            continue
        t = op.tokens
        r = selection[op.path][1].r
        if op.name in fused_first:
            members = fused_first[op.name]
            ranks = sum(selection[m.path][1].r for m in members)
            tag = fused_tag[op.name]
            modes = {_A_MODE.get(m.tp, "replicated") for m in members}
            a = O.gemm(f"{tag}.lora_A", tag, t, op.in_features, ranks, e, layer=op.layer,
                       tp=modes.pop() if len(modes) == 1 else "partial", inputs=op.inputs,
                       outputs=(f"{tag}.lora_A.out",), kind=O.GEMM_LORA_A, rank=ranks)
            a.paths = tuple(m.path for m in members)
            out.append(a)
            tensors[a.outputs[0]] = a.act_out
        if op.name in fused_tag:
            down = f"{fused_tag[op.name]}.lora_A.out"
        else:
            a = O.gemm(f"{op.path}.lora_A", op.path, t, op.in_features, r, e, layer=op.layer,
                       tp=_A_MODE.get(op.tp, "replicated"), inputs=op.inputs, outputs=(f"{op.path}.lora_A.out",),
                       kind=O.GEMM_LORA_A, rank=r)
            a.paths = (op.path,)
            out.append(a)
            tensors[a.outputs[0]] = a.act_out
            down = a.outputs[0]
        b = O.gemm(f"{op.path}.lora_B", op.path, t, r, op.out_features, e, layer=op.layer,
                   tp=_B_MODE.get(op.tp, "replicated"), inputs=(down,), outputs=(f"{op.path}.lora_B.out",),
                   kind=O.GEMM_LORA_B, rank=r)
        b.act_in = t * r * e  # the site's own r columns of x·A
        b.paths = (op.path,)
        out.append(b)
        add = O.elementwise(f"{op.path}.lora_add", t * op.out_features, e, n_inputs=2, kind=O.LORA_ADD,
                            layer=op.layer, tp=_ADD_MODE.get(op.tp, "replicated"),
                            inputs=(op.outputs[0], b.outputs[0]), outputs=(f"{op.path}.lora.out",))
        add.path, add.paths = op.path, (op.path,)
        out.append(add)
        tensors[b.outputs[0]] = b.act_out
        tensors[add.outputs[0]] = add.act_out
        if _dora(selection[op.path][0]):  # g ⊙ (y + x·A·B): one more per-output multiply, g [out] read once
            mul = O.elementwise(f"{op.path}.dora_mul", t * op.out_features, e, n_inputs=1, kind=O.LORA_ADD,
                                layer=op.layer, tp=_ADD_MODE.get(op.tp, "replicated"), inputs=add.outputs,
                                outputs=(f"{op.path}.dora.out",), weight=op.out_features * e)
            mul.path, mul.paths = op.path, (op.path,)
            out.append(mul)
            tensors[mul.outputs[0]] = mul.act_out
    return OpGraph(out, graph.meta, tensors)


def _packed_branch(op: Op, selection: dict[str, tuple[Any, Any]], e: float, tensors: dict[str, float]) -> list[Op]:
    """The packed slot of a packed weight's targeted modules, as the rewrite builds it: one A of their summed rank,
    one B [sum r, all rows] (block-structured, run dense), one ADD and, with DoRA, one per-row multiply."""
    parts = [(path, selection[path]) for path, _ in op.blocks if path in selection]
    if not parts:
        return []
    paths = tuple(path for path, _ in parts)
    r = sum(params.r for _, (_, params) in parts)
    t = op.tokens
    a = O.gemm(f"{op.path}.lora_A", op.path, t, op.in_features, r, e, layer=op.layer, tp=_A_MODE.get(op.tp, "replicated"),
               inputs=op.inputs, outputs=(f"{op.path}.lora_A.out",), kind=O.GEMM_LORA_A, rank=r)
    b = O.gemm(f"{op.path}.lora_B", op.path, t, r, op.out_features, e, layer=op.layer,
               tp=_B_MODE.get(op.tp, "replicated"), inputs=a.outputs, outputs=(f"{op.path}.lora_B.out",),
               kind=O.GEMM_LORA_B, rank=r)
    add = O.elementwise(f"{op.path}.lora_add", t * op.out_features, e, n_inputs=2, kind=O.LORA_ADD, layer=op.layer,
                        tp=_ADD_MODE.get(op.tp, "replicated"), inputs=(op.outputs[0] if op.outputs else op.name,
                                                                       b.outputs[0]), outputs=(f"{op.path}.lora.out",))
    out = [a, b, add]
    if any(_dora(rule) for _, (rule, _) in parts):
        out.append(O.elementwise(f"{op.path}.dora_mul", t * op.out_features, e, n_inputs=1, kind=O.LORA_ADD,
                                 layer=op.layer, tp=_ADD_MODE.get(op.tp, "replicated"), inputs=add.outputs,
                                 outputs=(f"{op.path}.dora.out",), weight=op.out_features * e))
    for x in out:
        x.path, x.paths = op.path, paths
        tensors[x.outputs[0]] = x.act_out
    return out


def _dora(rule: Any) -> bool:
    return bool(getattr(rule, "use_dora", False))


def merge_ops(graph: OpGraph, selection: dict[str, tuple[Any, Any]]) -> list[Op]:
    """The one-time merge W += scale·(B @ A) of every selected site: 2·r·in·out FLOPs, W read and written.
    DoRA adds the norm of W + s·B·A per output row and the rescale (3·in·out FLOPs, W still read and written once)."""
    e = DTYPE_BYTES[graph.meta.dtype]
    seen: set[str] = set()
    out = []
    for op in graph.ops:
        if op.kind != O.GEMM:
            continue
        for path, rows in op.sites():  # a packed weight: each module's delta into its own rows
            if path not in selection or path in seen:
                continue
            seen.add(path)
            rule, params = selection[path]
            w = op.in_features * rows * e
            lora = params.r * (op.in_features + rows) * e
            norm = 3.0 * op.in_features * rows if _dora(rule) else 0.0
            out.append(Op(f"{path}.merge", O.MERGE, flops=2.0 * params.r * op.in_features * rows + norm,
                          weight_bytes=2 * w + lora, path=path, layer=op.layer,
                          tp=op.tp if op.tp in _A_MODE else "replicated",
                          in_features=op.in_features, out_features=rows, rank=params.r))
    return out


def adapter_bytes(graph: OpGraph, selection: dict[str, tuple[Any, Any]]) -> float:
    """Bytes of all A and B matrices of the selected sites (in the graph's weight dtype), and DoRA's factors."""
    e = DTYPE_BYTES[graph.meta.dtype]
    seen: dict[str, float] = {}
    for op in graph.ops:
        if op.kind != O.GEMM:
            continue
        for path, rows in op.sites():
            if path in selection:
                rule, params = selection[path]
                seen[path] = (params.r * (op.in_features + rows) + rows * _dora(rule)) * e
    return sum(seen.values())
