"""PEFT adapter directories: adapter_config.json + adapter_model.safetensors, read lazily."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorapass.errors import AdapterError, UnsupportedError
from lorapass.rules import LoraRule
from lorapass.tensors import checked, pickle_payload

CONFIG = "adapter_config.json"
SAFETENSORS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"

# base_model.model.<module>.lora_A[.<adapter name>].weight
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight$")
_UNSUPPORTED = ("lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B", "lora_B.bias", "modules_to_save")


@dataclass
class Adapter:
    """One LoRA adapter: its rule (from the config) and its A [r, in] / B [out, r] matrices by module path."""

    directory: Path
    rule: LoraRule
    keys: dict[str, dict[str, str]] = field(default_factory=dict)  # module -> {"lora_A": key, "lora_B": key}
    _file: Path | None = None
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def modules(self) -> list[str]:
        return sorted(self.keys)

    def key(self, module: str, kind: str) -> str:
        return self.keys[module][kind]

    def tensor(self, module: str, kind: str) -> np.ndarray:
        """``lora_A`` or ``lora_B`` of ``module`` as float32."""
        return self._read(self.keys[module][kind])

    def shape(self, module: str, kind: str) -> tuple[int, ...]:
        return tuple(self._read(self.keys[module][kind]).shape)

    def _read(self, key: str) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = _read_tensor(self._file, key)
        return self._cache[key]


def _read_tensor(path: Path, key: str) -> np.ndarray:
    if path.name == PICKLE:
        return _pickle_tensors(path)[key]
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return checked(f.get_tensor(key), key, path)
    except TypeError:  # bfloat16 and other dtypes numpy lacks: read through torch
        pass
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise UnsupportedError(f"{path}: tensor {key!r} has a dtype numpy cannot read; install torch") from exc
    with safe_open(str(path), framework="pt") as f:
        return checked(f.get_tensor(key), key, path)


_PICKLED: dict[Path, dict[str, np.ndarray]] = {}


def _pickle_tensors(path: Path) -> dict[str, np.ndarray]:
    if path not in _PICKLED:
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterError(f"{path}: cannot be read with torch.load(weights_only=True): {exc}") from exc
        _PICKLED[path] = pickle_payload(state, path)
    return _PICKLED[path]


def _list_keys(path: Path) -> list[str]:
    if path.name == PICKLE:
        return list(_pickle_tensors(path))
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return list(f.keys())
    except Exception as exc:
        raise AdapterError(f"{path}: not a readable safetensors file ({exc})") from exc


def load_adapter(directory: str | os.PathLike, allow_pickle: bool = False) -> Adapter:
    """Read a PEFT adapter directory. ``adapter_model.bin`` is read only with ``allow_pickle``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"{directory}: no such adapter directory")
    rule = LoraRule.from_peft_config(directory / CONFIG)
    weights = directory / SAFETENSORS
    if not weights.is_file():
        if (directory / PICKLE).is_file():
            if not allow_pickle:
                raise AdapterError(
                    f"{directory}: only {PICKLE} is present; pickled weights are read only when allowed "
                    "(--allow-pickle), and then with torch.load(weights_only=True)"
                )
            weights = directory / PICKLE
        else:
            raise AdapterError(f"{directory}: missing {SAFETENSORS}")
    adapter = Adapter(directory, rule, _file=weights)
    for key in _list_keys(weights):
        if any(part in key for part in _UNSUPPORTED):
            raise UnsupportedError(f"{weights}: tensor {key!r} belongs to a PEFT feature lorapass does not implement")
        match = _KEY.match(key)
        if match is None:
            hint = (" (a full layer weight PEFT saves with save_embedding_layers; re-save the adapter with "
                    "save_embedding_layers=False if the base weights are unchanged)") if key.endswith(".weight") else ""
            raise UnsupportedError(f"{weights}: tensor {key!r} is not a LoRA A/B weight{hint}")
        adapter.keys.setdefault(match["module"], {})[match["kind"]] = key
    for module, kinds in adapter.keys.items():
        if set(kinds) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(kinds)).pop()
            raise AdapterError(f"{weights}: module {module!r} has no {missing} weight")
    if not adapter.keys:
        raise AdapterError(f"{weights}: holds no LoRA weights")
    return adapter
