"""Model configs (models/*.yaml) expanded into the operator list the exported ONNX graph would contain.

Field names follow Hugging Face ``config.json`` (``hidden_size``, ``num_hidden_layers``, ...). ``family``
picks the block structure and the module paths, which are those of the transformers model class
(``LlamaForCausalLM``: ``model.layers.3.self_attn.q_proj``; ``GPT2LMHeadModel``: ``transformer.h.3.attn.c_attn``;
``BertModel``: ``encoder.layer.3.attention.self.query``; ``MixtralForCausalLM``: ``model.layers.3.mlp.gate``),
so LoRA rules select the same sites here as in an export of that class.

Mixtral's experts are fused parameters in transformers 5 (``mlp.experts.gate_up_proj`` [E, 2I, H] and
``mlp.experts.down_proj``), not linear modules: they appear as GEMM_EXPERT operators that no module rule
targets (PEFT would need ``target_parameters``, which lorapass refuses), while the router ``mlp.gate`` is a site.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, model_validator

from lorapass.cost import ops as O
from lorapass.cost.hw import DTYPE_BYTES, _Strict, canonical_dtype, read_yaml, validated
from lorapass.cost.ops import GraphMeta, Op, OpGraph
from lorapass.errors import SpecError

Family = Literal["llama", "mistral", "mixtral", "gpt2", "bert"]
_DECODERS = ("llama", "mistral", "mixtral")


class ModelConfig(_Strict):
    """One transformer architecture."""

    name: str
    family: Family
    source: str | None = None
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int | None = Field(None, gt=0)
    head_dim: int | None = Field(None, gt=0)
    vocab_size: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    tie_word_embeddings: bool | None = None
    sliding_window: int | None = Field(None, gt=0)
    num_local_experts: int | None = Field(None, gt=0)
    num_experts_per_tok: int | None = Field(None, gt=0)
    type_vocab_size: int = Field(2, gt=0)
    dtype: str = "bf16"

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        canonical_dtype(self.dtype)
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads} (give head_dim)")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.kv_heads}")
        if self.family == "mixtral":
            if not self.num_local_experts or not self.num_experts_per_tok:
                raise ValueError("family mixtral needs num_local_experts and num_experts_per_tok")
            if self.num_experts_per_tok > self.num_local_experts:
                raise ValueError("num_experts_per_tok exceeds num_local_experts")
        elif self.num_local_experts:
            raise ValueError(f"num_local_experts is only valid for family mixtral, not {self.family}")
        if self.family in ("gpt2", "bert") and self.num_key_value_heads not in (None, self.num_attention_heads):
            raise ValueError(f"family {self.family} has no grouped-query attention")
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def causal(self) -> bool:
        return self.family != "bert"

    @property
    def tied(self) -> bool:
        return self.tie_word_embeddings if self.tie_word_embeddings is not None else self.family == "gpt2"

    @property
    def output_heads(self) -> tuple[str, ...]:
        return () if self.family == "bert" else ("lm_head",)

    def param_count(self) -> int:
        """Parameters of the model (the tied output head counted once), from the operator list's weights."""
        graph = build_graph(self, 1, 1, 1, dtype="fp32")
        return int(sum(op.param_bytes for op in graph.ops) / 4)


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read and validate a model config file."""
    return validated(ModelConfig, read_yaml(path), str(path))


def visible_pairs(q: float, k: float, causal: bool, window: int | None) -> float:
    """Query-key pairs a kernel that skips masked blocks computes: q new queries at the end of k keys."""
    if not causal:
        return q * min(k, window) if window else q * k
    if not window or window >= k:
        return O.causal_pairs(q, k)
    # positions p = k-q+1 .. k each see min(p, window) keys
    lo = k - q + 1
    below = max(0.0, min(k, window) - lo + 1)  # positions < = window: see p keys
    pairs = 0.0
    if below > 0:
        pairs += (lo + lo + below - 1) * below / 2
    pairs += (q - below) * window
    return pairs


class _Builder:
    def __init__(self, cfg: ModelConfig, batch: float, q: float, k: float, attention: str, e: float, kv_e: float):
        self.cfg, self.b, self.q, self.k, self.mode, self.e, self.kv_e = cfg, batch, q, k, attention, e, kv_e
        self.t = batch * q
        self.ops: list[Op] = []
        self.tensors: dict[str, float] = {}

    def add(self, op: Op) -> str:
        self.ops.append(op)
        for name in op.outputs:
            self.tensors[name] = op.act_out / max(len(op.outputs), 1)
        return op.outputs[0] if op.outputs else ""

    def linear(self, path: str, x: str, in_f: int, out_f: int, layer: int | None, tp: str, bias: bool = False,
               param: bool = True, tokens: float | None = None) -> str:
        t = self.t if tokens is None else tokens
        y = self.add(O.gemm(path, path, t, in_f, out_f, self.e, layer=layer, tp=tp, inputs=(x,),
                            outputs=(f"{path}.out",), param=param))
        if bias:
            btp = {"col": "heads", "kv_col": "heads", "row": "replicated", "vocab": "heads"}.get(tp, "replicated")
            y = self.add(O.elementwise(f"{path}.bias", t * out_f, self.e, layer=layer, tp=btp, inputs=(y,),
                                       outputs=(f"{path}.biased",), weight=out_f * self.e))
        return y

    def norm(self, path: str, x: str, layer: int | None, kind: str) -> str:
        h = self.cfg.hidden_size
        per = O.RMSNORM_FLOPS if kind == "rms" else O.LAYERNORM_FLOPS
        w = h * self.e * (1 if kind == "rms" else 2)
        return self.add(O.elementwise(path, self.t * h, self.e, flops_per=per, kind=O.NORM, layer=layer,
                                      tp="replicated", inputs=(x,), outputs=(f"{path}.out",), weight=w))

    def residual(self, name: str, a: str, b: str, layer: int | None) -> str:
        return self.add(O.elementwise(name, self.t * self.cfg.hidden_size, self.e, n_inputs=2, layer=layer,
                                      tp="replicated", inputs=(a, b), outputs=(f"{name}.out",)))

    def embedding(self, path: str, rows: int, ids: str, tp: str = "embed") -> str:
        h, e = self.cfg.hidden_size, self.e
        table = rows * h * e
        return self.add(Op(path, O.EMBEDDING, weight_bytes=self.t * h * e, param_bytes=table, act_in=0.0,
                           act_out=self.t * h * e, layer=None, tp=tp, inputs=(ids,), outputs=(f"{path}.out",),
                           tokens=self.t, reduce=tp == "embed"))

    def attention(self, prefix: str, q: str, k: str, v: str, layer: int) -> str:
        c = self.cfg
        k_len = self.k
        if self.mode == "dense":
            keys = min(k_len, c.sliding_window) if c.sliding_window and self.q == 1 else k_len
            ops = O.attention_ops(prefix, self.b, self.q, keys, c.num_attention_heads, c.kv_heads, c.dim, self.e,
                                  self.kv_e, layer=layer, mode="dense", causal=c.causal, inputs=(q, k, v),
                                  output=f"{prefix}.ctx", cache=c.causal)
        else:
            keys = min(k_len, c.sliding_window) if c.sliding_window else k_len
            ops = O.attention_ops(prefix, self.b, self.q, keys, c.num_attention_heads, c.kv_heads, c.dim, self.e,
                                  self.kv_e, layer=layer, mode="flash", causal=c.causal, inputs=(q, k, v),
                                  output=f"{prefix}.ctx", cache=c.causal)
            pairs = visible_pairs(self.q, k_len, c.causal, c.sliding_window)
            ops[0].flops = (4.0 * c.dim + O.SOFTMAX_FLOPS) * self.b * c.num_attention_heads * pairs
        for op in ops:
            self.add(op)
        return ops[-1].outputs[0]

    # ---- families ----
    def decoder_layer(self, i: int, x: str) -> str:
        c, t = self.cfg, self.t
        h, d = c.hidden_size, c.dim
        p = f"model.layers.{i}"
        n = self.norm(f"{p}.input_layernorm", x, i, "rms")
        q = self.linear(f"{p}.self_attn.q_proj", n, h, c.num_attention_heads * d, i, "col")
        k = self.linear(f"{p}.self_attn.k_proj", n, h, c.kv_heads * d, i, "kv_col")
        v = self.linear(f"{p}.self_attn.v_proj", n, h, c.kv_heads * d, i, "kv_col")
        rot = t * (c.num_attention_heads + c.kv_heads) * d
        qk = self.add(O.elementwise(f"{p}.self_attn.rotary", rot, self.e, flops_per=O.ROTARY_FLOPS, layer=i,
                                    tp="heads", inputs=(q, k), outputs=(f"{p}.self_attn.rotary.out",)))
        ctx = self.attention(f"{p}.self_attn", qk, qk, v, i)
        o = self.linear(f"{p}.self_attn.o_proj", ctx, c.num_attention_heads * d, h, i, "row")
        x = self.residual(f"{p}.attn_residual", x, o, i)
        n = self.norm(f"{p}.post_attention_layernorm", x, i, "rms")
        if c.family == "mixtral":
            y = self.moe(p, n, i)
        else:
            g = self.linear(f"{p}.mlp.gate_proj", n, h, c.intermediate_size, i, "col")
            u = self.linear(f"{p}.mlp.up_proj", n, h, c.intermediate_size, i, "col")
            a = self.add(O.elementwise(f"{p}.mlp.act", t * c.intermediate_size, self.e, n_inputs=2,
                                       flops_per=O.SILU_MUL_FLOPS, layer=i, tp="heads", inputs=(g, u),
                                       outputs=(f"{p}.mlp.act.out",)))
            y = self.linear(f"{p}.mlp.down_proj", a, c.intermediate_size, h, i, "row")
        return self.residual(f"{p}.mlp_residual", x, y, i)

    def moe(self, p: str, x: str, i: int) -> str:
        c, t, e = self.cfg, self.t, self.e
        h, inter, n_exp, k = c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok
        logits = self.linear(f"{p}.mlp.gate", x, h, n_exp, i, "replicated")
        r = self.add(O.elementwise(f"{p}.mlp.route", t * n_exp, e, flops_per=O.SOFTMAX_FLOPS + 1, layer=i,
                                   tp="replicated", inputs=(logits,), outputs=(f"{p}.mlp.route.out",)))
        routed = t * k
        ops = []
        for name, in_f, out_f, tp, src in (("gate_up_proj", h, 2 * inter, "expert_col", x),
                                           ("down_proj", inter, h, "expert_row", f"{p}.mlp.experts.act.out")):
            path = f"{p}.mlp.experts.{name}"
            inputs = (src, r) if tp == "expert_col" else (src,)
            op = O.gemm(path, path, routed, in_f, out_f, e, layer=i, tp=tp, inputs=inputs, outputs=(f"{path}.out",),
                        kind=O.GEMM_EXPERT)
            op.path = None  # a fused expert parameter, not a linear module
            op.experts, op.top_k, op.expert_bytes = n_exp, k, in_f * out_f * e
            op.param_bytes = n_exp * in_f * out_f * e
            op.weight_bytes = float(O.active_experts(n_exp, k, t)) * in_f * out_f * e
            op.a2a_bytes = routed * h * e
            ops.append(op)
        self.add(ops[0])
        self.add(O.elementwise(f"{p}.mlp.experts.act", routed * inter, e, n_inputs=2, flops_per=O.SILU_MUL_FLOPS,
                               layer=i, tp="heads", inputs=(ops[0].outputs[0],), outputs=(f"{p}.mlp.experts.act.out",)))
        self.add(ops[1])
        combine = O.elementwise(f"{p}.mlp.combine", t * h, e, n_inputs=k, flops_per=2 * k, layer=i, tp="partial",
                                inputs=(ops[1].outputs[0], r), outputs=(f"{p}.mlp.combine.out",))
        combine.reduce = True
        return self.add(combine)

    def gpt2_layer(self, i: int, x: str) -> str:
        c, t, h = self.cfg, self.t, self.cfg.hidden_size
        p = f"transformer.h.{i}"
        n = self.norm(f"{p}.ln_1", x, i, "layer")
        qkv = self.linear(f"{p}.attn.c_attn", n, h, 3 * h, i, "col", bias=True)
        ctx = self.attention(f"{p}.attn", qkv, qkv, qkv, i)
        o = self.linear(f"{p}.attn.c_proj", ctx, h, h, i, "row", bias=True)
        x = self.residual(f"{p}.attn_residual", x, o, i)
        n = self.norm(f"{p}.ln_2", x, i, "layer")
        f = self.linear(f"{p}.mlp.c_fc", n, h, c.intermediate_size, i, "col", bias=True)
        a = self.add(O.elementwise(f"{p}.mlp.act", t * c.intermediate_size, self.e, flops_per=O.GELU_FLOPS, layer=i,
                                   tp="heads", inputs=(f,), outputs=(f"{p}.mlp.act.out",)))
        y = self.linear(f"{p}.mlp.c_proj", a, c.intermediate_size, h, i, "row", bias=True)
        return self.residual(f"{p}.mlp_residual", x, y, i)

    def bert_layer(self, i: int, x: str) -> str:
        c, t, h = self.cfg, self.t, self.cfg.hidden_size
        p = f"encoder.layer.{i}"
        q = self.linear(f"{p}.attention.self.query", x, h, h, i, "col", bias=True)
        k = self.linear(f"{p}.attention.self.key", x, h, h, i, "col", bias=True)
        v = self.linear(f"{p}.attention.self.value", x, h, h, i, "col", bias=True)
        ctx = self.attention(f"{p}.attention.self", q, k, v, i)
        o = self.linear(f"{p}.attention.output.dense", ctx, h, h, i, "row", bias=True)
        x = self.residual(f"{p}.attention.output.residual", x, o, i)
        x = self.norm(f"{p}.attention.output.LayerNorm", x, i, "layer")
        f = self.linear(f"{p}.intermediate.dense", x, h, c.intermediate_size, i, "col", bias=True)
        a = self.add(O.elementwise(f"{p}.intermediate.act", t * c.intermediate_size, self.e, flops_per=O.GELU_FLOPS,
                                   layer=i, tp="heads", inputs=(f,), outputs=(f"{p}.intermediate.act.out",)))
        y = self.linear(f"{p}.output.dense", a, c.intermediate_size, h, i, "row", bias=True)
        x = self.residual(f"{p}.output.residual", x, y, i)
        return self.norm(f"{p}.output.LayerNorm", x, i, "layer")

    def build(self, logits: str) -> None:
        c, h = self.cfg, self.cfg.hidden_size
        self.tensors["input_ids"] = self.t * 8
        if c.family in _DECODERS:
            x = self.embedding("model.embed_tokens", c.vocab_size, "input_ids")
            for i in range(c.num_hidden_layers):
                x = self.decoder_layer(i, x)
            x = self.norm("model.norm", x, None, "rms")
        elif c.family == "gpt2":
            x = self.embedding("transformer.wte", c.vocab_size, "input_ids")
            pos = self.embedding("transformer.wpe", c.max_position_embeddings, "input_ids", tp="replicated")
            x = self.residual("transformer.embed_add", x, pos, None)
            for i in range(c.num_hidden_layers):
                x = self.gpt2_layer(i, x)
            x = self.norm("transformer.ln_f", x, None, "layer")
        else:
            x = self.embedding("embeddings.word_embeddings", c.vocab_size, "input_ids")
            pos = self.embedding("embeddings.position_embeddings", c.max_position_embeddings, "input_ids",
                                 tp="replicated")
            typ = self.embedding("embeddings.token_type_embeddings", c.type_vocab_size, "input_ids", tp="replicated")
            x = self.residual("embeddings.add_position", x, pos, None)
            x = self.residual("embeddings.add_type", x, typ, None)
            self.norm("embeddings.LayerNorm", x, None, "layer")
            x = "embeddings.LayerNorm.out"
            for i in range(c.num_hidden_layers):
                x = self.bert_layer(i, x)
        if c.output_heads:
            tokens = self.b if logits == "last" else self.t
            self.linear("lm_head", x, h, c.vocab_size, None, "vocab", param=not c.tied, tokens=tokens)


def build_graph(cfg: ModelConfig, batch: float, q_len: float, kv_len: float, *, attention: str = "flash",
                logits: str = "last", dtype: str | None = None, kv_dtype: str | None = None,
                source: str = "") -> OpGraph:
    """The operators of one forward pass: ``batch`` sequences, ``q_len`` new tokens each, over ``kv_len`` keys.

    Prefill is ``q_len = kv_len = seq``; a decode step is ``q_len = 1`` over the context so far.
    ``attention`` is ``flash`` (fused, causal blocks skipped) or ``dense`` (scores materialised, as an
    exported graph computes them); ``logits`` is ``last`` (output head on each sequence's last token, as
    serving engines do in prefill) or ``all`` (every position, as a plain export does).
    """
    if attention not in ("flash", "dense"):
        raise SpecError(f"attention must be flash or dense, not {attention!r}")
    if logits not in ("last", "all"):
        raise SpecError(f"logits must be last or all, not {logits!r}")
    dtype = canonical_dtype(dtype or cfg.dtype)
    kv_dtype = canonical_dtype(kv_dtype or dtype)
    b = _Builder(cfg, batch, q_len, kv_len, attention, DTYPE_BYTES[dtype], DTYPE_BYTES[kv_dtype])
    b.build(logits)
    meta = GraphMeta(name=cfg.name, source=source or cfg.name, num_layers=cfg.num_hidden_layers,
                     hidden_size=cfg.hidden_size, num_heads=cfg.num_attention_heads, num_kv_heads=cfg.kv_heads,
                     head_dim=cfg.dim, vocab_size=cfg.vocab_size, intermediate_size=cfg.intermediate_size,
                     num_experts=cfg.num_local_experts or 0, top_k=cfg.num_experts_per_tok or 0, dtype=dtype,
                     kv_dtype=kv_dtype, causal=cfg.causal, sliding_window=cfg.sliding_window,
                     output_heads=cfg.output_heads, batch=int(batch), q_len=q_len, kv_len=kv_len)
    return OpGraph(b.ops, meta, b.tensors)
