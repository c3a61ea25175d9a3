"""Property-based fuzz of rule loading: whatever an adapter_config.json or a rules YAML holds, loading it and
matching it against module paths either works or raises one of lorapass's own errors."""

from __future__ import annotations

import json
import math
import warnings

import yaml
from hypothesis import HealthCheck, example, given, settings, strategies as st

from lorapass.errors import LorapassError, LorapassWarning
from lorapass.rules import MAX_RANK, PEFT_KEYS, LoraRule, RuleSet

PATHS = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj",
         "lm_head", "h.0.attn.c_attn"]
FIELDS = sorted(PEFT_KEYS | set(LoraRule.model_fields) | {"rules"})
REGEXES = ["(?i)q_proj", "(?P<idx>layers)", ".*", "[", ")", "q_proj|v_proj", "layers", r"\d+", "(a)\\1", "all-linear",
           "ALL-LINEAR", "*", "(?s)", "\\", "x{99999}"]

scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.floats()
           | st.text(max_size=12) | st.sampled_from(REGEXES))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | st.sampled_from(REGEXES), inner, max_size=4), max_leaves=12)
targets = st.one_of(st.sampled_from([["q_proj", "v_proj"], "all-linear", r".*\.(q|v)_proj", ["c_attn"], ["lm_head"]]),
                    st.sampled_from(REGEXES), values)
KNOWN = [  # the classes found by hand, always tried first
    {"target_modules": ["q_proj"], "rank_pattern": {"(?i)Q_PROJ": 2}},
    {"target_modules": ["q_proj"], "alpha_pattern": {"(?s)q_proj": 2}},
    {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "(?P<idx>layers)"},
    {"target_modules": ["q_proj"], "lora_alpha": float("nan")},
    {"target_modules": ["q_proj"], "alpha_pattern": {"q_proj": float("inf")}},
    {"target_modules": ["q_proj"], "r": 0},
    {"target_modules": ["q_proj"], "lora_alhpa": 16},
    {"target_modules": ["q_proj", "v_proj"], "layers_pattern": ["q_proj|v_proj"], "layers_to_transform": 0},
]
valid = st.fixed_dictionaries({"target_modules": targets}, optional={  # near-valid rules reach matching
    "r": st.integers(1, 8) | st.integers(-2, 70000), "lora_alpha": st.floats() | st.integers(), "use_rslora": st.booleans(),
    "rank_pattern": st.dictionaries(st.sampled_from(REGEXES) | st.text(max_size=6), st.integers(-1, 9), max_size=3),
    "alpha_pattern": st.dictionaries(st.sampled_from(REGEXES) | st.text(max_size=6), st.floats(), max_size=3),
    "layers_to_transform": st.integers(-1, 3) | st.lists(st.integers(0, 3), max_size=3),
    "layers_pattern": st.sampled_from(REGEXES) | st.lists(st.sampled_from(REGEXES), max_size=2),
    "exclude_modules": st.sampled_from(REGEXES) | st.lists(st.text(max_size=8), max_size=2)})
configs = st.one_of(valid, valid, valid, st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), values, max_size=8))
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def known(test):
    for config in KNOWN:
        test = example(config=config)(test)
    return test


def _exercise(rules: LoraRule | RuleSet) -> None:
    """Matching is where a composed regex would fail: select and resolve every path; a loaded rule never
    gives a rank outside 1..MAX_RANK or a scale that is not finite."""
    for rule in rules.rules if isinstance(rules, RuleSet) else [rules]:
        try:
            chosen = rule.select(PATHS, ["lm_head"])
        except LorapassError:
            continue
        for path in chosen:
            params = rule.params(path)
            assert 1 <= params.r <= MAX_RANK and math.isfinite(params.scale), (path, params)


@FUZZ
@known
@given(config=configs)
def test_adapter_config(tmp_path, config):
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(config))  # NaN / Infinity literals included, as PEFT's json.load accepts them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LorapassWarning)
        for policy in ("error", "warn"):
            try:
                _exercise(LoraRule.from_peft_config(path, unknown_keys=policy))
            except LorapassError:
                pass


@FUZZ
@known
@given(config=configs | st.lists(configs, max_size=3).map(lambda rules: {"rules": rules}))
def test_yaml_rules(tmp_path, config):
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        _exercise(RuleSet.from_yaml(path))
    except LorapassError:
        pass


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_yaml_text(tmp_path, text):
    path = tmp_path / "rules.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        _exercise(RuleSet.from_yaml(path))
        _exercise(LoraRule.from_yaml(path))
    except LorapassError:
        pass
