"""lorapass.rules against PEFT itself: its matcher, its pattern resolution, and real get_peft_model runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from pydantic import ValidationError
from transformers.pytorch_utils import Conv1D

from lorapass.errors import AdapterError, RuleError, UnsupportedError
from lorapass.rules import LoraParams, LoraRule, RuleSet

# PEFT and transformers warn about unmatched pattern keys, fan_in_fan_out flips and deprecations: all expected here
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning", "ignore::FutureWarning")


# ---------------------------------------------------------------- realistic module names

def _names() -> list[str]:
    names = ["lm_head", "score", "classifier", "q_proj", "fc", "layers.0.mlp.fc1", "layers.1.self_attn.q_proj",
             "h.1.attn.c_attn", "model.q_proj", "blocks.0.fc", "encoder.fc"]
    for prefix in ("", "language_model.", "base_model.model.", "text_model."):
        for i in range(4):
            names += [f"{prefix}model.layers.{i}.self_attn.{p}_proj" for p in "qkvo"]
            names += [f"{prefix}model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up", "down")]
    for i in range(4):
        names += [f"phi.model.layers.{i}.self_attn.qkv_proj", f"phi.model.layers.{i}.mlp.gate_up_proj"]
        names += [f"gpt_neox.layers.{i}.attention.query_key_value", f"gpt_neox.layers.{i}.attention.dense",
                  f"gpt_neox.layers.{i}.mlp.dense_h_to_4h"]
        names += [f"transformer.h.{i}.attn.c_attn", f"transformer.h.{i}.attn.c_proj",
                  f"transformer.h.{i}.mlp.c_fc", f"transformer.h.{i}.mlp.c_proj"]
        names += [f"transformer.h.{i}.self_attention.query_key_value", f"transformer.h.{i}.self_attention.dense",
                  f"transformer.h.{i}.mlp.dense_h_to_4h", f"transformer.h.{i}.mlp.dense_4h_to_h"]
        names += [f"bert.encoder.layer.{i}.attention.self.{p}" for p in ("query", "key", "value")]
        names += [f"bert.encoder.layer.{i}.attention.output.dense", f"bert.encoder.layer.{i}.intermediate.dense",
                  f"bert.encoder.layer.{i}.output.dense"]
        names += [f"vision.layers.{i}.mlp.fc1", f"vision.layers.{i}.mlp.fc2", f"vision.layers.{i}.attn.qkv",
                  f"vision_tower.vision_model.encoder.layers.{i}.self_attn.q_proj",
                  f"vision_tower.vision_model.encoder.layers.{i}.mlp.fc1"]
        names += [f"encoder.block.{i}.layer.0.SelfAttention.{p}" for p in "qkvo"]
        names += [f"decoder.block.{i}.layer.1.EncDecAttention.{p}" for p in "qv"]
        names += [f"decoder.block.{i}.layer.2.DenseReluDense.wi", f"model.decoder.layers.{i}.encoder_attn.k_proj"]
    for i in range(3):
        names.append(f"model.layers.{i}.block_sparse_moe.gate")
        names += [f"model.layers.{i}.block_sparse_moe.experts.{e}.w{w}" for e in range(4) for w in (1, 2, 3)]
        names += [f"model.mtp.{i}.layers.{j}.fc" for j in range(2)]
    names += ["bert.pooler.dense", "multi_modal_projector.linear_1", "multi_modal_projector.linear_2",
              "transformer.wte", "model.embed_tokens", "model.layers.0.self_attn", "model.layers.0"]
    return names


NAMES = _names()
assert len(NAMES) >= 300 and len(set(NAMES)) == len(NAMES)

MATCH_CONFIGS: list[dict] = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["query", "value", "dense"]},
    {"target_modules": ["c_attn", "c_proj", "c_fc"]},
    {"target_modules": ["w1", "w3"]},
    {"target_modules": ["fc1", "fc", "qkv"]},
    {"target_modules": ["self_attn.q_proj", "mlp.down_proj", "attention.self.query", "EncDecAttention.q"]},
    {"target_modules": ["model.layers.0.self_attn.q_proj", "lm_head", "o_proj", "score"]},
    {"target_modules": ["proj"]},  # a suffix is a whole dotted part: matches nothing named *_proj
    {"target_modules": []},
    {"target_modules": r".*\.(q|v)_proj"},
    {"target_modules": r".*layers\.[0-2]\..*proj"},
    {"target_modules": r"transformer\.h\.\d+\.attn\..*"},
    {"target_modules": "q_proj"},  # a plain string is a full match: only the root-level q_proj
    {"target_modules": r".*experts\.\d+\.w[13]"},
    {"target_modules": ["q_proj", "v_proj", "fc1"],
     "exclude_modules": ["model.layers.0.self_attn.q_proj", "vision.layers.1.mlp.fc1"]},
    {"target_modules": ["q_proj", "v_proj", "k_proj"], "exclude_modules": ["v_proj", "self_attn.k_proj"]},
    {"target_modules": ["q_proj", "fc1", "dense"], "exclude_modules": r".*layers?\.1\..*"},
    {"target_modules": r".*_proj", "exclude_modules": r".*(vision|language_model).*"},
    {"target_modules": ["q_proj", "fc1"], "exclude_modules": "q_proj"},
    {"target_modules": ["q_proj", "down_proj", "c_attn", "query", "fc1", "w1"], "layers_to_transform": 0},
    {"target_modules": ["q_proj", "down_proj", "c_attn", "query", "fc1", "w1"], "layers_to_transform": [0, 2]},
    {"target_modules": ["q_proj", "c_attn", "fc1", "w2"], "layers_to_transform": [1], "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "c_attn", "fc1"], "layers_to_transform": 1, "layers_pattern": "h"},
    {"target_modules": ["q_proj", "c_attn", "query", "fc1"], "layers_to_transform": [0, 1],
     "layers_pattern": ["layers", "h"]},
    {"target_modules": ["query", "dense", "wi"], "layers_to_transform": [2], "layers_pattern": ["layer", "block"]},
    {"target_modules": ["q_proj", "w1"], "layers_to_transform": [3], "layers_pattern": "(layers|experts)"},
    {"target_modules": ["q_proj", "fc1"], "layers_to_transform": [], "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "fc1"], "layers_to_transform": 0, "layers_pattern": []},
    {"target_modules": ["model.layers.1.self_attn.q_proj", "k_proj"], "layers_to_transform": [0]},
    {"target_modules": ["w1", "w2"], "layers_to_transform": [1], "layers_pattern": "layers",
     "exclude_modules": ["experts.0.w1"]},
]

PATTERN_CONFIGS: list[dict] = [
    {"r": 8, "lora_alpha": 16},
    {"r": 4, "lora_alpha": 8, "use_rslora": True},
    {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 16, "proj": 2}, "alpha_pattern": {"v_proj": 4}},
    {"r": 8, "lora_alpha": 16, "rank_pattern": {"self_attn.q_proj": 32, "q_proj": 2},
     "alpha_pattern": {"q_proj": 64, "self_attn.q_proj": 1}},
    {"r": 8, "lora_alpha": 16, "rank_pattern": {r"layers\.[01]\..*": 12, ".*_proj": 6},
     "alpha_pattern": {r"model\.layers\.\d+\.mlp\..*": 3.5}, "use_rslora": True},
    {"r": 4, "lora_alpha": 8, "rank_pattern": {"^model.layers.0.self_attn.q_proj": 24, "w[13]": 10},
     "alpha_pattern": {"experts.1.w1": 30, "dense": 5}},
    {"r": 8, "lora_alpha": 8, "rank_pattern": {"model.layers.1.mlp.down_proj": 3, "c_(attn|proj)": 7},
     "alpha_pattern": {"h.0.attn.c_attn": 2, "c_attn": 9}},
]


def _peft_matches(config: dict, name: str) -> bool:
    return bool(check_target_module_exists(LoraConfig(**config), name))


@pytest.mark.parametrize("config", MATCH_CONFIGS, ids=range(len(MATCH_CONFIGS)))
def test_matches_like_peft(config):
    rule = LoraRule(**config)
    peft_config = LoraConfig(**config)
    expected = [n for n in NAMES if check_target_module_exists(peft_config, n)]
    assert [n for n in NAMES if rule.matches(n)] == expected


@pytest.mark.parametrize("config", PATTERN_CONFIGS, ids=range(len(PATTERN_CONFIGS)))
def test_params_like_peft(config):
    rule = LoraRule(target_modules=["q_proj"], **config)
    peft_config = LoraConfig(target_modules=["q_proj"], **config)
    for name in NAMES:
        r = peft_config.rank_pattern.get(get_pattern_key(peft_config.rank_pattern.keys(), name), peft_config.r)
        alpha = peft_config.alpha_pattern.get(get_pattern_key(peft_config.alpha_pattern.keys(), name),
                                              peft_config.lora_alpha)
        scaling = alpha / math.sqrt(r) if peft_config.use_rslora else alpha / r
        assert rule.params(name) == LoraParams(r=r, alpha=alpha, scale=scaling), name


# ---------------------------------------------------------------- real get_peft_model runs

def _tree_model(paths: list[str]) -> torch.nn.Module:
    """A plain torch model whose Linear leaves sit at ``paths``."""
    root = torch.nn.Module()
    for path in paths:
        node = root
        *parents, leaf = path.split(".")
        for part in parents:
            if part not in node._modules:
                node.add_module(part, torch.nn.Module())
            node = node._modules[part]
        node.add_module(leaf, torch.nn.Linear(4, 4))
    return root


LEAVES = [n for n in NAMES if not any(other.startswith(n + ".") for other in NAMES)]
FULL_NAMES_21 = [n for n in LEAVES if n.startswith("model.layers.")][:21]

PEFT_RUN_CONFIGS = [
    *({**m, **p} for m, p in zip(MATCH_CONFIGS, PATTERN_CONFIGS * 5)),
    {"target_modules": "all-linear", "rank_pattern": {"fc1": 2}},
    {"target_modules": "All-Linear", "exclude_modules": ["lm_head", "score"]},
    {"target_modules": FULL_NAMES_21, "layers_to_transform": [0]},  # >= 20 entries: PEFT condenses to suffixes
    {"target_modules": FULL_NAMES_21[:19], "layers_to_transform": [0]},  # < 20: exact names skip the layer filter
    {"target_modules": [*FULL_NAMES_21, "q_proj"], "layers_to_transform": 1, "layers_pattern": "layers"},
]


def _wrapped(peft_model) -> dict[str, tuple[int, float, float]]:
    return {name: (m.r["default"], m.lora_alpha["default"], m.scaling["default"])
            for name, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def _selected(rule_or_set, paths, heads=()) -> dict[str, tuple[int, float, float]]:
    chosen = rule_or_set.select(paths, heads)
    return {p: (v.r, v.alpha, v.scale) for p, v in chosen.items()}


@pytest.mark.parametrize("config", PEFT_RUN_CONFIGS, ids=range(len(PEFT_RUN_CONFIGS)))
def test_select_like_get_peft_model(config):
    model = _tree_model(LEAVES)
    peft_config = LoraConfig(**config)
    containers = [n for n, m in model.named_modules() if n and not isinstance(m, torch.nn.Linear)]
    if any(check_target_module_exists(peft_config, n) for n in containers):
        pytest.skip("PEFT would try to wrap a container module")
    rule = LoraRule(**config)
    try:
        expected = _wrapped(get_peft_model(model, peft_config))
    except ValueError:  # PEFT found nothing to target (NoMatchingPeftModuleError and friends)
        with pytest.raises(RuleError, match="selects none"):
            rule.select(LEAVES)
        return
    assert _selected(rule, LEAVES) == expected


def _llama(layers=2, cls=tf.LlamaForCausalLM):
    return cls(tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                              num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))


def _gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32))


def _bert():
    return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                          num_attention_heads=2, intermediate_size=32, num_labels=3))


def _linear_paths(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


REAL = [
    ("llama", _llama, {}, ["lm_head"]),
    ("llama-3-layers", lambda: _llama(3), {}, ["lm_head"]),
    ("llama-seq-cls", lambda: _llama(2, tf.LlamaForSequenceClassification), {"task_type": "SEQ_CLS"}, ["score"]),
    ("gpt2", _gpt2, {}, ["lm_head"]),
    ("bert-seq-cls", _bert, {"task_type": "SEQ_CLS"}, ["classifier"]),
    ("bert-no-task", _bert, {}, []),
]


@pytest.mark.parametrize("make,extra,heads", [r[1:] for r in REAL], ids=[r[0] for r in REAL])
def test_all_linear_on_real_models(make, extra, heads):
    model = make()
    paths = _linear_paths(model)
    expected = _wrapped(get_peft_model(model, LoraConfig(target_modules="all-linear", r=4, lora_alpha=12, **extra)))
    rule = LoraRule(target_modules="all-linear", r=4, lora_alpha=12)
    assert _selected(rule, paths, heads) == expected
    assert set(heads) <= set(paths) and not set(heads) & set(expected)


@pytest.mark.parametrize("layers", [2, 3])
def test_full_name_lists_and_layer_filter_on_llama(layers):
    model = _llama(layers)
    paths = _linear_paths(model)
    config = {"target_modules": [p for p in paths if p != "lm_head"], "layers_to_transform": [0]}
    expected = _wrapped(get_peft_model(model, LoraConfig(**config)))
    assert _selected(LoraRule(**config), paths, ["lm_head"]) == expected
    assert len(expected) == (14 if layers == 2 else 7)  # 21 names are condensed to suffixes, then filtered


# ---------------------------------------------------------------- adapter_config.json written by PEFT

SAVED = [
    ("llama", _llama, ["lm_head"], {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "lora_alpha": 16,
                                    "rank_pattern": {"v_proj": 2}, "alpha_pattern": {r"layers\.1\..*": 3},
                                    "use_rslora": True, "layers_to_transform": [1, 0], "layers_pattern": "layers",
                                    "exclude_modules": ["model.layers.0.mlp.down_proj"]}),
    ("llama-regex", _llama, ["lm_head"], {"target_modules": r".*\.(k|o)_proj", "exclude_modules": r".*\.0\..*"}),
    ("gpt2-all-linear", _gpt2, ["lm_head"], {"target_modules": "all-linear", "r": 2, "lora_alpha": 5}),
    ("llama3-all-linear", lambda: _llama(3), ["lm_head"], {"target_modules": "all-linear"}),
]


@pytest.mark.parametrize("make,heads,config", [s[1:] for s in SAVED], ids=[s[0] for s in SAVED])
def test_from_peft_config_saved_by_peft(tmp_path, make, heads, config):
    model = make()
    paths = _linear_paths(model)
    peft_model = get_peft_model(model, LoraConfig(**config))
    expected = _wrapped(peft_model)
    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    for source in (tmp_path, tmp_path / "adapter_config.json", str(tmp_path), saved):
        rule = LoraRule.from_peft_config(source)
        assert _selected(rule, paths, heads) == expected
        assert rule.fan_in_fan_out == saved["fan_in_fan_out"]
    assert LoraRule.from_peft_config(tmp_path).name == tmp_path.name


@pytest.mark.parametrize("config,key", [
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"init_lora_weights": "olora"}, "init_lora_weights"),
])
def test_unsupported_configs_saved_by_peft(tmp_path, config, key):
    get_peft_model(_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], **config)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedError) as err:
        LoraRule.from_peft_config(tmp_path)
    assert str(tmp_path / "adapter_config.json") in str(err.value) and key in str(err.value)


def test_peft_variants_are_read_not_refused(tmp_path):
    """DoRA, bias training, modules_to_save and SEQ_CLS heads are adapter kinds now (tests/test_peft_variants*.py)."""
    config = LoraConfig(target_modules=["query"], task_type="SEQ_CLS", use_dora=True, bias="lora_only")
    get_peft_model(_bert(), config).save_pretrained(tmp_path)
    rule = LoraRule.from_peft_config(tmp_path)
    assert rule.use_dora and rule.target_modules == ["query"]


@pytest.mark.parametrize("extra,key", [
    ({"peft_type": "IA3"}, "peft_type"),
    ({"target_parameters": ["experts.gate_up_proj"]}, "target_parameters"),
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
    ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),
    ({"use_qalora": True}, "use_qalora"),
    ({"use_bdlora": {}}, "use_bdlora"),
    ({"arrow_config": {"top_k": 2}}, "arrow_config"),
    ({"kasa_config": {}}, "kasa_config"),
    ({"monteclora_config": {}}, "monteclora_config"),
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights"),
    ({"init_lora_weights": "corda"}, "init_lora_weights"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights"),
    ({"init_lora_weights": "lora_ga"}, "init_lora_weights"),
    ({"target_modules": None}, "target_modules"),
])
def test_unsupported_keys(tmp_path, extra, key):
    file = tmp_path / "adapter_config.json"
    file.write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], **extra}))
    with pytest.raises(UnsupportedError) as err:
        LoraRule.from_peft_config(file)
    assert str(file) in str(err.value) and key in str(err.value)


def test_from_peft_config_accepts_harmless_keys_and_supported_variants():
    rule = LoraRule.from_peft_config({"peft_type": "LORA", "target_modules": ["q_proj"], "r": 4, "lora_alpha": 8,
                                      "task_type": "CAUSAL_LM", "lora_dropout": 0.1,
                                      "init_lora_weights": "gaussian", "bias": "none", "use_dora": False,
                                      "modules_to_save": None, "rank_pattern": None, "alpha_pattern": {}})
    assert rule.params("model.layers.0.self_attn.q_proj") == LoraParams(r=4, alpha=8, scale=2.0)


def test_from_peft_config_missing_or_broken_file(tmp_path):
    with pytest.raises(AdapterError, match=str(tmp_path / "nope")):
        LoraRule.from_peft_config(tmp_path / "nope")
    with pytest.raises(AdapterError, match="adapter_config.json"):
        LoraRule.from_peft_config(tmp_path)  # a directory without the file
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        LoraRule.from_peft_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterError, match="not a JSON object"):
        LoraRule.from_peft_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"target_modules": ["q"], "r": -2}))
    with pytest.raises(RuleError, match=r"adapter_config\.json.*\br:"):
        LoraRule.from_peft_config(tmp_path)


# ---------------------------------------------------------------- validation mirrors LoraConfig

@pytest.mark.parametrize("config", [
    {"target_modules": "all-linear", "layers_to_transform": [0]},
    {"target_modules": r".*q_proj", "layers_to_transform": []},
    {"target_modules": r".*q_proj", "layers_pattern": "layers"},
    {"target_modules": ["q_proj"], "layers_pattern": "layers"},
])
def test_invalid_combinations_rejected_like_peft(config):
    with pytest.raises(ValueError):
        LoraConfig(**config)
    with pytest.raises(ValidationError):
        LoraRule(**config)


@pytest.mark.parametrize("config", [
    {"target_modules": ["q"], "r": 0},
    {"target_modules": ["q"], "rank_pattern": {"q": 0}},
    {"target_modules": "(unclosed"},
    {"target_modules": ["q"], "exclude_modules": "[bad"},
    {"target_modules": ["q"], "rank_pattern": {"(q": 4}},
    {"target_modules": ["q"], "layers_to_transform": 0, "layers_pattern": "(x"},
    {},
    {"target_modules": ["q"], "unknown": 1},
    {"target_modules": ["q"], "strategy": "lazy"},
])
def test_invalid_rules(config):
    with pytest.raises(ValidationError):
        LoraRule(**config)


def test_all_linear_needs_the_linear_layers():
    rule = LoraRule(name="every", target_modules="ALL-LINEAR")
    with pytest.raises(RuleError, match="every"):
        rule.matches("model.layers.0.mlp.up_proj")
    linears = frozenset({"model.layers.0.mlp.up_proj", "fc"})
    assert rule.matches("model.layers.0.mlp.up_proj", linears)
    assert rule.matches("block.fc", linears)  # list semantics, exactly as PEFT applies the expanded set
    assert not rule.matches("lm_head", linears)


def test_select_nothing_names_rule_and_examples():
    rule = LoraRule(name="attn-only", target_modules=["q_proj"])
    with pytest.raises(RuleError) as err:
        rule.select(["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_attn",
                     "lm_head"])
    assert "attn-only" in str(err.value) and "transformer.h.0.attn.c_attn" in str(err.value)


# ---------------------------------------------------------------- RuleSet and YAML

PATHS = [n for n in NAMES if n.startswith("model.layers.") or n == "lm_head"]


def test_ruleset_first_match_wins():
    first = LoraRule(name="q-big", target_modules=["q_proj"], r=16, lora_alpha=32)
    second = LoraRule(name="attn", target_modules=r".*self_attn\..*", r=4, strategy="dynamic")
    chosen = RuleSet(rules=[first, second]).select(PATHS, ["lm_head"])
    for path in PATHS:
        rule = first if first.matches(path) else second if second.matches(path) else None
        assert (chosen[path][0] if path in chosen else None) == rule
        if rule is not None:
            assert chosen[path][1] == rule.params(path)
    assert list(chosen) == [p for p in PATHS if p in chosen]


def test_ruleset_rule_selecting_nothing():
    good = LoraRule(name="q", target_modules=["q_proj"])
    with pytest.raises(RuleError, match="'nothing'"):
        RuleSet(rules=[good, LoraRule(name="nothing", target_modules=["wqkv"])]).select(PATHS)
    with pytest.raises(RuleError, match="'shadowed'.*earlier rules"):
        RuleSet(rules=[good, LoraRule(name="shadowed", target_modules=["self_attn.q_proj"])]).select(PATHS)


def test_yaml_single_rule_and_list(tmp_path):
    single = tmp_path / "one.yaml"
    single.write_text("name: attn\ntarget_modules: [q_proj, v_proj]\nr: 4\nlora_alpha: 8\n"
                      "rank_pattern: {'layers\\.1\\..*': 2}\nstrategy: dynamic\n")
    rule = LoraRule.from_yaml(single)
    assert rule == LoraRule(name="attn", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                            rank_pattern={r"layers\.1\..*": 2}, strategy="dynamic")
    assert RuleSet.from_yaml(single) == RuleSet(rules=[rule])
    several = tmp_path / "many.yaml"
    several.write_text("rules:\n  - {name: a, target_modules: '.*\\.q_proj', use_rslora: true}\n"
                       "  - {name: b, target_modules: all-linear, exclude_modules: [lm_head]}\n")
    rules = RuleSet.from_yaml(several).rules
    assert [r.name for r in rules] == ["a", "b"] and rules[0].target_modules == r".*\.q_proj"
    assert rules[0].use_rslora and rules[1].all_linear


@pytest.mark.parametrize("text,loader,fragments", [
    ("target_modules: [q]\nr: 0\n", LoraRule.from_yaml, ["r:"]),
    ("target_modules: [q]\nrank: 4\n", LoraRule.from_yaml, ["rank:"]),
    ("rules:\n  - {name: a, target_modules: [q]}\n  - {name: b, target_modules: [v], r: -1}\n",
     RuleSet.from_yaml, ["rules[1]", "'b'", "r:"]),
    ("rules:\n  - {name: z, target_modules: '(x', layers_to_transform: 1}\n", RuleSet.from_yaml, ["'z'"]),
    ("name: c\ntarget_modules: '[a'\n", RuleSet.from_yaml, ["rules[0]", "'c'", "target_modules"]),
    ("rules: []\n", RuleSet.from_yaml, ["rules:"]),
    ("target_modules: [q\n", LoraRule.from_yaml, ["not valid YAML"]),
])
def test_yaml_errors_name_file_rule_and_field(tmp_path, text, loader, fragments):
    file = tmp_path / "rules.yaml"
    file.write_text(text)
    with pytest.raises(RuleError) as err:
        loader(file)
    for fragment in [str(file), *fragments]:
        assert fragment in str(err.value)


def test_yaml_missing_file(tmp_path):
    with pytest.raises(RuleError, match="missing.yaml"):
        RuleSet.from_yaml(tmp_path / "missing.yaml")
