"""PEFT adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors`` (``.bin`` only when allowed).

Keys are ``base_model.model.<module>.lora_A[.<adapter name>].weight``; each module's rank, alpha and scale come
from the config exactly as PEFT resolves them (rank_pattern, alpha_pattern, rsLoRA).
"""

from __future__ import annotations

import re
from pathlib import Path

from lorapass.adapter import Adapter
from lorapass.errors import AdapterError, UnsupportedError
from lorapass.formats.tensors import TensorFile, TensorRef
from lorapass.kinds import Lora
from lorapass.rules import LoraRule

CONFIG = "adapter_config.json"
SAFETENSORS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<role>lora_A|lora_B)(?:\.[^.]+)?\.weight$")
_UNSUPPORTED = ("lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B", "lora_B.bias", "modules_to_save")


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


def read(directory: Path, allow_pickle: bool = False) -> Adapter:
    """The PEFT adapter in ``directory``."""
    rule = LoraRule.from_peft_config(directory / CONFIG)
    weights = _weights_file(directory, allow_pickle)
    file = TensorFile(weights)
    keys: dict[str, dict[str, str]] = {}
    for key in file.keys():
        if any(part in key for part in _UNSUPPORTED):
            raise UnsupportedError(f"{weights}: tensor {key!r} belongs to a PEFT feature lorapass does not implement")
        match = _KEY.match(key)
        if match is None:
            hint = (" (a full layer weight PEFT saves with save_embedding_layers; re-save the adapter with "
                    "save_embedding_layers=False if the base weights are unchanged)") if key.endswith(".weight") else ""
            raise UnsupportedError(f"{weights}: tensor {key!r} is not a LoRA A/B weight{hint}")
        keys.setdefault(match["module"], {})[match["role"]] = key
    if not keys:
        raise AdapterError(f"{weights}: holds no LoRA weights")
    adapter = Adapter(directory, rule, format="peft", files=[directory / CONFIG, weights])
    for module in sorted(keys):
        roles = keys[module]
        if set(roles) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(roles)).pop()
            raise AdapterError(f"{weights}: module {module!r} has no {missing} weight")
        p = rule.params(module)
        adapter.modules[module] = Lora(module, directory, TensorRef(file, roles["lora_A"]), TensorRef(file, roles["lora_B"]),
                                       p.r, p.alpha, p.scale)
    return adapter
