"""How a site's weight is stored: read it as float32 in torch's layout, record edits, write them back once.

A :class:`Store` is one stored weight (an initializer; a quantized blob with its scales is another kind of
store). A :class:`View` is what one site sees of it through one node: all of it, or a row block of a packed
weight. Strategies only use a view's verbs — ``shape``, ``read()``, ``add(up, down)``, ``update(fn)`` — in torch's
layout ([out, in] for a linear, [out, in, kh, kw] for a conv, [rows, dim] for an embedding table), and
:func:`commit` writes every edited store once, lazily (the value is computed when the writer streams it):

- in place when every node reading the store is an edited one and all of them saw the same edits (a weight of
  one module, a packed q/k/v weight, one weight read by both branches of an ``If``);
- otherwise as a new initializer per editing node, in the layout that node reads, so the other readers (a tied
  embedding, a tensor the exporter deduplicated) keep the original.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lorapass.errors import ModelError
from lorapass.onnx.fold import FoldedTensor, read
from lorapass.onnx.loss import Loss, measure
from lorapass.onnx.save import REPLACES

_SEE_THROUGH = {"Identity", "Transpose"}


@dataclass(frozen=True)
class LowRank:
    """An additive update ``up @ down`` (float32, scale folded in); ``down`` is [r, prod(shape[1:])]."""

    up: np.ndarray
    down: np.ndarray

    def __call__(self, w: np.ndarray) -> np.ndarray:
        return w + (self.up @ self.down).reshape(w.shape)


Op = LowRank | Callable[[np.ndarray], np.ndarray]


@dataclass
class Edit:
    rows: slice
    path: str  # the module the edit came from: readers that saw the same (rows, path) list share one result
    op: Op


def readers(value: ir.Value) -> set[ir.Node]:
    """The nodes that compute with ``value``, seeing through Identity/Transpose (how exporters pass weights)."""
    out: set[ir.Node] = set()
    for node in value.consumers():
        if node.op_type in _SEE_THROUGH and node.domain in ("", "ai.onnx"):
            out |= readers(node.outputs[0])
        else:
            out.add(node)
    return out


class Store(ABC):
    """One stored weight; subclasses say how it is laid out and encoded.

    A ``lossy`` store cannot hold every float weight (a quantized one): its :meth:`roundtrip` is what a written
    weight reads back as, and each write records in ``losses`` how much of each site's delta it kept."""

    lossy: ClassVar[bool] = False

    def __init__(self, name: str, shape: tuple[int, ...], dtype: str) -> None:
        self.name, self.shape, self.dtype = name, shape, dtype
        self.edits: dict[ir.Node, list[Edit]] = {}
        self.losses: list[Loss] = []

    @abstractmethod
    def readers(self) -> set[ir.Node]:
        """Every node computing with this weight."""

    @abstractmethod
    def read(self) -> np.ndarray:
        """The whole weight as float32 in torch's layout."""

    @abstractmethod
    def write(self, compute: Callable[[], np.ndarray], low_rank: LowRank | None) -> None:
        """Replace the stored weight in place by ``compute()`` (float32, torch layout), computed lazily.

        ``low_rank``, when given, is the whole edit as one additive update, for a fast path that never
        materialises the float32 weight."""

    @abstractmethod
    def write_copy(self, graph: ir.Graph, node: ir.Node, compute: Callable[[], np.ndarray], name: str) -> None:
        """Give ``node`` its own new weight ``compute()``; the stored one stays for the other readers."""

    def describe(self) -> str:
        return type(self).__name__

    def roundtrip(self, w: np.ndarray) -> np.ndarray:
        """What the store reads back as after writing ``w`` (float32, torch layout); lossless stores hold ``w``."""
        return w

    def identity(self) -> tuple:
        """Stores with equal identities are one weight (discovery keeps one store per weight, so that the sites
        of several nodes reading it, such as both branches of an ``If``, edit it together)."""
        return (id(self),)


