"""Model configs: every shipped config has the transformers model's own parameter count and linear layers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml
from transformers.pytorch_utils import Conv1D

from lorapass.cost import ops as O
from lorapass.cost.config import build_graph, load_config
from lorapass.cost.parallel import Layout, validate
from lorapass.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "models").glob("*.yaml"))
SHIPPED = {"llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b", "llama3-70b", "mistral-7b", "mixtral-8x7b", "gpt2",
           "bert-base"}


def hf_model(cfg) -> torch.nn.Module:
    """The transformers model of a config, on the meta device (no memory)."""
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
              max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tied)
    with torch.device("meta"):
        if cfg.family == "llama":
            return tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=cfg.kv_heads, **kw))
        if cfg.family == "mistral":
            return tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=cfg.kv_heads,
                                                          sliding_window=cfg.sliding_window, **kw))
        if cfg.family == "mixtral":
            return tf.MixtralForCausalLM(tf.MixtralConfig(num_key_value_heads=cfg.kv_heads,
                                                          num_local_experts=cfg.num_local_experts,
                                                          num_experts_per_tok=cfg.num_experts_per_tok, **kw))
        if cfg.family == "gpt2":
            return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size,
                                                    n_layer=cfg.num_hidden_layers, n_head=cfg.num_attention_heads,
                                                    n_positions=cfg.max_position_embeddings,
                                                    n_inner=cfg.intermediate_size))
        return tf.BertModel(tf.BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                          num_hidden_layers=cfg.num_hidden_layers,
                                          num_attention_heads=cfg.num_attention_heads,
                                          intermediate_size=cfg.intermediate_size,
                                          max_position_embeddings=cfg.max_position_embeddings,
                                          type_vocab_size=cfg.type_vocab_size), add_pooling_layer=False)


def linear_modules(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            out[name] = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):
            out[name] = tuple(module.weight.shape)
        elif type(module).__name__.endswith("TopKRouter"):  # F.linear on its own weight: an ONNX site
            out[name] = (module.weight.shape[1], module.weight.shape[0])
    return out


def test_all_configs_ship():
    assert SHIPPED <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_parameters_and_linear_sites_match_transformers(path):
    cfg = load_config(path)
    model = hf_model(cfg)
    assert cfg.param_count() == sum(p.numel() for p in model.parameters())
    graph = build_graph(cfg, 1, 4, 4)
    ours = {op.path: (op.in_features, op.out_features) for op in graph.ops if op.kind == O.GEMM}
    assert ours == linear_modules(model)


def test_published_parameter_counts():
    """Model cards: Llama-2-7B 6,738,415,616; GPT-2 124,439,808; Mixtral-8x7B 46.7B; Llama-2-70B 69.0B."""
    assert load_config(ROOT / "models/llama2-7b.yaml").param_count() == 6_738_415_616
    assert load_config(ROOT / "models/gpt2.yaml").param_count() == 124_439_808
    assert load_config(ROOT / "models/mixtral-8x7b.yaml").param_count() / 1e9 == pytest.approx(46.7, abs=0.05)
    assert load_config(ROOT / "models/llama2-70b.yaml").param_count() / 1e9 == pytest.approx(68.98, abs=0.01)


def test_llama2_70b_architecture():
    """GQA with 8 KV heads, SwiGLU (3 linears), vocabulary 32000; FLOPs of one token by hand."""
    cfg = load_config(ROOT / "models/llama2-70b.yaml")
    g = build_graph(cfg, 1, 1, 1)
    by_path = {op.path: op for op in g.ops if op.kind == O.GEMM}
    assert (by_path["model.layers.0.self_attn.k_proj"].in_features,
            by_path["model.layers.0.self_attn.k_proj"].out_features) == (8192, 8 * 128)
    assert sorted(p.rsplit(".", 1)[1] for p in by_path if p.startswith("model.layers.0.mlp.")) == \
        ["down_proj", "gate_proj", "up_proj"]
    assert by_path["lm_head"].out_features == 32000
    h, i, kv = 8192, 28672, 1024
    per_layer = 2 * (h * h + 2 * h * kv + h * h + 3 * h * i)
    assert sum(op.flops for op in by_path.values()) == 80 * per_layer + 2 * h * 32000
    assert g.meta.num_kv_heads == 8 and g.meta.head_dim == 128


def test_mixtral_experts_top2():
    """Per token: 2 of 8 experts, each SwiGLU (gate_up 2I x H, down H x I); all 8 resident."""
    cfg = load_config(ROOT / "models/mixtral-8x7b.yaml")
    t = 5
    g = build_graph(cfg, 1, t, t)
    experts = [op for op in g.ops if op.kind == O.GEMM_EXPERT and op.layer == 0]
    h, i = 4096, 14336
    assert sum(op.flops for op in experts) == 2 * t * 2 * (h * 2 * i + i * h)
    assert sum(op.param_bytes for op in experts) == 8 * 3 * h * i * 2
    # expected distinct experts touched by 5 tokens routed top-2 of 8 uniformly: 8 (1 - (6/8)^5)
    assert sum(op.weight_bytes for op in experts) == pytest.approx(8 * (1 - 0.75 ** 5) * 3 * h * i * 2)
    assert [op.path for op in experts] == [None, None]  # fused parameters: no module rule targets them
    assert "model.layers.0.mlp.gate" in g.linear_paths()


def test_sliding_window_caps_mistral_attention():
    cfg = load_config(ROOT / "models/mistral-7b.yaml")
    long = build_graph(cfg, 1, 1, 10000)
    at_window = build_graph(cfg, 1, 1, 4096)
    att = lambda g: sum(op.flops for op in g.ops if op.kind == O.ATTENTION)  # noqa: E731
    assert att(long) == att(at_window)


def _tiny(tmp_path: Path, **changes) -> Path:
    data = dict(name="tiny", family="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    data.update(changes)
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("changes,field", [
    ({"hidden_size": None}, "hidden_size"),
    ({"hidden_size": -64}, "hidden_size"),
    ({"family": "gpt5"}, "family"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hiden_size": 64}, "hiden_size"),
    ({"num_local_experts": 8}, "num_local_experts"),
])
def test_bad_config_names_file_and_field(tmp_path, changes, field):
    path = _tiny(tmp_path, **changes)
    with pytest.raises(SpecError) as err:
        load_config(path)
    assert str(path) in str(err.value) and field in str(err.value)


@pytest.mark.parametrize("layout,field", [
    (Layout(tp=3), "num_attention_heads"),
    (Layout(tp=16), "num_attention_heads"),
    (Layout(pp=3), "num_hidden_layers"),
    (Layout(ep=2), "num_local_experts"),
])
def test_layout_that_does_not_fit_the_model_is_a_typed_error(tmp_path, layout, field):
    path = _tiny(tmp_path)
    g = build_graph(load_config(path), 1, 1, 1, source=str(path))
    with pytest.raises(SpecError) as err:
        validate(g.meta, layout, batch=4)
    assert str(path) in str(err.value) and field in str(err.value)


def test_tp_beyond_kv_heads_replicates_them():
    """Llama-2-70B: 8 KV heads; TP 16 divides the 64 query heads and replicates each KV head twice."""
    cfg = load_config(ROOT / "models/llama2-70b.yaml")
    g = build_graph(cfg, 1, 1, 1, source="llama2-70b.yaml")
    validate(g.meta, Layout(tp=16), batch=1)
    # 48 query heads, 8 KV heads: TP 12 divides the query heads but neither divides the other for KV
    meta = dataclasses.replace(g.meta, num_heads=48, intermediate_size=0)
    with pytest.raises(SpecError, match="num_key_value_heads"):
        validate(meta, Layout(tp=12), batch=1)
