"""PEFT adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors`` (``.bin`` only when allowed).

Keys are ``base_model.model.<module>.<role>`` with an optional adapter name before ``.weight``. Each module becomes
one kind (:mod:`lorapass.kinds`), its rank, alpha and scale resolved from the config exactly as PEFT does
(rank_pattern, alpha_pattern, rsLoRA):

- ``lora_A.weight`` / ``lora_B.weight`` (+ ``lora_B.bias`` with ``lora_bias``, + ``lora_magnitude_vector`` with DoRA);
- ``lora_embedding_A`` / ``lora_embedding_B`` (+ ``lora_magnitude_vector``): embedding LoRA / DoRA;
- ``token_adapter.trainable_tokens_delta``: new rows at the config's ``trainable_token_indices``;
- full tensors: ``base_layer.bias`` / ``<module>.bias`` (``bias="all"/"lora_only"``: replacement biases), and
  ``base_layer.weight`` / ``<module>.weight`` (``modules_to_save`` copies, ``save_embedding_layers``): a saved
  weight equal to the graph's changes nothing, a different one replaces it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lorapass.adapter import Adapter
from lorapass.errors import AdapterError, UnsupportedError
from lorapass.formats.tensors import TensorFile, TensorRef
from lorapass.kinds import Dora, EmbeddingDora, EmbeddingLora, Kind, Lora, Replace, TrainableTokens
from lorapass.rules import LoraRule

CONFIG = "adapter_config.json"
SAFETENSORS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"

_NAME = r"(?:\.[^.]+)?"  # an adapter name some PEFT versions keep in the key
_ROLES = {  # role -> key tail after the module path
    "lora_A": rf"lora_A{_NAME}\.weight",
    "lora_B": rf"lora_B{_NAME}\.weight",
    "lora_bias": rf"lora_B{_NAME}\.bias",
    "embedding_A": rf"lora_embedding_A{_NAME}",
    "embedding_B": rf"lora_embedding_B{_NAME}",
    "magnitude": rf"lora_magnitude_vector{_NAME}(?:\.weight)?",
    "token_rows": rf"token_adapter\.trainable_tokens_delta{_NAME}",
    "weight": r"(?:base_layer\.)?weight",
    "bias": r"(?:base_layer\.)?bias",
}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?:"
                  + "|".join(f"(?P<{role}>{tail})" for role, tail in _ROLES.items()) + ")$")
_LORA_ROLES = ("lora_A", "lora_B", "embedding_A", "embedding_B", "magnitude", "lora_bias")


def _weights_file(directory: Path, allow_pickle: bool) -> Path:
    weights = directory / SAFETENSORS
    if weights.is_file():
        return weights
    if (directory / PICKLE).is_file():
        if not allow_pickle:
            raise AdapterError(
                f"{directory}: only {PICKLE} is present; pickled weights are read only when allowed "
                "(--allow-pickle), and then with torch.load(weights_only=True)")
        return directory / PICKLE
    raise AdapterError(f"{directory}: missing {SAFETENSORS}")


def _roles(weights: Path, file: TensorFile) -> dict[str, dict[str, str]]:
    """Module path -> role -> key, for every key of the file (UnsupportedError naming a key of another method)."""
    modules: dict[str, dict[str, str]] = {}
    for key in file.keys():
        match = _KEY.match(key)
        if match is None or ".lora_" in match["module"] or ".token_adapter" in match["module"]:
            raise UnsupportedError(f"{weights}: tensor {key!r} is not a LoRA tensor lorapass can apply "
                                   "(LoRA A/B, lora_B.bias, DoRA magnitude, embedding LoRA, trainable tokens, or a full "
                                   "weight/bias)")
        role = next(r for r in _ROLES if match[r] is not None)
        roles = modules.setdefault(match["module"], {})
        if role in roles:
            raise AdapterError(f"{weights}: module {match['module']!r} has two {role} tensors: {roles[role]!r}, {key!r}")
        roles[role] = key
    return modules


def _token_indices(module: str, config: dict, weights: Path, key: str) -> list[int]:
    indices = config.get("trainable_token_indices")
    if isinstance(indices, dict):
        found = [v for name, v in indices.items() if module == name or module.endswith("." + name)]
        indices = found[0] if len(found) == 1 else None
    if not isinstance(indices, list) or not all(isinstance(i, int) for i in indices):
        raise AdapterError(f"{weights}: {key!r} holds trainable token rows, but {CONFIG}'s trainable_token_indices "
                           f"gives no index list for module {module!r} ({config.get('trainable_token_indices')!r})")
    return indices


def _kind(module: str, roles: dict[str, str], file: TensorFile, directory: Path, rule: LoraRule, config: dict,
          weights: Path) -> Kind:
    ref = {role: TensorRef(file, key) for role, key in roles.items()}
    full = {"replaced": {"bias": ref["bias"]} if "bias" in ref else {}, "saved_base": ref.get("weight")}
    if "token_rows" in ref:
        if len(ref) > 1:
            raise UnsupportedError(f"{weights}: module {module!r} has trainable token rows together with "
                                   f"{sorted(set(roles) - {'token_rows'})} ({list(roles.values())})")
        return TrainableTokens(module, directory, ref["token_rows"], _token_indices(module, config, weights, roles["token_rows"]))
    lora = [r for r in _LORA_ROLES if r in ref]
    if not lora:
        return Replace(module, directory, **full)
    pair = ("embedding_A", "embedding_B") if "embedding_A" in ref or "embedding_B" in ref else ("lora_A", "lora_B")
    for role in pair:
        if role not in ref:
            raise AdapterError(f"{weights}: module {module!r} has no {role.replace('embedding', 'lora_embedding')} "
                               f"weight (it has {list(roles.values())})")
    stray = set(lora) - {*pair, "magnitude", "lora_bias"}
    if stray or (pair[0] == "embedding_A" and "lora_bias" in ref):
        raise UnsupportedError(f"{weights}: module {module!r} mixes {sorted(lora)} ({list(roles.values())})")
    if rule.use_dora != ("magnitude" in ref):
        has = (f"has a DoRA magnitude {roles['magnitude']!r}, which PEFT would ignore" if "magnitude" in ref
               else "has no lora_magnitude_vector, which PEFT would start from the base weight's norms instead of "
                    "the trained values")
        raise AdapterError(f"{weights}: {CONFIG} sets use_dora={rule.use_dora}, but module {module!r} {has}")
    p = rule.params(module)
    args = (module, directory, ref[pair[0]], ref[pair[1]], p.r, p.alpha, p.scale)
    extra = {"bias": ref.get("lora_bias"), **full} if pair[0] == "lora_A" else full
    if "magnitude" not in ref:
        return (Lora if pair[0] == "lora_A" else EmbeddingLora)(*args, **extra)
    if "lora_bias" in ref:
        raise UnsupportedError(f"{weights}: module {module!r} has both a DoRA magnitude and lora_B.bias "
                               "(PEFT itself refuses DoRA with lora_bias)")
    extra.pop("bias", None)
    return (Dora if pair[0] == "lora_A" else EmbeddingDora)(*args, magnitude=ref["magnitude"], **extra)


def read(directory: Path, allow_pickle: bool = False) -> Adapter:
    """The PEFT adapter in ``directory``."""
    rule = LoraRule.from_peft_config(directory / CONFIG)
    config = json.loads((directory / CONFIG).read_text(encoding="utf-8"))  # valid: the rule was read from it
    weights = _weights_file(directory, allow_pickle)
    file = TensorFile(weights)
    modules = _roles(weights, file)
    if not modules:
        raise AdapterError(f"{weights}: holds no LoRA weights")
    adapter = Adapter(directory, rule, format="peft", files=[directory / CONFIG, weights])
    for module in sorted(modules):
        adapter.modules[module] = _kind(module, modules[module], file, directory, rule, config, weights)
    return adapter
