"""Checks on adapter tensors as they are read: floats only, finite values, a pickle payload that is tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from lorapass.errors import AdapterError

_ML_FLOATS = {np.dtype(t) for t in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)}


def checked(array: Any, key: str, file: str | Path) -> np.ndarray:
    """``array`` (numpy or torch) as float32; AdapterError naming ``key`` and ``file`` if it is not floating
    point or not finite.

    An integer or bool tensor is no LoRA factor (a cast would silently make one), and NaN or Inf would be
    written into every weight the adapter touches.
    """
    numpy = isinstance(array, np.ndarray)  # else a torch tensor (bfloat16, float8: dtypes numpy lacks)
    floating = (np.issubdtype(array.dtype, np.floating) or array.dtype in _ML_FLOATS) if numpy else array.is_floating_point()
    if not floating:
        raise AdapterError(f"{file}: tensor {key!r} has dtype {array.dtype}; LoRA weights must be floating point")
    out = array.astype(np.float32, copy=False) if numpy else array.float().numpy()
    bad = out.size - int(np.count_nonzero(np.isfinite(out)))
    if bad:
        nan = int(np.count_nonzero(np.isnan(out)))
        raise AdapterError(f"{file}: tensor {key!r} has {bad} non-finite value(s) of {out.size} "
                           f"({nan} NaN, {bad - nan} Inf)")
    return out


def pickle_payload(state: Any, file: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a ``torch.load``-ed adapter_model.bin, each :func:`checked`; AdapterError if it is not a
    dict of string keys to tensors."""
    import torch

    if not isinstance(state, dict):
        raise AdapterError(f"{file}: holds a {type(state).__name__}, not a dict of tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise AdapterError(f"{file}: entry {key!r} is a {type(value).__name__}, not a tensor under a string key")
    return {key: checked(value, key, file) for key, value in state.items()}
