"""An ONNX graph as an operator list: shapes for a given batch and sequence length, each node classified.

Shapes come from ONNX Runtime's symbolic shape inference (run once per file: ``batch`` and ``seq`` stay
symbols, e.g. ``4*batch``), evaluated for the requested sizes; ONNX's own inference is the fallback. Linear
nodes are named by :func:`lorapass.onnx.sites.find_sites` (the module paths the rewrite targets); LoRA nodes
of a dynamic rewrite are recognised by their ``<path>.lora_A`` / ``<path>.lora_B`` inputs, those of a multi
rewrite by the Gathers of their ``<path>.lora_A_bank`` / ``<path>.lora_B_bank`` inputs: a bank Gather reads the
slots of the distinct adapters in the batch (``dims`` ``lora_distinct``, default min(batch, slots): every row
another adapter) and writes one slot per row, which the batched LoRA MatMuls read; the rest is classified by
op type:

- QK^T / PV: a MatMul of two activations whose output reaches a Softmax (QK) or whose first input comes from
  one (PV); the values between them are scores ``[..., q, k]``.
- Nodes whose inputs are all constants are folded by ONNX Runtime when the session is created: free.
- Reshape/Squeeze/Unsqueeze/Shape/Identity/Flatten are views: no bytes, one kernel launch.

A decode step of an exported graph without a KV cache is modelled as the graph at ``seq = 1`` with every
score tensor's key axis (and the K and V operands) stretched to the context length: the new token's
projections plus attention over the cached keys, whose reads count as KV-cache bytes.

Tensor-parallel modes come from the graph view (networkx): a linear whose output (after its bias and any
LoRA join) is added to another activation is row-parallel, other linears column-parallel, the output head
vocabulary-parallel; nodes downstream of a column-parallel linear and upstream of a row-parallel one run
inside the split region (``heads``).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import onnx

from lorapass.cost import ops as O
from lorapass.cost.ops import GraphMeta, Op, OpGraph
from lorapass.errors import ModelError, SpecError

_VIEW = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Shape", "Size", "Constant", "Dropout"}
_MEMORY = {"Transpose", "Concat", "Slice", "Expand", "Gather", "GatherND", "GatherElements", "ScatterND",
           "ScatterElements", "Split", "Tile", "Pad", "ConstantOfShape", "Range", "Resize", "DepthToSpace",
           "SpaceToDepth", "Trilu", "CumSum", "NonZero", "TopK"}
_NORMS = {"LayerNormalization": O.LAYERNORM_FLOPS, "SimplifiedLayerNormalization": O.RMSNORM_FLOPS,
          "RMSNormalization": O.RMSNORM_FLOPS, "SkipLayerNormalization": O.LAYERNORM_FLOPS + 1,
          "SkipSimplifiedLayerNormalization": O.RMSNORM_FLOPS + 1, "GroupNormalization": O.LAYERNORM_FLOPS}
_HEAVY_ELEMENTWISE = {"Gelu": O.GELU_FLOPS, "FastGelu": O.GELU_FLOPS, "BiasGelu": O.GELU_FLOPS + 1,
                      "QuickGelu": 4, "Erf": 4, "Tanh": 4, "Sigmoid": 4, "Exp": 2, "Log": 2, "Softplus": 4}
_REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceSumSquare",
           "ArgMax", "ArgMin"}
_SCORE_CHAIN = {"Add", "Mul", "Div", "Sub", "Where", "Cast", "Softmax", "IsNaN", "Dropout", "Max", "Min"}
_COSTED = ("linear", "conv")
"""Site kinds the cost model prices as GEMMs (a convolution as im2col: output positions x in*kernel x out)."""
_LORA = re.compile(r"^(?P<path>.+)\.lora_(?P<kind>A|B)(?:\.weight)?$")
_BANK = re.compile(r"^(?P<path>.+)\.lora_(?P<kind>A|B)_bank$")
DISTINCT = "lora_distinct"
"""``dims`` key: how many distinct adapters a batch of a multi graph uses."""
_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_ELEM_BYTES = {
    onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
    onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2,
    onnx.TensorProto.INT32: 4, onnx.TensorProto.UINT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.UINT64: 8,
    onnx.TensorProto.BOOL: 1, onnx.TensorProto.FLOAT8E4M3FN: 1, onnx.TensorProto.FLOAT8E5M2: 1,
    onnx.TensorProto.INT4: 0.5, onnx.TensorProto.UINT4: 0.5,
}
_DTYPE_NAME = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16",
               onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "int8", onnx.TensorProto.FLOAT8E4M3FN: "fp8",
               onnx.TensorProto.FLOAT8E5M2: "fp8", onnx.TensorProto.INT4: "int4", onnx.TensorProto.UINT4: "int4"}


@dataclass
class _Static:
    """Everything about a file that does not depend on batch and sequence length (computed once)."""

    path: Path
    proto: onnx.ModelProto
    dims: dict[str, list]  # value name -> dims (int or symbolic expression string)
    elem: dict[str, int]  # value name -> ONNX element type
    consts: set[str]  # values ORT knows at session creation
    overridable: set[str]  # initializers that are also graph inputs (LoRA slots): read every run
    sites: dict[str, object]  # node name -> Site
    output_heads: list[str]
    prefix: str
    lora_ranks: dict[str, int]
    symbols: dict[str, str | int]  # symbol -> "batch" | "seq" | "past" | "total", or a fixed size
    kinds: dict[str, str] = field(default_factory=dict)
    modes: dict[str, str] = field(default_factory=dict)
    layers: dict[str, int | None] = field(default_factory=dict)
    lora: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # node -> (kind, paths)
    score_values: set[str] = field(default_factory=set)
    key_axis: dict[tuple[str, int], int] = field(default_factory=dict)  # (node, input index) -> key axis
    unresolved_sites: list[str] = field(default_factory=list)
    blocks: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # packed node -> (module path, rows)
    names: list[str] = field(default_factory=list)  # node names (``#k`` for unnamed nodes), in graph order


def _dims_of(vi: onnx.ValueInfoProto) -> list | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _infer(proto: onnx.ModelProto) -> onnx.ModelProto:
    """ORT's symbolic shape inference (without its habit of saving a file when incomplete); ONNX's as fallback."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inference = SymbolicShapeInference(2**31 - 1, True, False, 0)
        inference._preprocess(proto)
        while inference.run_:
            inference._infer_impl()
        inference._update_output_from_vi()
        return inference.out_mp_
    except Exception:  # noqa: BLE001 - any failure of the tool falls back to ONNX's own inference
        return onnx.shape_inference.infer_shapes(proto, data_prop=True)


