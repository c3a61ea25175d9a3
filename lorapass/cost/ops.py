"""Operators: FLOPs and bytes moved by one operator, and the graph of operators a phase runs.

Every operator carries totals for the whole (un-sharded) computation of one run of the graph; how those
totals split across tensor-parallel devices is the operator's ``tp`` mode (see :data:`TP_MODES`).

Formulas (``t`` tokens in the run, ``e`` bytes per element):

- GEMM ``x[t,in] @ W[in,out]``: 2·t·in·out FLOPs; reads W (in·out·e) and x (t·in·e), writes t·out·e.
- LoRA A (GEMM_LORA_A): 2·t·in·r, reads A (r·in·e) and x, writes t·r·e.  LoRA B (GEMM_LORA_B): 2·t·r·out,
  reads B (r·out·e) and t·r·e, writes t·out·e.  The join (ADD): t·out FLOPs, reads 2·t·out·e, writes t·out·e.
- Attention for b sequences, q new tokens each over k keys, h query heads, g KV heads, head_dim d:
  QK^T and PV each 2·b·h·q·k·d FLOPs; softmax 5 FLOPs per score (max, subtract, exp, sum, divide).
  ``dense`` materialises the b·h·q·k scores (written by QK, read and written by softmax, read by PV);
  ``flash`` (one fused kernel) never does, and with a causal mask computes only the q·(k-q) + q(q+1)/2
  visible pairs. K and V of the context are read once per KV head (2·b·g·k·d·e, the KV-cache traffic in
  decode) and the new tokens' K and V written to the cache (2·b·g·q·d·e).
- Norms: RMSNorm 4 FLOPs/element, LayerNorm 7; element-wise ops 1 FLOP per output element per elementary
  operation (SiLU·mul = 3, GELU = 8 as tanh approximation, rotary 4); each reads its inputs, writes its output.
- Embedding lookup: reads t rows (t·hidden·e), writes the same; no FLOPs. Its table is resident memory only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# operator classes
GEMM = "GEMM"
GEMM_EXPERT = "GEMM_EXPERT"
GEMM_LORA_A = "GEMM_LORA_A"
GEMM_LORA_B = "GEMM_LORA_B"
GATHER_LORA = "GATHER_LORA"  # strategy multi: each row's adapter gathered from a bank
LORA_ADD = "ADD"
ATTN_QK = "ATTN_QK"
ATTN_AV = "ATTN_AV"
ATTENTION = "ATTENTION"
SOFTMAX = "SOFTMAX"
NORM = "NORM"
ELEMENTWISE = "ELEMENTWISE"
EMBEDDING = "EMBEDDING"
MEMORY = "MEMORY"
SHAPE = "SHAPE"
MERGE = "MERGE"
CLASSES = (GEMM, GEMM_EXPERT, GATHER_LORA, GEMM_LORA_A, GEMM_LORA_B, LORA_ADD, ATTN_QK, SOFTMAX, ATTN_AV, ATTENTION, NORM,
           ELEMENTWISE, EMBEDDING, MEMORY, SHAPE, MERGE)
LINEAR_CLASSES = (GEMM, GEMM_EXPERT)
LORA_CLASSES = (GATHER_LORA, GEMM_LORA_A, GEMM_LORA_B, LORA_ADD)

SOFTMAX_FLOPS = 5
RMSNORM_FLOPS = 4
LAYERNORM_FLOPS = 7
SILU_MUL_FLOPS = 3
GELU_FLOPS = 8
ROTARY_FLOPS = 4

TP_MODES: dict[str, str] = {
    "col": "column-parallel linear: W split on its output features; input replicated, output sharded",
    "kv_col": "column-parallel K/V projection: split over min(tp, kv_heads), KV heads replicated beyond",
    "row": "row-parallel linear: W split on its input features; output is a partial sum, all-reduced",
    "heads": "inside a tensor-parallel region (attention heads, MLP activations): everything split",
    "vocab": "vocabulary-parallel output head: W and logits split on the vocabulary",
    "embed": "vocabulary-parallel embedding table: the table split, the looked-up rows all-reduced",
    "replicated": "on the full hidden state: replicated, or split along the sequence with sequence parallelism",
    "partial": "on a row-parallel partial sum before its reduction: never split",
    "expert_col": "MoE expert linear (first): experts split over EP, each column-parallel over TP",
    "expert_row": "MoE expert linear (second): experts split over EP, each row-parallel over TP",
}


@dataclass
class Op:
    """One operator; byte counts are totals for one run of the un-sharded graph."""

    name: str
    kind: str
    flops: float = 0.0
    weight_bytes: float = 0.0  # parameters read per run
    param_bytes: float = 0.0  # parameters resident in memory
    act_in: float = 0.0  # activation bytes read
    act_out: float = 0.0  # activation bytes written
    kv_bytes: float = 0.0  # KV-cache bytes read and written
    path: str | None = None  # module path (linear sites and their LoRA operators)
    paths: tuple[str, ...] = ()  # every site a fused LoRA A serves
    layer: int | None = None
    tp: str = "replicated"
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    tokens: float = 0.0
    in_features: int = 0
    out_features: int = 0
    rank: int = 0
    experts: int = 0  # MoE: experts in the layer
    top_k: int = 0
    expert_bytes: float = 0.0  # MoE: bytes of one expert's weight in this operator
    a2a_bytes: float = 0.0  # MoE: one device-group's dispatch (or combine) buffer, before EP splitting
    launches: int = 1  # kernel launches (0: folded away before the run)
    reduce: bool = False  # the output is a partial sum all-reduced over the tensor-parallel group
    onnx_op: str | None = None
    blocks: tuple[tuple[str, int], ...] = ()  # a packed weight's modules: (module path, output rows), in row order

    def sites(self) -> list[tuple[str, int]]:
        """(module path, output features) of each module this linear computes: its row blocks when packed."""
        return list(self.blocks) if self.blocks else [(self.path, self.out_features)] if self.path else []

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.act_in + self.act_out + self.kv_bytes

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else float("inf")


@dataclass
class GraphMeta:
    """What parallelism and memory accounting need to know about the model behind an operator graph."""

    name: str
    source: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int = 0
    intermediate_size: int = 0
    num_experts: int = 0
    top_k: int = 0
    dtype: str = "bf16"
    kv_dtype: str = "bf16"
    causal: bool = True
    sliding_window: int | None = None
    output_heads: tuple[str, ...] = ()
    batch: int = 1
    q_len: float = 1
    kv_len: float = 1


@dataclass
class OpGraph:
    """The operators one phase runs, in execution order, and the bytes of every tensor between them."""

    ops: list[Op]
    meta: GraphMeta
    tensors: dict[str, float] = field(default_factory=dict)
    _arrays: dict[str, np.ndarray] | None = field(default=None, repr=False)

    def linear_paths(self) -> list[str]:
        """Module paths of the linears, a packed weight's modules (q/k/v) in its place."""
        return list(self.site_features())

    def site_features(self) -> dict[str, tuple[int, int]]:
        """(in, out) features per module path of every linear (a packed weight's row blocks each on its own)."""
        return {path: (op.in_features, rows) for op in self.ops if op.kind in LINEAR_CLASSES for path, rows in op.sites()}

    def totals(self, by: str = "kind") -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for op in self.ops:
            row = out.setdefault(getattr(op, by) if by != "kind" else op.kind, {"count": 0, "flops": 0.0, "bytes": 0.0,
                                                                                "weight_bytes": 0.0})
            row["count"] += 1
            row["flops"] += op.flops
            row["bytes"] += op.bytes
            row["weight_bytes"] += op.weight_bytes
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """Column arrays of the operators, for vectorised evaluation (cached)."""
        if self._arrays is None:
            ops = self.ops
            self._arrays = {
                "flops": np.array([o.flops for o in ops], dtype=float),
                "weight": np.array([o.weight_bytes for o in ops], dtype=float),
                "param": np.array([o.param_bytes for o in ops], dtype=float),
                "act_in": np.array([o.act_in for o in ops], dtype=float),
                "act_out": np.array([o.act_out for o in ops], dtype=float),
                "kv": np.array([o.kv_bytes for o in ops], dtype=float),
                "tokens": np.array([o.tokens for o in ops], dtype=float),
                "experts": np.array([o.experts for o in ops], dtype=float),
                "top_k": np.array([o.top_k for o in ops], dtype=float),
                "expert_bytes": np.array([o.expert_bytes for o in ops], dtype=float),
                "a2a": np.array([o.a2a_bytes for o in ops], dtype=float),
                "launches": np.array([o.launches for o in ops], dtype=float),
                "reduce": np.array([o.reduce for o in ops], dtype=bool),
                "lora": np.array([bool(o.paths) for o in ops], dtype=bool),
                **dict(zip(("kinds", "kind"), np.unique(np.array([o.kind for o in ops], dtype=str),
                                                         return_inverse=True))),
            }
        return self._arrays


