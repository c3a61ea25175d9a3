"""Group-wise integer quantization: ``W = (q - zero_point) * scale`` per group, read and requantized.

Every quantized store (:mod:`lorapass.onnx.quantized`) lays its weight out as groups (rows of a [G, L] array,
NaN where a group is shorter than L) with one scale and one zero point each, so one requantizer serves them all.
Requantizing a merged weight keeps each group's grid (its scale and zero point) and rounds the new values onto
it, unless refitting the group's grid to its new range, as a quantizer would, has a smaller error (a delta that
pushes values past the grid's ends); the choice is made per group.
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
    return ((q.astype(np.float32) - zero.astype(np.float32)[:, None]) * scale.astype(np.float32)[:, None]).astype(np.float32)


def _round(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, grid: Grid) -> np.ndarray:
    """float32 integers: w rounded onto the grids (a zero scale holds only the zero point)."""
    safe = np.where(scale == 0, 1, scale).astype(np.float32)[:, None]
    q = np.rint(np.nan_to_num(w) / safe + zero.astype(np.float32)[:, None])
    q = np.where(scale[:, None] == 0, np.rint(zero).astype(np.float32)[:, None], q)
    return np.clip(q, grid.qmin, grid.qmax)


def _refit(w: np.ndarray, zero: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """The smallest grid covering each group's range (with the group's zero point, when symmetric)."""
    low = np.minimum(np.nanmin(w, axis=1), 0).astype(np.float64)
    high = np.maximum(np.nanmax(w, axis=1), 0).astype(np.float64)
    if grid.symmetric:
        z = zero.astype(np.float64)
        up, down = grid.qmax - z, grid.qmin - z  # integer steps above and below the zero point
        with np.errstate(divide="ignore", invalid="ignore"):
            positive = np.maximum(np.where(up > 0, high / up, np.inf), np.where(down < 0, low / down, np.inf))
            negative = np.maximum(np.where(down < 0, high / -down, np.inf), np.where(up > 0, low / -up, np.inf))
        scale = np.where(grid.signed_scale & (negative < positive), -negative, positive)
        scale = np.where(np.isfinite(scale), scale, 0.0)
        return scale.astype(grid.scale_dtype), zero
    scale = ((high - low) / (grid.qmax - grid.qmin)).astype(grid.scale_dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(scale == 0, zero, grid.qmin - low / scale.astype(np.float64))
    z = z.astype(grid.scale_dtype) if grid.float_zero else np.clip(np.rint(z), grid.qmin, grid.qmax)
    return scale, z.astype(zero.dtype)


def _error(w: np.ndarray, q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Squared rounding error per group (float32 elements, float64 sums; NaN padding ignored)."""
    d = dequantize(q, scale, zero) - w
    return np.nansum(d * d, axis=1, dtype=np.float64)


def requantize(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, scale, zero) for float weights ``w`` [G, L] (NaN: padding) on ``grid``: each group keeps its scale and
    zero point, or gets the refitted ones where those round ``w`` with less error."""
    kept = _round(w, scale, zero, grid)
    fit_scale, fit_zero = _refit(w, zero, grid)
    fitted = _round(w, fit_scale, fit_zero, grid)
    better = _error(w, fitted, fit_scale, fit_zero) < _error(w, kept, scale, zero)
    q = np.where(better[:, None], fitted, kept)
    return q, np.where(better, fit_scale, scale).astype(scale.dtype), np.where(better, fit_zero, zero).astype(zero.dtype)
