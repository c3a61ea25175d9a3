"""Declarative LoRA targeting with PEFT's exact semantics (checked against peft 0.21).

A :class:`LoraRule` says which linear sites of a graph get LoRA and with which rank, alpha and scale. Matching
reproduces ``peft.tuners.tuners_utils.check_target_module_exists`` and ``BaseTuner.inject_adapter`` on module paths
relative to the PEFT model root (``model.layers.0.self_attn.q_proj``):

* ``exclude_modules`` first: a string is ``re.fullmatch``-ed, a list entry matches equal or ``"." + entry`` suffix.
* ``target_modules`` as a string is ``re.fullmatch``-ed (``"q_proj"`` alone matches nothing); ``"all-linear"``
  (any case) means every linear site except the output heads. As a list, an exact path matches at once
  (``layers_to_transform`` is not applied), otherwise a ``"." + entry`` suffix matches and ``layers_to_transform``
  filters by the first ``<name>.<index>.`` segment (``<layers_pattern>.<index>.`` when given). Paths without an
  index never match then.
* PEFT condenses a list of 20 or more entries into minimal suffixes before matching; with ``layers_to_transform``
  this changes whether exact paths bypass the layer filter, so :meth:`LoraRule.select` does the same, using the
  site paths, their ancestors and the heads as the model's module names.
* ``rank_pattern``/``alpha_pattern``: the first key (in order) with ``re.match(rf"(.*\\.)?({key})$", path)`` wins.

:meth:`LoraRule.from_peft_config` refuses (``UnsupportedError``) what a plain ``W += scale * B @ A`` merge would
get silently wrong: ``peft_type`` other than LORA (LoHa, LoKr, IA3, ...), ``target_parameters``, ``layer_replication``,
``alora_invocation_tokens`` (aLoRA), ``use_qalora``, ``use_bdlora``, ``arrow_config``, ``kasa_config``,
``monteclora_config``, ``init_lora_weights`` of pissa*/olora/corda/loftq/lora_ga (the adapter is relative to a
modified base weight), and a missing ``target_modules`` (PEFT would pick per-architecture defaults). DoRA
(``use_dora``), ``lora_bias``, ``bias``, ``modules_to_save`` and ``trainable_token_indices`` are read into adapter
kinds (:mod:`lorapass.formats.peft`); ``use_dora`` is also a rule field, for DoRA-ready dynamic slots.

Keys of ``adapter_config.json`` (:data:`PEFT_KEYS` is PEFT 0.21's ``LoraConfig``, field by field): the keys above
are read or refused; the rest of PEFT's keys (:data:`HARMLESS_KEYS`: bookkeeping, dropout, training- and
initialisation-only settings) cannot change the merged or dynamic weights and are accepted silently. Any other
key is unknown: a misspelling (``lora_alhpa``) or a newer PEFT feature, either of which could change the
result, so it is a RuleError naming the key and the closest known key, unless unknown keys are allowed
(``unknown_keys="warn"``, :func:`allow_unknown_keys`, the CLI's ``--allow-unknown-keys``): then a
:class:`~lorapass.errors.LorapassWarning` says the same and the key is ignored, as PEFT itself does.

Values are checked where PEFT would only fail later or compute nonsense: ``lora_alpha`` and ``alpha_pattern``
must be finite float32 values (negative alpha, PEFT's adapter negation, is allowed), ranks are 1..:data:`MAX_RANK`, and
``rank_pattern``/``alpha_pattern`` keys and ``layers_pattern`` must compile in the composed expressions that
matching uses (an inline flag such as ``(?i)`` or a group named ``idx`` compiles alone but not there).
"""

from __future__ import annotations

import contextvars
import difflib
import json
import math
import re
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorapass.errors import AdapterError, LorapassWarning, RuleError, UnsupportedError

ALL_LINEAR = "all-linear"
PEFT_CONFIG = "adapter_config.json"
_CONDENSE_AT = 20  # PEFT's MIN_TARGET_MODULES_FOR_OPTIMIZATION
_RESIDUAL_INITS = ("olora", "corda", "loftq", "lora_ga")
MAX_RANK = 65536
"""The largest rank accepted (vLLM serves up to 512; a larger "rank" is a typo that would exhaust memory)."""
_PEFT_FIELDS = ("r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out", "use_dora")
PEFT_KEYS = frozenset((
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora",
    "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "megatron_config", "megatron_core", "trainable_token_indices", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "use_dora", "velora_config", "alora_invocation_tokens", "use_qalora", "qalora_group_size",
    "monteclora_config", "layer_replication", "runtime_config", "lora_bias", "target_parameters", "use_bdlora",
    "arrow_config", "kasa_config", "ensure_weight_tying"))