@dataclass
class View:
    """What one site sees of a store through ``node``: ``rows`` of it (all rows unless packed)."""

    store: Store
    node: ir.Node
    path: str = ""
    rows: slice = field(default_factory=lambda: slice(None))

    @property
    def shape(self) -> tuple[int, ...]:
        start, stop, _ = self.rows.indices(self.store.shape[0])
        return (stop - start, *self.store.shape[1:])

    @property
    def dtype(self) -> str:
        return self.store.dtype

    @property
    def stores(self) -> list[Store]:
        """The stores this view edits (one, or several for a module split over several weights)."""
        return [self.store]

    def read(self) -> np.ndarray:
        """The site's weight as float32 in torch's layout (the base value: edits are applied at commit)."""
        return self.store.read()[self.rows]

    def add(self, up: np.ndarray, down: np.ndarray) -> None:
        """Record ``W += up @ down``: up [rows, r], down [r, prod(shape[1:])], float32, scale folded in."""
        rows = self.shape[0]
        if up.shape[0] != rows or down.shape[1] != int(np.prod(self.shape[1:])) or up.shape[1] != down.shape[0]:
            raise ValueError(f"{self.store.name}: update {up.shape} @ {down.shape} does not fit {self.shape}")
        self._record(LowRank(np.ascontiguousarray(up, np.float32), np.ascontiguousarray(down, np.float32)))

    def update(self, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        """Record ``W = fn(W)`` on the site's rows (float32, torch layout, applied after earlier edits)."""
        self._record(fn)

    def _record(self, op: Op) -> None:
        self.store.edits.setdefault(self.node, []).append(Edit(self.rows, self.path, op))

    def describe(self) -> str:
        if self.rows == slice(None):
            return self.store.describe()
        start, stop, _ = self.rows.indices(self.store.shape[0])
        return f"rows {start}:{stop} of {self.store.describe()}"


class Joined:
    """A module whose rows an exporter stored in several weights (Phi-3's ``qkv_proj`` split into q/k/v nodes):
    the views of its parts stacked by rows, with a view's verbs. ``add`` gives each part its rows of ``up`` (the
    same ``down``); ``update(fn)`` gives each part its rows of ``fn`` applied to the whole module."""

    def __init__(self, parts: list[View]) -> None:
        self.parts = parts
        self.ops: list[Op] = []
        self._states: dict[int, np.ndarray] = {}

    @property
    def node(self) -> ir.Node:
        return self.parts[0].node

    @property
    def path(self) -> str:
        return self.parts[0].path

    @path.setter
    def path(self, value: str) -> None:
        for part in self.parts:
            part.path = value

    @property
    def rows(self) -> list[int]:
        """Rows of each part, in order."""
        return [part.shape[0] for part in self.parts]

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(self.rows), *self.parts[0].shape[1:])

    @property
    def dtype(self) -> str:
        return self.parts[0].dtype

    @property
    def stores(self) -> list[Store]:
        return [store for part in self.parts for store in part.stores]

    def read(self) -> np.ndarray:
        return np.concatenate([part.read() for part in self.parts], axis=0)

    def _blocks(self) -> list[slice]:
        bounds = np.cumsum([0] + self.rows)
        return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def add(self, up: np.ndarray, down: np.ndarray) -> None:
        if up.shape[0] != self.shape[0]:
            raise ValueError(f"{self.describe()}: update {up.shape} @ {down.shape} does not fit {self.shape}")
        self.ops.append(LowRank(np.asarray(up, np.float32), np.asarray(down, np.float32)))
        for part, block in zip(self.parts, self._blocks()):
            part.add(up[block], down)

    def update(self, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self.ops.append(fn)
        step = len(self.ops)
        for part, block in zip(self.parts, self._blocks()):
            part.update(lambda _w, block=block: self._state(step)[block])

    def _state(self, step: int) -> np.ndarray:
        """The whole module after its first ``step`` edits (float32, computed once)."""
        if step not in self._states:
            w = self.read()
            for op in self.ops[:step]:
                w = op(w)
            self._states[step] = w
        return self._states[step]

    def describe(self) -> str:
        return ", ".join(part.describe() for part in self.parts)


def _apply(store: Store, edits: list[Edit]) -> np.ndarray:
    w = store.read()
    for edit in edits:
        w[edit.rows] = edit.op(w[edit.rows])
    return w


def _as_low_rank(store: Store, edits: list[Edit]) -> LowRank | None:
    """All edits as one additive update (row blocks padded with zeros), or None if any is not additive."""
    if not all(isinstance(e.op, LowRank) for e in edits):
        return None
    if len(edits) == 1 and edits[0].rows == slice(None):
        return edits[0].op
    rank = sum(e.op.up.shape[1] for e in edits)
    up = np.zeros((store.shape[0], rank), np.float32)
    at = 0
    for e in edits:
        r = e.op.up.shape[1]
        up[e.rows, at:at + r] = e.op.up
        at += r
    return LowRank(up, np.concatenate([e.op.down for e in edits], axis=0))


def _losses(store: Store, edits: list[Edit], w: np.ndarray) -> list[Loss]:
    return measure(store.name, edits, store.read(), w, store.roundtrip(w))


def _merged(store: Store, edits: list[Edit]) -> Callable[[], np.ndarray]:
    """The weight after ``edits``, computed when written; a lossy store records what the write keeps."""
    def compute() -> np.ndarray:
        w = _apply(store, edits)
        if store.lossy:
            store.losses += _losses(store, edits, w)
        return w

    return compute


def dry_run(stores: list[Store]) -> list[Loss]:
    """What writing the lossy stores' pending edits would keep, without writing (the edits are dropped)."""
    out = []
    for store in stores:
        if store.lossy:
            for edits in store.edits.values():
                out += _losses(store, edits, _apply(store, edits))
        store.edits.clear()
    return out


def commit(stores: list[Store], graph: ir.Graph) -> int:
    """Write every edited store once (in place, or copied for each editing node); returns the weights written."""
    written = 0
    for store in stores:
        if not store.edits:
            continue
        lists = list(store.edits.values())
        signature = [(e.rows, e.path) for e in lists[0]]
        shared = store.readers() <= set(store.edits) and all([(e.rows, e.path) for e in el] == signature for el in lists)
        if shared:
            edits = lists[0]
            store.write(_merged(store, edits), _as_low_rank(store, edits))
            written += 1
        else:
            for node, edits in store.edits.items():
                path = edits[0].path or store.name
                store.write_copy(graph, node, _merged(store, edits), unique_name(graph, f"{path}.weight"))
                written += 1
        store.edits.clear()
    return written


def unique_name(graph: ir.Graph, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``, ... whichever no initializer or graph input of ``graph`` has yet."""
    taken = set(graph.initializers) | {v.name for v in graph.inputs}
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    return candidate


class Plain(Store):
    """A float initializer holding a weight, as [in, out] (``in_out``: MatMul, Gemm transB=0, GPT-2 Conv1D) or in
    torch's own layout (``out_in``: Gemm transB=1, a Transpose before MatMul, Conv kernels, embedding tables)."""

    def __init__(self, value: ir.Value, layout: str) -> None:
        shape = tuple(int(d) for d in value.const_value.shape)
        torch_shape = (shape[1], shape[0]) if layout == "in_out" else shape
        super().__init__(value.name or "", torch_shape, value.const_value.dtype.name.lower())
        self.value, self.layout = value, layout
        self.tensor = value.const_value  # the base values, whatever the value holds after a write

    def readers(self) -> set[ir.Node]:
        return readers(self.value)

    def describe(self) -> str:
        return self.layout

    def identity(self) -> tuple:
        return (type(self), id(self.value), self.layout)

    def _native(self) -> np.ndarray:
        return read(self.tensor)

    def read(self) -> np.ndarray:
        w = self._native().astype(np.float32)
        return np.ascontiguousarray(w.T) if self.layout == "in_out" else w

    def _encode(self, w: np.ndarray, layout: str, modules: str = "") -> np.ndarray:
        """float32 torch layout -> this weight's dtype in ``layout`` (round to nearest even); ModelError naming
        the weight when a merged value leaves the dtype's range (a float16 weight and a huge alpha) where the
        base value was finite."""
        with np.errstate(over="ignore"):  # checked just below
            out = w.astype(self._native_dtype())
        bad = ~np.isfinite(out)
        if bad.any() and np.isfinite(self.read()[bad]).any():
            dtype = self._native_dtype()
            raise ModelError(f"{modules or self.name}: the merged weight reaches {float(np.abs(w).max()):.4g}, "
                             f"beyond {dtype.name}'s range (max {float(_finfo(dtype).max):.4g}); lower the adapter's "
                             "weight (PATH:WEIGHT) or alpha, or use --strategy dynamic")
        return np.ascontiguousarray(out.T if layout == "in_out" else out)

    def _native_dtype(self) -> np.dtype:
        return np.dtype(self.tensor.dtype.numpy())

    def write(self, compute: Callable[[], np.ndarray], low_rank: LowRank | None) -> None:
        original = self.tensor
        name = self.value.name
        modules = self._modules()

        def operands() -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # W + left @ right, flattened to 2-D
            flat = (low_rank.up, low_rank.down)
            left, right = flat if self.layout == "out_in" else (flat[1].T.copy(), flat[0].T.copy())
            w = self._native()
            return w.reshape(w.shape[0], -1), left, right

        if low_rank is not None and _fits(low_rank, self._native_dtype()):
            self.value.const_value = FoldedTensor(operands, original.dtype, original.shape, name=name)
        else:
            self.value.const_value = ir.LazyTensor(
                lambda: ir.Tensor(self._encode(compute(), self.layout, modules), name=name), original.dtype,
                original.shape, name=name)
        self.value.meta[REPLACES] = original

    def _modules(self, node: ir.Node | None = None) -> str:
        """The modules editing this weight (all its readers', or ``node``'s), and the weight, for messages."""
        edits = self.edits.get(node, []) if node is not None else [e for el in self.edits.values() for e in el]
        paths = ", ".join(dict.fromkeys(e.path for e in edits if e.path))
        return f"{paths} ({self.name})" if paths else self.name

    def operand(self, node: ir.Node) -> tuple[int, str, tuple[int, ...]]:
        """(input index, layout, dims) of this weight as ``node`` reads it (through Identity/Transpose)."""
        index = next(i for i, v in enumerate(node.inputs) if v is not None and behind(v, self.value))
        layout = _operand_layout(node, self.layout)
        return index, layout, self.shape[::-1] if layout == "in_out" and len(self.shape) == 2 else self.shape

    def write_copy(self, graph: ir.Graph, node: ir.Node, compute: Callable[[], np.ndarray], name: str) -> None:
        index, layout, dims = self.operand(node)
        original = self.tensor
        modules = self._modules(node)
        tensor = ir.LazyTensor(lambda: ir.Tensor(self._encode(compute(), layout, modules), name=name), original.dtype,
                               ir.Shape(dims), name=name)
        new = ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(original.dtype), const_value=tensor)
        graph.register_initializer(new)
        node.replace_input_with(index, new)


def _finfo(dtype: np.dtype):
    return ml_dtypes.finfo(dtype) if dtype == np.dtype(ml_dtypes.bfloat16) else np.finfo(dtype)


def _fits(low_rank: LowRank, dtype: np.dtype) -> bool:
    """Whether no value of ``up @ down`` can be within 1/64 of ``dtype``'s largest value (a Cauchy-Schwarz bound
    from the factors' row and column norms): then a merged value cannot overflow unless its base value was that
    close already, and the fast fold (which does not check the range) is used; else the exact path checks it."""
    if dtype.kind != "f" and dtype != np.dtype(ml_dtypes.bfloat16):
        return True
    rows = float(np.sqrt(np.square(low_rank.up, dtype=np.float64).sum(axis=1).max(initial=0.0)))
    cols = float(np.sqrt(np.square(low_rank.down, dtype=np.float64).sum(axis=0).max(initial=0.0)))
    return rows * cols < float(_finfo(dtype).max) / 64


class NewBias(Store):
    """The bias a linear node does not have (zeros until edited); writing it adds one: the Gemm's C input, else an
    ``Add`` after the node (its readers rerouted, a graph output keeping its name)."""

    def __init__(self, node: ir.Node, features: int, dtype: ir.DataType) -> None:
        super().__init__(f"{node.name}.bias", (features,), dtype.name.lower())
        self.node, self.data_type = node, dtype

    def readers(self) -> set[ir.Node]:
        return set()

    def read(self) -> np.ndarray:
        return np.zeros(self.shape, np.float32)

    def write(self, compute: Callable[[], np.ndarray], low_rank: LowRank | None) -> None:
        from lorapass.onnx.edit import reroute

        graph, node = self.node.graph, self.node
        path = next(iter(self.edits.values()))[0].path or node.name
        name = unique_name(graph, f"{path}.bias")
        dtype = np.dtype(self.data_type.numpy())
        tensor = ir.LazyTensor(lambda: ir.Tensor(compute().astype(dtype), name=name), self.data_type, ir.Shape(self.shape),
                               name=name)
        bias = ir.Value(name=name, shape=ir.Shape(self.shape), type=ir.TensorType(self.data_type), const_value=tensor)
        graph.register_initializer(bias)
        if node.op_type == "Gemm":
            node.resize_inputs(3)
            node.replace_input_with(2, bias)
            return
        y = node.outputs[0]
        add = ir.Node("", "Add", [y, bias], name=f"{path}/bias/Add")
        graph.insert_after(node, add)
        reroute(y, add.outputs[0], keep={add}, name=f"{path}.biased")

    def write_copy(self, graph: ir.Graph, node: ir.Node, compute: Callable[[], np.ndarray], name: str) -> None:
        self.write(compute, None)  # one node only ever edits a bias it does not have


def behind(value: ir.Value, source: ir.Value) -> bool:
    """Whether ``value`` is ``source`` or derived from it through Identity/Transpose."""
    while value is not source:
        producer = value.producer()
        if producer is None or producer.op_type not in _SEE_THROUGH or producer.domain not in ("", "ai.onnx"):
            return False
        value = producer.inputs[0]
    return True


def _operand_layout(node: ir.Node, stored: str) -> str:
    """The layout ``node`` consumes its weight operand in: [in, out] for MatMul and Gemm transB=0."""
    if node.op_type == "MatMul":
        return "in_out"
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        return "out_in" if trans_b is not None and trans_b.as_int() == 1 else "in_out"
    return stored