# ---- constructors shared by the config expander and the LoRA pass ----

def gemm(name: str, path: str | None, tokens: float, in_f: int, out_f: int, e: float, *, layer: int | None,
         tp: str, inputs: tuple[str, ...], outputs: tuple[str, ...], kind: str = GEMM, param: bool = True,
         rank: int = 0) -> Op:
    """``x[t,in] @ W[in,out]`` (also the LoRA A/B products with their own kinds)."""
    w = in_f * out_f * e
    return Op(name, kind, flops=2.0 * tokens * in_f * out_f, weight_bytes=w, param_bytes=w if param else 0.0,
              act_in=tokens * in_f * e, act_out=tokens * out_f * e, path=path, layer=layer, tp=tp, inputs=inputs,
              outputs=outputs, tokens=tokens, in_features=in_f, out_features=out_f, rank=rank,
              reduce=tp == "row" and kind in (GEMM, GEMM_EXPERT))


def elementwise(name: str, elements: float, e: float, *, n_inputs: int = 1, flops_per: float = 1.0,
                kind: str = ELEMENTWISE, layer: int | None, tp: str, inputs: tuple[str, ...],
                outputs: tuple[str, ...], weight: float = 0.0) -> Op:
    """An element-wise operator over ``elements`` outputs reading ``n_inputs`` same-size inputs."""
    return Op(name, kind, flops=flops_per * elements, weight_bytes=weight, param_bytes=weight,
              act_in=n_inputs * elements * e, act_out=elements * e, layer=layer, tp=tp, inputs=inputs,
              outputs=outputs)


