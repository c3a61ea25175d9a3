"""Group-wise integer quantization: ``W = (q - zero_point) * scale`` per group, read and requantized.

Every quantized store (:mod:`lorapass.onnx.quantized`) lays its weight out as groups (rows of a [G, L] array, zero
where a group is shorter than L: every grid holds zero) with one scale and one zero point each, so one
requantizer serves them all. Requantizing a merged weight keeps each group's grid (its scale and zero point) and
rounds the new values onto it; a group whose values fall outside its grid is refitted to its new range, as a
quantizer would, where that rounds it with less error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """One quantization scheme: integers in [qmin, qmax]; ``symmetric`` grids keep their zero points (a refit
    changes only the scale), asymmetric ones refit both; ``signed_scale`` allows negative scales (MatMulNBits'
    own convention); ``float_zero`` zero points are stored in the scales' float type, not rounded."""

    qmin: int
    qmax: int
    symmetric: bool
    signed_scale: bool = False
    float_zero: bool = False
    scale_dtype: np.dtype = np.dtype(np.float32)


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """[G, L] float32 weights from integers ``q`` [G, L] and per-group ``scale``, ``zero`` [G]."""
    return (q.astype(np.float32) - zero.astype(np.float32)[:, None]) * scale.astype(np.float32)[:, None]


def _scaled(w: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """w / scale + zero (a zero scale maps everything to its zero point)."""
    safe = np.where(scale == 0, 1, scale).astype(np.float32)[:, None]
    return np.where(scale[:, None] == 0, zero.astype(np.float32)[:, None], w / safe + zero.astype(np.float32)[:, None])


def _round(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, grid: Grid) -> np.ndarray:
    return np.clip(np.rint(_scaled(w, scale, zero)), grid.qmin, grid.qmax)


def _refit(w: np.ndarray, zero: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """The smallest grid covering each group's range (with the group's zero point, when symmetric)."""
    low = np.minimum(w.min(axis=1), 0).astype(np.float64)
    high = np.maximum(w.max(axis=1), 0).astype(np.float64)
    if grid.symmetric:
        up, down = grid.qmax - zero, grid.qmin - zero  # integer steps above and below the zero point
        with np.errstate(divide="ignore", invalid="ignore"):
            positive = np.maximum(np.where(up > 0, high / up, np.inf), np.where(down < 0, low / down, np.inf))
            negative = np.maximum(np.where(down < 0, high / -down, np.inf), np.where(up > 0, low / -up, np.inf))
        scale = np.where(grid.signed_scale & (negative < positive), -negative, positive)
        return np.where(np.isfinite(scale), scale, 0.0).astype(grid.scale_dtype), zero
    scale = ((high - low) / (grid.qmax - grid.qmin)).astype(grid.scale_dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(scale == 0, zero, grid.qmin - low / scale.astype(np.float64))
    z = z.astype(grid.scale_dtype) if grid.float_zero else np.clip(np.rint(z), grid.qmin, grid.qmax)
    return scale, z.astype(zero.dtype)


def _error(w: np.ndarray, q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Squared rounding error per group (float32 elements, float64 sums)."""
    d = dequantize(q, scale, zero) - w
    return np.einsum("gl,gl->g", d, d, dtype=np.float64)


def requantize(w: np.ndarray, scale: np.ndarray, zero: np.ndarray,
               grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, scale, zero) for float32 weights ``w`` [G, L] on ``grid``: every group keeps its scale and zero point;
    a group with values outside its grid (or a zero scale) gets the refitted ones where those round it better."""
    raw = _scaled(w, scale, zero)
    q = np.clip(np.rint(raw), grid.qmin, grid.qmax)
    outside = ((raw < grid.qmin - 0.5) | (raw > grid.qmax + 0.5)).any(axis=1) | ((scale == 0) & (w != 0).any(axis=1))
    groups = np.flatnonzero(outside)
    scale, zero = scale.copy(), zero.copy()
    if groups.size:
        part = w[groups]
        fit_scale, fit_zero = _refit(part, zero[groups], grid)
        fitted = _round(part, fit_scale, fit_zero, grid)
        better = _error(part, fitted, fit_scale, fit_zero) < _error(part, q[groups], scale[groups], zero[groups])
        chosen = groups[better]
        q[chosen], scale[chosen], zero[chosen] = fitted[better], fit_scale[better], fit_zero[better]
    return q, scale, zero
