"""Tensor files an adapter's weights live in, read lazily: safetensors (any float dtype; bfloat16 through torch)
and, only when allowed, a pickled ``.bin`` read with ``torch.load(weights_only=True)``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorapass.errors import AdapterError, UnsupportedError
from lorapass.tensors import checked, pickle_payload


@dataclass
class TensorFile:
    """One file of named tensors; ``read(key)`` gives float32, cached."""

    path: Path
    _keys: list[str] | None = None
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _pickled: dict[str, np.ndarray] | None = field(default=None, repr=False)
    _shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    @property
    def pickled(self) -> bool:
        return self.path.suffix == ".bin"

    def keys(self) -> list[str]:
        if self._keys is None:
            if self.pickled:
                self._keys = list(self._unpickle())
            else:
                from safetensors import safe_open

                try:
                    with safe_open(str(self.path), framework="numpy") as f:
                        self._keys = list(f.keys())
                        self._shapes = {k: tuple(f.get_slice(k).get_shape()) for k in self._keys}
                except Exception as exc:
                    raise AdapterError(f"{self.path}: not a readable safetensors file ({exc})") from exc
        return self._keys

    def metadata(self) -> dict[str, str]:
        """The safetensors header's ``__metadata__`` (empty for pickles)."""
        if self.pickled:
            return {}
        from safetensors import safe_open

        with safe_open(str(self.path), framework="numpy") as f:
            return dict(f.metadata() or {})

    def read(self, key: str) -> np.ndarray:
        if key not in self._cache:
            if self.pickled:
                self._cache[key] = self._unpickle()[key]
            else:
                self._read_safetensors()
        return self._cache[key]

    def scalar(self, key: str) -> float:
        """The one value of ``key`` (a network alpha); AdapterError naming it if it holds more or none."""
        value = self.read(key)
        if value.size != 1:
            raise AdapterError(f"{self.path}: tensor {key!r} has shape {list(value.shape)}; an alpha is one value")
        return float(value.reshape(-1)[0])

    def shape(self, key: str) -> tuple[int, ...]:
        if not self.pickled:
            self.keys()
            if key in self._shapes:  # from the header: no tensor read
                return self._shapes[key]
        return tuple(self.read(key).shape)

    def _read_safetensors(self) -> None:
        """Every tensor of the file, in one open (per-key opens cost milliseconds each on files of many tensors)."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="numpy") as f:
            torch_keys = []
            for key in f.keys():
                try:
                    self._cache[key] = checked(f.get_tensor(key), key, self.path)
                except TypeError:  # bfloat16 and other dtypes numpy lacks: read through torch
                    torch_keys.append(key)
        if not torch_keys:
            return
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            raise UnsupportedError(f"{self.path}: tensor {torch_keys[0]!r} has a dtype numpy cannot read; "
                                   "install torch") from exc
        with safe_open(str(self.path), framework="pt") as f:
            for key in torch_keys:
                self._cache[key] = checked(f.get_tensor(key), key, self.path)

    def _unpickle(self) -> dict[str, np.ndarray]:
        if self._pickled is None:
            import torch

            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise AdapterError(f"{self.path}: cannot be read with torch.load(weights_only=True): {exc}") from exc
            self._pickled = pickle_payload(state, self.path)
        return self._pickled


@dataclass(frozen=True)
class TensorRef:
    """One tensor of a file, read on first use."""

    file: TensorFile
    key: str

    def read(self) -> np.ndarray:
        return self.file.read(self.key)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.file.shape(self.key)

    def rank(self, axis: int) -> int:
        """The LoRA rank this tensor's ``axis`` gives; AdapterError naming it if it has no such axis or it is 0."""
        shape = self.shape
        if len(shape) <= axis or shape[axis] < 1:
            raise AdapterError(f"{self.file.path}: tensor {self.key!r} has shape {list(shape)}: no rank on its axis "
                               f"{axis}, so it is no LoRA factor")
        return shape[axis]