def causal_pairs(q: float, k: float) -> float:
    """Query-key pairs a causal mask leaves visible for q new tokens at the end of a k-token context."""
    return q * (k - q) + q * (q + 1) / 2


def attention_ops(prefix: str, b: float, q: float, k: float, h: int, g: int, d: int, e: float, kv_e: float, *,
                  layer: int | None, mode: str, causal: bool, inputs: tuple[str, str, str], output: str,
                  cache: bool = True) -> list[Op]:
    """Scaled dot-product attention of b sequences, q new tokens each, over k keys (h heads, g KV heads).

    ``inputs`` are the (Q, K, V) tensors of the new tokens; with ``cache`` the new K/V are written to the
    KV cache and the whole context's K/V read from it (KV-cache bytes); otherwise K/V count as activations.
    """
    qo = b * h * q * d * e
    kv_read = 2 * b * g * k * d * (kv_e if cache else e)
    kv_write = 2 * b * g * q * d * kv_e if cache else 0.0
    kv = (kv_read + kv_write) if cache else 0.0
    act_kv = 0.0 if cache else kv_read
    if mode == "flash":
        pairs = causal_pairs(q, k) if causal else q * k
        flops = 4.0 * b * h * pairs * d + SOFTMAX_FLOPS * b * h * pairs
        return [Op(f"{prefix}.attention", ATTENTION, flops=flops, act_in=qo + act_kv, act_out=qo, kv_bytes=kv,
                   layer=layer, tp="heads", inputs=inputs, outputs=(output,), tokens=b * q)]
    scores = b * h * q * k
    s_name, p_name = f"{prefix}.scores", f"{prefix}.probs"
    return [
        Op(f"{prefix}.qk", ATTN_QK, flops=2.0 * scores * d, act_in=qo + act_kv / 2, act_out=scores * e,
           kv_bytes=kv / 2 if cache else 0.0, layer=layer, tp="heads", inputs=inputs[:2], outputs=(s_name,),
           tokens=b * q),
        Op(f"{prefix}.softmax", SOFTMAX, flops=SOFTMAX_FLOPS * scores, act_in=scores * e, act_out=scores * e,
           layer=layer, tp="heads", inputs=(s_name,), outputs=(p_name,), tokens=b * q),
        Op(f"{prefix}.av", ATTN_AV, flops=2.0 * scores * d, act_in=scores * e + act_kv / 2, act_out=qo,
           kv_bytes=kv / 2 if cache else 0.0, layer=layer, tp="heads", inputs=(p_name, inputs[2]),
           outputs=(output,), tokens=b * q),
    ]


def active_experts(experts: float | np.ndarray, top_k: float | np.ndarray, tokens: float | np.ndarray):
    """Expected number of distinct experts ``tokens`` routed tokens touch (uniform top-k routing)."""
    experts = np.asarray(experts, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(experts > 0, 1.0 - np.power(np.clip(1.0 - top_k / np.maximum(experts, 1), 0, 1), tokens), 0.0)
    return experts * frac