@functools.lru_cache(maxsize=4096)
def _expr(text: str):
    import sympy

    expr = sympy.sympify(text, locals={"Max": sympy.Max, "Min": sympy.Min, "floor": sympy.floor,
                                       "ceiling": sympy.ceiling, "Mod": sympy.Mod})
    symbols = sorted(expr.free_symbols, key=lambda s: s.name)
    return [s.name for s in symbols], sympy.lambdify(symbols, expr, "math")


@functools.lru_cache(maxsize=8)
def _static(path: str, mtime: float, prefix: str | None) -> _Static:
    from lorapass.onnx.load import load_model
    from lorapass.onnx.sites import find_sites
    from lorapass.onnx.slots import METADATA_KEY, read_records

    ir_model = load_model(path)
    report = find_sites(ir_model, prefix=prefix)
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{path}: not a readable ONNX model ({exc})") from exc
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    ranks: dict[str, int] = {}
    meta = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY in meta:
        for slot in read_records(meta[METADATA_KEY], path):
            if "r" in slot.record:
                ranks[slot.path] = slot.record["r"]
    # bind the graph inputs' symbolic dims: token inputs give batch/seq, initializer-backed inputs their own shape
    symbols: dict[str, str] = {}
    for inp in graph.input:
        dims = inp.type.tensor_type.shape.dim
        if inp.name in inits:
            for d, v in zip(dims, inits[inp.name].dims):
                d.ClearField("dim_param")
                d.dim_value = v
            continue
        if len(dims) == 2 and inp.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            roles = ("batch", "total" if inp.name == "attention_mask" else "seq")  # a mask spans past + new tokens
            for d, role in zip(dims, roles):
                if d.dim_param:
                    symbols.setdefault(d.dim_param, role)
    _cache_symbols(graph, Path(path), symbols)
    overridable = {i.name for i in graph.input if i.name in inits}
    del graph.value_info[:]
    inferred = _infer(_weights_as_inputs(proto))
    dims: dict[str, list] = {}
    elem: dict[str, int] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        d = _dims_of(vi)
        if d is not None:
            dims[vi.name] = d
        elem[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        dims[init.name] = list(init.dims)
        elem[init.name] = init.data_type
    consts = {i.name for i in graph.initializer if i.name not in overridable}
    for node in graph.node:
        if node.op_type == "Constant" or (node.input and all(i == "" or i in consts for i in node.input)
                                          and node.op_type not in ("RandomNormal", "RandomUniform")):
            consts.update(o for o in node.output if o)
    st = _Static(Path(path), proto, dims, elem, consts, overridable,
                 {node: s for node, s in report.by_node().items() if node and s.kind in _COSTED}, list(report.output_heads), report.prefix, ranks, symbols)
    st.unresolved_sites = list(report.unresolved)
    for site in report.sites:  # a packed node's modules (q/k/v rows of qkv_proj), for LoRA selection and costing
        if site.packed:
            st.blocks.setdefault(site.node, []).append((site.path, site.out_features))
    _classify(st)
    return st


def _cache_symbols(graph: onnx.GraphProto, path: Path, symbols: dict[str, str | int]) -> None:
    """Bind a KV cache input's symbolic dims: [batch, kv_heads, past, head_size]; past is kv_len - q_len, and a
    symbolic head size (the genai builder's ``kv_cache_dim``) comes from genai_config.json beside the model."""
    config = path.parent / "genai_config.json"
    head = None
    if config.is_file():
        try:
            head = int(json.loads(config.read_text())["model"]["decoder"]["head_size"])
        except (ValueError, KeyError, TypeError):
            head = None
    for inp in graph.input:
        dims = inp.type.tensor_type.shape.dim
        if not inp.name.startswith(("past_key_values.", "past_key.", "past_value.")) or len(dims) != 4:
            continue
        if dims[2].dim_param:
            symbols.setdefault(dims[2].dim_param, "past")
        if dims[3].dim_param and head is not None:
            symbols.setdefault(dims[3].dim_param, head)


def _weights_as_inputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for shape inference in which externally stored tensors are typed graph inputs (never read)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    graph = copy.graph
    inputs = {i.name for i in graph.input}
    keep = []
    for init in graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            keep.append(init)
            continue
        if init.name not in inputs:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return copy


def _im2col(op: Op, w: tuple[float, ...], y: tuple[float, ...]) -> None:
    """Price a Conv with kernel ``w`` [out, in/groups, *kernel] writing ``y`` [N, out, *spatial] as its im2col
    GEMM: a row per output position, in/groups * kernel columns in, out columns out."""
    op.tokens = float(np.prod((y[0], *y[2:]), dtype=float))
    op.in_features, op.out_features = int(np.prod(w[1:])), int(w[0])
    op.flops = 2.0 * op.tokens * op.in_features * op.out_features


def _lora_source(name: str, producers: dict[str, onnx.NodeProto]) -> tuple[str, tuple[str, ...]] | None:
    """('A'|'B', paths) when ``name`` is a LoRA weight input, or a Concat/Cast/Identity of such inputs."""
    m = _LORA.match(name)
    if m:
        return m["kind"], (m["path"],)
    node = producers.get(name)
    if node is not None and node.op_type == "Gather" and (m := _BANK.match(node.input[0])):
        return m["kind"], (m["path"],)
    if node is not None and node.op_type in ("Concat", "Cast", "Identity"):
        found = [_lora_source(i, producers) for i in node.input if i]
        if found and all(f is not None for f in found) and len({f[0] for f in found}) == 1:
            return found[0][0], tuple(p for f in found for p in f[1])
    return None


def _layer_of(node: onnx.NodeProto) -> int | None:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            for scope in reversed(_literal(prop.value)):
                m = _LAYER.search(scope)
                if m:
                    return int(m.group(1))
            return -1  # scoped, outside any layer
    return None


def _literal(text: str) -> list[str]:
    import ast

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def _classify(st: _Static) -> None:
    """Kinds, LoRA roles, score paths, layers and tensor-parallel modes: everything shape-independent."""
    nodes = list(st.proto.graph.node)
    producers = {o: n for n in nodes for o in n.output if o}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in nodes:
        for i in n.input:
            if i:
                consumers[i].append(n)
    names = [n.name or f"#{k}" for k, n in enumerate(nodes)]
    name_of = {id(n): name for n, name in zip(nodes, names)}

    # LoRA nodes of a dynamic rewrite
    lora_b_out: dict[str, tuple[str, ...]] = {}
    for name, n in zip(names, nodes):
        if n.op_type in ("MatMul", "Conv") and len(n.input) >= 2:
            src = _lora_source(n.input[1], producers)
            if src is not None:
                st.lora[name] = ("GEMM_LORA_" + src[0], src[1])
                if src[0] == "B":
                    lora_b_out[n.output[0]] = src[1]
        elif n.op_type == "Concat" and n.input and all(_LORA.match(i) for i in n.input if i):
            st.lora[name] = ("LORA_CONCAT", tuple(_LORA.match(i)["path"] for i in n.input if i))
        elif n.op_type == "Gather" and (m := _BANK.match(n.input[0])):
            st.lora[name] = (O.GATHER_LORA + "_" + m["kind"], (m["path"],))
    for name, n in zip(names, nodes):
        if n.op_type == "Reshape" and n.input[0] in lora_b_out:  # a multi delta given the site's shape
            lora_b_out[n.output[0]] = lora_b_out[n.input[0]]
        elif n.op_type == "Add" and any(i in lora_b_out for i in n.input):
            st.lora[name] = (O.LORA_ADD, lora_b_out[next(i for i in n.input if i in lora_b_out)])

    # attention: QK feeds a Softmax through element-wise ops, PV reads from one
    def dynamic(v: str) -> bool:
        return v not in st.consts

    for n in nodes:
        if n.op_type != "Softmax":
            continue
        chain = {n.output[0]}
        # backwards to the QK MatMul
        frontier, qk = [n.input[0]], None
        seen = set()
        while frontier:
            v = frontier.pop()
            if v in seen:
                continue
            seen.add(v)
            p = producers.get(v)
            if p is None:
                continue
            if p.op_type in ("MatMul", "FusedMatMul") and all(dynamic(i) for i in p.input[:2]):
                qk = p
                chain.add(v)
                break
            if p.op_type in _SCORE_CHAIN:
                chain.add(v)
                frontier.extend(i for i in p.input if i and dynamic(i) and len(st.dims.get(i) or []) >= 2)
        # forwards to the PV MatMul
        frontier, av = [n.output[0]], None
        while frontier:
            v = frontier.pop()
            for c in consumers.get(v, []):
                if c.op_type in ("MatMul", "FusedMatMul") and c.input[0] == v:
                    av = c
                elif c.op_type in _SCORE_CHAIN:
                    chain.add(c.output[0])
                    frontier.append(c.output[0])
        if qk is None or av is None:
            continue
        st.kinds[name_of[id(qk)]] = O.ATTN_QK
        st.kinds[name_of[id(av)]] = O.ATTN_AV
        st.key_axis[(name_of[id(qk)], 1)] = -1
        st.key_axis[(name_of[id(av)], 1)] = -2
        st.score_values |= chain

    # layers: the exporter's scopes, else the site path, else the previous node's
    current: int | None = None
    started = False
    for name, n in zip(names, nodes):
        layer = _layer_of(n)
        site = st.sites.get(n.name)
        path = site.path if site is not None else (st.lora[name][1][0] if name in st.lora else None)
        if layer is None and path is not None:
            m = _LAYER.search(path)
            layer = int(m.group(1)) if m else -1
        if layer is None:
            layer = current if started else -1
        if layer is not None and layer >= 0:
            current, started = layer, True
        st.layers[name] = None if layer is None or layer < 0 else layer

    # tensor-parallel modes from the graph view
    g = nx.DiGraph()
    g.add_nodes_from(names)
    for name, n in zip(names, nodes):
        for i in n.input:
            p = producers.get(i)
            if p is not None:
                g.add_edge(name_of[id(p)], name)
    site_nodes = {n.name: s for n in nodes if (s := st.sites.get(n.name)) is not None and n.name not in st.lora
                  and s.kind == "linear"}  # convolutions stay replicated
    heads = set(st.output_heads)

    def joins_residual(site) -> bool:
        value = site.output
        for _ in range(4):
            users = consumers.get(value, [])
            adds = [u for u in users if u.op_type == "Add"]
            lora_adds = [u for u in adds if (u.name in st.lora)]
            if lora_adds:
                value = lora_adds[0].output[0]
                continue
            for u in adds:
                other = [i for i in u.input if i != value]
                if other and dynamic(other[0]) and other[0] not in lora_b_out:
                    return True
            return False
        return False

    rows, cols = set(), set()
    by_input: dict[str, list] = defaultdict(list)
    for s in site_nodes.values():
        by_input[s.input].append(s)
    for name, s in site_nodes.items():
        if s.path in heads:
            st.modes[name] = "vocab"
        elif joins_residual(s):
            st.modes[name] = "row"
            rows.add(name)
        else:
            siblings = by_input[s.input]
            widest = max(x.out_features for x in siblings)
            st.modes[name] = "kv_col" if len(siblings) >= 3 and s.out_features < widest else "col"
            cols.add(name)
    if rows and cols:
        forward = g.subgraph([v for v in g if v not in rows]).copy()
        forward.add_node("__src__")
        forward.add_edges_from(("__src__", c) for c in cols)
        down = nx.descendants(forward, "__src__")
        backward = g.subgraph([v for v in g if v not in cols]).copy()
        backward.add_node("__dst__")
        backward.add_edges_from((r, "__dst__") for r in rows)
        up = nx.ancestors(backward, "__dst__")
        for name in (down & up) - rows - cols:
            st.modes.setdefault(name, "heads")
    for name, n in zip(names, nodes):
        if n.op_type == "Gather" and n.input and n.input[0] in st.consts and len(st.dims.get(n.input[0], [])) == 2:
            st.kinds[name] = O.EMBEDDING
            st.modes[name] = "embed" if not st.modes.get(name) else st.modes[name]
    st.names = names


def _site_mode_for_lora(st: _Static, kind: str, paths: tuple[str, ...]) -> str:
    from lorapass.cost.lora import _A_MODE, _ADD_MODE, _B_MODE

    base = {s.path: st.modes.get(node, "replicated") for node, s in st.sites.items()}
    mode = base.get(paths[0], "replicated")
    table = {"GEMM_LORA_A": _A_MODE, "GEMM_LORA_B": _B_MODE, O.LORA_ADD: _ADD_MODE, O.GATHER_LORA + "_A": _A_MODE,
             O.GATHER_LORA + "_B": _B_MODE}.get(kind)
    if table is None:
        return "partial"
    return table.get(mode, "replicated")


def load_onnx_graph(path: str | os.PathLike, batch: int, q_len: int, kv_len: float | None = None, *,
                    prefix: str | None = None, dims: dict[str, int] | None = None,
                    kv_dtype: str | None = None) -> OpGraph:
    """The operators of ``path`` run on ``batch`` sequences of ``q_len`` tokens over ``kv_len`` keys.

    ``kv_len`` defaults to ``q_len`` (prefill); ``q_len = 1`` with a larger ``kv_len`` is a decode step.
    ``dims`` binds any other symbolic input dimension. SpecError names the dims nothing binds.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such ONNX file")
    st = _static(str(path), path.stat().st_mtime, prefix)
    kv_len = float(q_len if kv_len is None else kv_len)
    env: dict[str, float] = {}
    sizes = {"batch": batch, "seq": q_len, "past": int(kv_len) - q_len, "total": int(kv_len)}
    for sym, role in st.symbols.items():
        env[sym] = role if isinstance(role, int) else sizes[role]
    env.update(dims or {})
    missing: set[str] = set()

    @functools.lru_cache(maxsize=None)
    def shape(value: str) -> tuple[float, ...] | None:
        d = st.dims.get(value)
        if d is None:
            return None
        out = []
        for x in d:
            if isinstance(x, int):
                out.append(x)
                continue
            if x is None:
                return None
            try:
                names, fn = _expr(x)
            except Exception:  # noqa: BLE001
                return None
            unknown = [n for n in names if n not in env]
            if unknown:
                missing.update(unknown)
                return None
            out.append(int(fn(*(env[n] for n in names))))
        return tuple(out)

    decode = q_len == 1 and kv_len != 1

    def nbytes(value: str, key_axis: int | None = None) -> float:
        s = shape(value)
        if s is None:
            return 0.0
        s = list(s)
        if decode:
            if key_axis is None and value in st.score_values and s:
                key_axis = -1
            if key_axis is not None and len(s) >= 2:
                s[key_axis] = kv_len
        return float(np.prod(s, dtype=float)) * _ELEM_BYTES.get(st.elem.get(value, 1), 4)

    def elements(value: str) -> float:
        s = shape(value)
        if s is None:
            return 0.0
        s = list(s)
        if decode and value in st.score_values and s:
            s[-1] = kv_len
        return float(np.prod(s, dtype=float))

    nodes = list(st.proto.graph.node)
    ops: list[Op] = []
    tensors: dict[str, float] = {}
    weight_dtypes: dict[str, float] = defaultdict(float)
    for name, n in zip(st.names, nodes):
        ins = [i for i in n.input if i]
        outs = [o for o in n.output if o]
        layer = st.layers.get(name)
        mode = st.modes.get(name, "replicated")
        if outs and all(o in st.consts for o in outs):
            ops.append(Op(name, O.SHAPE, layer=layer, tp=mode, inputs=tuple(ins), outputs=tuple(outs),
                          onnx_op=n.op_type, launches=0))
            continue
        w_in = sum(nbytes(i) for i in ins if i in st.consts)
        w_over = sum(nbytes(i) for i in ins if i in st.overridable)
        a_in = sum(nbytes(i, st.key_axis.get((name, k))) for k, i in enumerate(n.input)
                   if i and i not in st.consts and i not in st.overridable)
        a_out = sum(nbytes(o) for o in outs)
        for o in outs:
            tensors[o] = nbytes(o)
        op = Op(name, O.ELEMENTWISE, weight_bytes=w_in + w_over, param_bytes=w_in, act_in=a_in, act_out=a_out,
                layer=layer, tp=mode, inputs=tuple(ins), outputs=tuple(outs), onnx_op=n.op_type)
        site = st.sites.get(n.name)
        if name not in st.lora and ("/lora_A/" in name or "/lora_B/" in name or "/lora/" in name):
            op.paths = (name.split("/lora")[0],)
            op.param_bytes = w_over
            if n.op_type in _VIEW or n.op_type == "Shape":
                op.param_bytes = 0.0
                op.kind, op.weight_bytes, op.act_in, op.act_out = O.SHAPE, 0.0, 0.0, 0.0
            elif n.op_type in _MEMORY:
                op.kind = O.MEMORY
        elif name in st.lora:
            kind, paths = st.lora[name]
            op.paths = paths
            op.path = paths[0] if len(paths) == 1 else f"{paths[0]}+{len(paths) - 1}"
            op.tp = _site_mode_for_lora(st, kind, paths)
            op.param_bytes = w_over
            if kind == "LORA_CONCAT":
                op.kind = O.MEMORY
            elif kind.startswith(O.GATHER_LORA):
                bank = shape(n.input[0])
                slots = bank[0] if bank else 1
                op.kind = O.GATHER_LORA
                op.weight_bytes = nbytes(n.input[0]) * min((dims or {}).get(DISTINCT, batch), slots) / slots
            elif kind == O.LORA_ADD:
                op.kind, op.flops = O.LORA_ADD, elements(outs[0])
            elif n.op_type == "Conv":  # LoCon: a kernel-shaped A [r, in, kh, kw], a 1x1 B [out, r, 1, 1]
                op.kind = kind
                w, y = shape(n.input[1]), shape(outs[0])
                if w and y:
                    _im2col(op, w, y)
                    op.rank = op.out_features if kind == O.GEMM_LORA_A else op.in_features
            else:
                op.kind = kind
                a, b = shape(n.input[0]), shape(n.input[1])
                if a and b:
                    op.tokens = float(np.prod(a[:-1], dtype=float))
                    op.in_features, op.out_features = int(b[-2]), int(b[-1])
                    op.rank = op.out_features if kind == O.GEMM_LORA_A else op.in_features
                    op.flops = 2.0 * op.tokens * b[-2] * b[-1]
        elif site is not None and site.kind == "conv":  # as im2col: a GEMM per output position
            op.kind, op.path = O.GEMM, site.path
            op.in_features, op.out_features = site.in_features * int(np.prod(site.kernel)), site.out_features
            y = shape(outs[0])
            if y:
                _im2col(op, (site.out_features, site.in_features, *site.kernel), y)
            weight_dtypes[st.elem.get(site.weight, 1)] += op.in_features * op.out_features
        elif site is not None:
            op.kind, op.path = O.GEMM, site.path
            a = shape(site.input)
            op.tokens = float(np.prod(a[:-1], dtype=float)) if a else 0.0
            op.in_features, op.out_features = site.in_features, site.out_features
            op.flops = 2.0 * op.tokens * site.in_features * site.out_features
            op.blocks = tuple(st.blocks.get(n.name, ()))
            op.reduce = mode == "row"
            weight_dtypes[st.elem.get(site.weight, 1)] += site.in_features * site.out_features
        elif st.kinds.get(name) in (O.ATTN_QK, O.ATTN_AV):
            op.kind = st.kinds[name]
            a, b = shape(n.input[0]), shape(n.input[1])
            if a and b:
                a, b = list(a), list(b)
                if decode:
                    if op.kind == O.ATTN_QK:
                        b[-1] = kv_len
                    else:
                        a[-1], b[-2] = kv_len, kv_len
                batch_dims = float(np.prod(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])), dtype=float))
                op.flops = 2.0 * batch_dims * a[-2] * a[-1] * b[-1]
                op.tokens = float(np.prod(a[:-3], dtype=float) * a[-2]) if len(a) >= 3 else a[-2]
            kv_input = n.input[1]
            if decode:  # K/V come from the cache
                op.kv_bytes = nbytes(kv_input, st.key_axis.get((name, 1)))
                op.act_in -= op.kv_bytes
        elif n.op_type in ("MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "MatMulNBits"):
            op.kind = O.GEMM
            a, b = shape(n.input[0]), shape(n.input[1])
            if a and b and len(b) >= 2:
                batch_dims = float(np.prod(a[:-2], dtype=float)) if len(a) > 2 else 1.0
                rows = a[-2] if len(a) >= 2 else 1
                op.flops = 2.0 * batch_dims * rows * a[-1] * b[-1]
        elif n.op_type == "Conv":  # a convolution lorapass does not adapt (grouped, ...): its im2col GEMM
            op.kind = O.GEMM
            w, y = shape(n.input[1]), shape(outs[0]) if outs else None
            if w and y:
                _im2col(op, w, y)
        elif n.op_type == "ConvTranspose":  # each input element scatters into out/groups * kernel outputs
            op.kind = O.GEMM
            w, x = shape(n.input[1]), shape(n.input[0])
            if w and x:
                op.flops = 2.0 * float(np.prod(w[1:], dtype=float)) * float(np.prod(x, dtype=float))
        elif st.kinds.get(name) == O.EMBEDDING:
            op.kind = O.EMBEDDING
            op.weight_bytes = a_out  # the rows read
            op.param_bytes = w_in
            op.reduce = op.tp == "embed"
        elif n.op_type in ("Softmax", "LogSoftmax"):
            op.kind, op.flops = O.SOFTMAX, O.SOFTMAX_FLOPS * elements(outs[0])
        elif n.op_type in _NORMS:
            op.kind, op.flops = O.NORM, _NORMS[n.op_type] * elements(outs[0])
        elif n.op_type in _VIEW:
            op.kind, op.weight_bytes, op.act_in, op.act_out = O.SHAPE, 0.0, 0.0, 0.0
        elif n.op_type in _MEMORY:
            op.kind = O.MEMORY
        elif n.op_type in _REDUCE:
            op.flops = sum(elements(i) for i in ins if i not in st.consts)
        elif n.op_type in ("Attention", "MultiHeadAttention", "GroupQueryAttention"):
            op.kind = O.ATTENTION
            q = shape(n.input[0])
            k = shape(n.input[1]) if len(n.input) > 1 and n.input[1] else q
            if q and k:
                op.flops = 4.0 * q[0] * q[1] * (kv_len if decode else k[1]) * q[-1]
        else:
            op.flops = elements(outs[0]) * _HEAVY_ELEMENTWISE.get(n.op_type, 1) if outs else 0.0
        ops.append(op)
    if missing:
        raise SpecError(f"{path}: symbolic dimension(s) {sorted(missing)} are not bound; "
                        f"pass them as dims (--dims NAME=VALUE)")
    meta = _meta(st, ops, path, batch, q_len, kv_len, weight_dtypes, kv_dtype)
    return OpGraph(ops, meta, tensors)


def _meta(st: _Static, ops: list[Op], path: Path, batch: int, q_len: int, kv_len: float,
          weight_dtypes: dict[int, float], kv_dtype: str | None) -> GraphMeta:
    dtype = "fp32"
    if weight_dtypes:
        dtype = _DTYPE_NAME.get(max(weight_dtypes, key=weight_dtypes.get), "fp32")
    heads, head_dim = 1, 0
    for name, n in zip(st.names, st.proto.graph.node):
        if st.kinds.get(name) == O.ATTN_QK:
            d = st.dims.get(n.input[0]) or []
            if len(d) == 4 and isinstance(d[1], int) and isinstance(d[3], int):
                heads, head_dim = d[1], d[3]
            break
    kv_heads = heads
    fused = None if head_dim else _fused_attention_heads(st)
    if fused is not None:  # a fused attention op (the genai builder's GroupQueryAttention) names its heads
        heads, kv_heads, head_dim = fused
    layers = sorted({op.layer for op in ops if op.layer is not None})
    hidden = 0
    sites = [s for s in st.sites.values() if s.kind == "linear"]
    if sites:
        hidden = max((s.in_features for s in sites), key=[s.in_features for s in sites].count)
    if head_dim and fused is None:
        narrow = [s.out_features for s in sites if st.modes.get(s.node) == "kv_col"]
        if narrow:
            kv_heads = max(1, min(narrow) // head_dim)
    vocab = max((s.out_features for s in sites if s.path in st.output_heads), default=0)
    return GraphMeta(name=path.stem, source=str(path), num_layers=len(layers), hidden_size=hidden, num_heads=heads,
                     num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab, dtype=dtype,
                     kv_dtype=kv_dtype or dtype, causal=True, output_heads=tuple(st.output_heads), batch=batch,
                     q_len=q_len, kv_len=kv_len)


def _fused_attention_heads(st: _Static) -> tuple[int, int, int] | None:
    """(heads, kv heads, head size) from the first fused attention node's ``num_heads`` / ``kv_num_heads`` and its
    query width (q, k and v packed in the query input when the key input is empty)."""
    for n in st.proto.graph.node:
        if n.op_type not in ("GroupQueryAttention", "MultiHeadAttention") or not n.input:
            continue
        attrs = {a.name: a.i for a in n.attribute if a.type == onnx.AttributeProto.INT}
        heads = attrs.get("num_heads", 0)
        kv = attrs.get("kv_num_heads", heads)
        width = (st.dims.get(n.input[0]) or [None])[-1]
        if not heads or not isinstance(width, int):
            return None
        packed = len(n.input) < 2 or not n.input[1]
        return heads, kv, width // (heads + 2 * kv) if packed else width // heads
    return None


def has_lora(graph: OpGraph) -> bool:
    """Whether the graph already holds LoRA operators (a dynamic rewrite)."""
    return any(op.kind in O.LORA_CLASSES for op in graph.ops)