"""Every field of PEFT 0.21's ``LoraConfig`` (with ``PeftConfig``'s): the keys an adapter_config.json may have."""
_FLOAT32_MAX = 3.4028234663852886e38
Alpha = Annotated[float, Field(allow_inf_nan=False, ge=-_FLOAT32_MAX, le=_FLOAT32_MAX)]
"""A finite alpha that fits float32 (scales are applied in float32); negative alpha negates the adapter."""
_UNKNOWN_KEYS: contextvars.ContextVar[str] = contextvars.ContextVar("lorapass_unknown_keys", default="error")


def _given(value: Any) -> bool:
    return value is not None


_UNSUPPORTED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("peft_type", lambda v: v is not None and v != "LORA", "only LoRA adapters (with DoRA) are supported"),
    ("target_parameters", bool, "LoRA on bare parameters (e.g. MoE expert tensors)"),
    ("layer_replication", bool, "layers are replicated"),
    ("alora_invocation_tokens", bool, "aLoRA only applies after its invocation tokens"),
    ("use_qalora", bool, "QALoRA feeds pooled inputs to A"),
    ("use_bdlora", _given, "BD-LoRA uses block-diagonal factors"),
    ("arrow_config", _given, "Arrow routes tokens among adapters"),
    ("kasa_config", _given, "KaSA truncates the base weight and scales B @ A by a learned diagonal"),
    ("monteclora_config", _given, "MonteCLoRA samples the adapter"),
    ("init_lora_weights", lambda v: isinstance(v, str) and (v.startswith("pissa") or v in _RESIDUAL_INITS),
     "the adapter is relative to a modified base weight (save it with path_initial_model_for_weight_conversion)"),
    ("target_modules", lambda v: v is None, "PEFT would choose per-architecture defaults"),
)
ADAPTER_KEYS = frozenset(("bias", "lora_bias", "modules_to_save", "trainable_token_indices"))
"""Keys whose tensors the PEFT reader turns into adapter kinds (:mod:`lorapass.formats.peft`)."""
HARMLESS_KEYS = PEFT_KEYS - set(_PEFT_FIELDS) - ADAPTER_KEYS - {key for key, _, _ in _UNSUPPORTED}
"""PEFT keys lorapass ignores because they cannot change the weights: bookkeeping (task_type, peft_version,
base_model_name_or_path, revision, inference_mode, auto_mapping), lora_dropout (inactive at inference),
training-only settings (megatron_*, velora_config, runtime_config, ensure_weight_tying: tied adapters show up
as tensors, which are checked), and the configs of initialisations whose use ``init_lora_weights`` decides."""


@contextmanager
def allow_unknown_keys() -> Iterator[None]:
    """Within the block, unknown adapter_config.json keys are warned about and ignored instead of refused."""
    token = _UNKNOWN_KEYS.set("warn")
    try:
        yield
    finally:
        _UNKNOWN_KEYS.reset(token)


class LoraParams(BaseModel, frozen=True):
    """What one site gets."""

    r: int
    alpha: float
    scale: float  # alpha / r, or alpha / sqrt(r) with use_rslora


class LoraRule(BaseModel):
    """Which linear sites get LoRA, and with which rank and alpha (PEFT ``LoraConfig`` semantics)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "lora"
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    r: int = Field(8, gt=0, le=MAX_RANK)
    lora_alpha: Alpha = 8
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, Alpha] = {}
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    use_dora: bool = False  # DoRA: a per-output factor input on every dynamic slot (plain LoRA files run with it = 1)
    strategy: Literal["merge", "dynamic", "multi"] = "merge"
    fuse_shared_inputs: bool = False  # one A product for sites reading one activation (dynamic); slower on ORT CPU

    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _regex_compiles(cls, value: list[str] | str | None) -> list[str] | str | None:
        if isinstance(value, str) and value.lower() != ALL_LINEAR:
            _compile(value)
        return value

    @field_validator("layers_pattern")
    @classmethod
    def _patterns_compile(cls, value: str | list[str] | None) -> str | list[str] | None:
        for pattern in [value] if isinstance(value, str) else value or ():
            _compile(pattern, _layer_regex(pattern))
        return value

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _keys_compile(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            _compile(key, _pattern_regex(key))
        return value

    @field_validator("rank_pattern")
    @classmethod
    def _ranks_positive(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {k: r for k, r in value.items() if not 0 < r <= MAX_RANK}
        if bad:
            raise ValueError(f"ranks must be 1..{MAX_RANK}, got {bad}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> LoraRule:
        if self.target_modules is None:
            raise ValueError("target_modules is required (a suffix list, a regex string or 'all-linear')")
        if isinstance(self.target_modules, str):
            for field in ("layers_to_transform", "layers_pattern"):
                if getattr(self, field) is not None:
                    raise ValueError(f"{field} cannot be used when target_modules is a string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform")
        return self

    @property
    def all_linear(self) -> bool:
        return isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR

    def matches(self, path: str, all_linear_suffixes: frozenset[str] | None = None) -> bool:
        """Whether PEFT targets ``path``; "all-linear" needs its expansion (PEFT's resolved target_modules)."""
        targets = self.target_modules
        if self.all_linear:
            if all_linear_suffixes is None:
                raise RuleError(f"rule {self.name!r}: 'all-linear' needs the graph's linear layers; use select()")
            targets = all_linear_suffixes
        return self._matches(path, targets)

    def params(self, path: str) -> LoraParams:
        """Rank, alpha and scale of ``path`` after rank_pattern/alpha_pattern, as PEFT resolves them."""
        r = _pattern_value(self.rank_pattern, path, self.r)
        alpha = _pattern_value(self.alpha_pattern, path, self.lora_alpha)
        scale = alpha / math.sqrt(r) if self.use_rslora else alpha / r
        return LoraParams(r=r, alpha=alpha, scale=scale)

    def select(self, paths: Sequence[str], output_heads: Collection[str] = ()) -> dict[str, LoraParams]:
        """The sites among ``paths`` this rule targets, in order; RuleError if none."""
        targets = self._targets(paths, output_heads)
        chosen = {path: self.params(path) for path in paths if self._matches(path, targets)}
        if not chosen:
            raise RuleError(f"rule {self.name!r} selects none of the {len(paths)} linear sites "
                            f"(target_modules={self.target_modules!r}; sites look like {_examples(paths)})")
        return chosen

    @classmethod
    def from_peft_config(cls, config: dict[str, Any] | str | Path,
                         unknown_keys: Literal["error", "warn"] | None = None) -> LoraRule:
        """The rule of a PEFT ``adapter_config.json`` (a dict, the file, or its directory).

        A key PEFT 0.21 does not know is a RuleError, or with ``unknown_keys="warn"`` (default: "error", or
        "warn" inside :func:`allow_unknown_keys`) a LorapassWarning; either names the closest known key.
        """
        if isinstance(config, dict):
            source, name, data = "adapter config", "lora", config
        else:
            file = Path(config)
            file = file / PEFT_CONFIG if file.is_dir() else file
            source, name = str(file), file.parent.name or "lora"
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except OSError as err:
                raise AdapterError(f"{file}: cannot read the adapter config ({err.strerror or err})") from err
            except ValueError as err:
                raise AdapterError(f"{file}: the adapter config is not valid JSON ({err})") from err
            except RecursionError:
                raise AdapterError(f"{file}: the adapter config is nested too deeply to be a PEFT config") from None
            if not isinstance(data, dict):
                raise AdapterError(f"{file}: the adapter config is not a JSON object")
        _check_keys(data, source, unknown_keys or _UNKNOWN_KEYS.get())
        for key, unsupported, why in _UNSUPPORTED:
            if unsupported(data.get(key)):
                raise UnsupportedError(f"{source}: {key}={data.get(key)!r} is not supported: {why}")
        fields = {key: data[key] for key in _PEFT_FIELDS if key in data}
        for key in ("rank_pattern", "alpha_pattern"):
            fields[key] = fields.get(key) or {}
        return _validated(cls, {"name": name, **fields}, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> LoraRule:
        """One rule mapping from a YAML file."""
        return _validated(cls, _load_yaml(path), str(path))

    def _targets(self, paths: Sequence[str], output_heads: Collection[str]) -> str | Collection[str]:
        """target_modules as PEFT's inject_adapter resolves them for a model with these linear sites."""
        if self.all_linear:
            return set(paths) - set(output_heads)
        targets = self.target_modules
        if not isinstance(targets, str) and len(set(targets)) >= _CONDENSE_AT and self._uses_layers():
            targets = _condense(targets, _module_names([*paths, *output_heads]))
        return targets

    def _matches(self, path: str, targets: str | Collection[str]) -> bool:
        excluded = self.exclude_modules
        if excluded:
            if isinstance(excluded, str):
                if re.fullmatch(excluded, path):
                    return False
            elif path in excluded or any(path.endswith("." + entry) for entry in excluded):
                return False
        if isinstance(targets, str):
            return re.fullmatch(targets, path) is not None
        if path in targets:
            return True
        return any(path.endswith("." + entry) for entry in targets) and self._in_layers(path)

    def _uses_layers(self) -> bool:
        return self.layers_to_transform is not None and self.layers_to_transform != []

    def _in_layers(self, path: str) -> bool:
        if not self._uses_layers():
            return True
        if not self.layers_pattern:
            found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
        else:
            patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
            found = next((m for p in patterns if (m := re.match(_layer_regex(p), path))), None)
        if found is None:
            return False
        if found.group("idx") is None:  # PEFT's int(match.group(1)) fails the same way
            raise RuleError(f"rule {self.name!r}: layers_pattern {self.layers_pattern!r} matches {path!r} without "
                            "reaching the layer index (a '|' outside a group?)")
        index = int(found.group("idx"))
        layers = self.layers_to_transform
        return index == layers if isinstance(layers, int) else index in layers


class RuleSet(BaseModel):
    """Several rules; the first rule that matches a site wins."""

    model_config = ConfigDict(extra="forbid")

    rules: list[LoraRule] = Field(min_length=1)
    aliases: dict[str, str] = Field(default_factory=dict)
    """Graph path components -> PEFT's (``{attn: self_attn}``), for exporters lorapass has no dialect for."""

    @field_validator("aliases")
    @classmethod
    def _aliases_valid(cls, value: dict[str, str]) -> dict[str, str]:
        from lorapass.onnx.dialects import parse_aliases

        try:
            return parse_aliases(value)
        except RuleError as err:
            raise ValueError(str(err)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> RuleSet:
        """A YAML file holding one rule mapping or ``{rules: [...]}`` (either may have ``aliases``)."""
        data = _load_yaml(path)
        if isinstance(data, dict) and "rules" not in data:
            rule = dict(data)
            data = {"rules": [rule]} | ({"aliases": rule.pop("aliases")} if "aliases" in rule else {})
        return _validated(cls, data, str(path))

    def select(self, paths: Sequence[str],
               output_heads: Collection[str] = ()) -> dict[str, tuple[LoraRule, LoraParams]]:
        """Each targeted site with the first rule matching it; RuleError naming a rule that selects nothing."""
        chosen: dict[str, tuple[LoraRule, LoraParams]] = {}
        for rule in self.rules:
            fresh = {p: (rule, params) for p, params in rule.select(paths, output_heads).items() if p not in chosen}
            if not fresh:
                raise RuleError(f"rule {rule.name!r} selects nothing: earlier rules already take every site it matches")
            chosen.update(fresh)
        return {path: chosen[path] for path in paths if path in chosen}


def _check_keys(data: dict[str, Any], source: str, policy: str) -> None:
    """Refuse (or with policy "warn", warn about) keys that are not PEFT LoraConfig fields."""
    for key in data:
        if key in PEFT_KEYS:
            continue
        close = difflib.get_close_matches(str(key), sorted(PEFT_KEYS), n=1, cutoff=0.6)
        hint = f"closest known key: {close[0]!r}" if close else "no PEFT 0.21 LoraConfig field is close"
        message = f"{source}: unknown key {key!r} ({hint})"
        if policy != "warn":
            raise RuleError(f"{message}; it could change the result, so it is not ignored: "
                            "correct it, or allow unknown keys (--allow-unknown-keys) to ignore it as PEFT does")
        warnings.warn(f"{message}: ignored", LorapassWarning, stacklevel=3)


def _compile(pattern: str, composed: str | None = None) -> None:
    """``pattern`` and the expression matching builds around it must compile (ValueError naming ``pattern``)."""
    for text in dict.fromkeys([pattern, composed or pattern]):
        try:
            re.compile(text)
        except (re.error, RecursionError, OverflowError) as err:
            where = "" if text == pattern else f" (as matching uses it, {text!r})"
            raise ValueError(f"invalid regular expression {pattern!r}{where}: {err}") from None


def _pattern_regex(key: str) -> str:
    """How PEFT's get_pattern_key matches a rank_pattern/alpha_pattern key against a module path."""
    return rf"(.*\.)?({key})$"


def _layer_regex(pattern: str) -> str:
    """How PEFT finds the layer index after ``layers_pattern`` in a module path."""
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


def _pattern_value(pattern: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's get_pattern_key + dict lookup: the first key matching a trailing dotted part of ``path``."""
    key = next((k for k in pattern if re.match(_pattern_regex(k), path)), path)
    return pattern.get(key, default)


def _suffixes(name: str) -> list[str]:
    """Dotted suffixes of ``name``, shortest first (``a.b.c`` -> ``c``, ``b.c``, ``a.b.c``)."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]


def _module_names(paths: Sequence[str]) -> set[str]:
    """The paths and all their ancestor modules."""
    return {".".join(parts[:i]) for parts in (p.split(".") for p in paths) for i in range(1, len(parts) + 1)}


def _condense(targets: Collection[str], names: set[str]) -> Collection[str]:
    """PEFT's _find_minimal_target_modules as inject_adapter applies it: the fewest suffixes that still separate
    the targets from every other module name; the targets unchanged unless that set is smaller."""
    ends = tuple("." + t for t in targets)
    blocked = {s for n in names if n not in targets and not n.endswith(ends) for s in _suffixes(n)}
    required: set[str] = set()
    for item, suffixes in sorted(((t, _suffixes(t)) for t in set(targets)), key=lambda pair: pair[1]):
        if any(item.endswith("." + s) for s in required):
            continue
        suffix = next((s for s in suffixes if s not in blocked), None)
        if suffix is not None:
            required.add(suffix)
    return required if 0 < len(required) < len(set(targets)) else targets


def _examples(paths: Sequence[str], count: int = 3) -> str:
    return ", ".join(paths[:count]) + (", ..." if len(paths) > count else "") if paths else "(none)"


def _load_yaml(path: str | Path) -> Any:
    import yaml  # only rules files need it: adapters and the command line do not pay for it

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise RuleError(f"{path}: cannot read the rules file ({err.strerror or err})") from err
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RuleError(f"{path}: not valid YAML ({err})") from err
    except RecursionError:
        raise RuleError(f"{path}: the rules are nested too deeply") from None


def _validated(model: type[Any], data: Any, source: str) -> Any:
    """``model(**data)`` with pydantic errors turned into a RuleError naming the source, rule and field."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise RuleError(f"{source}: " + "; ".join(_describe(e, data) for e in err.errors())) from None
    except RecursionError:
        raise RuleError(f"{source}: the rules are nested too deeply") from None


def _describe(error: Any, data: Any) -> str:
    loc, where, rule = list(error["loc"]), "", data
    if loc[:1] == ["rules"] and len(loc) > 1 and isinstance(loc[1], int):
        rules = data.get("rules") if isinstance(data, dict) else None
        rule = rules[loc[1]] if isinstance(rules, list) and loc[1] < len(rules) else None
        where, loc = f"rules[{loc[1]}] ", loc[2:]
    if isinstance(rule, dict) and "name" in rule:
        where += f"(rule {rule['name']!r}) "
    msg = error["msg"]
    if error["type"] == "extra_forbidden" and loc:
        close = difflib.get_close_matches(str(loc[-1]), sorted(LoraRule.model_fields), n=1, cutoff=0.6)
        msg = "unknown key" + (f" (closest known key: {close[0]!r})" if close else "")
    return f"{where}{'.'.join(map(str, loc)) or 'rule'}: {msg}"
