"""How much of an adapter's delta a lossy store keeps when merge writes it (a quantized weight is requantized):
per site ``1 - ||Q(W + dW) - (W + dW)|| / ||dW||``, with W the weight as stored (dequantized) and Q what the
store reads back after the write; the total takes the norms over every site."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

WARN_BELOW = 0.5
"""Warn when merge keeps less than this fraction of the delta."""


def _kept(delta: float, error: float) -> float:
    return 1.0 - error / delta if delta > 0 else 1.0


@dataclass(frozen=True)
class Loss:
    """One site's share of one store's write: ``delta`` = ||dW||, ``error`` = ||Q(W + dW) - (W + dW)|| (Frobenius,
    over the site's rows)."""

    path: str
    weight: str
    delta: float
    error: float

    @property
    def kept(self) -> float:
        return _kept(self.delta, self.error)


def measure(name: str, edits: list, base: np.ndarray, merged: np.ndarray, back: np.ndarray) -> list[Loss]:
    """The loss of each site (each distinct (path, rows) among ``edits``) of a store written with ``merged``."""
    out, seen = [], set()
    for edit in edits:
        rows = edit.rows.indices(base.shape[0])
        if (edit.path, rows) in seen:
            continue
        seen.add((edit.path, rows))
        block = slice(*rows)
        delta, error = _norm(merged[block] - base[block]), _norm(back[block] - merged[block])
        out.append(Loss(edit.path or name, name, delta, error))
    return out


def _norm(x: np.ndarray) -> float:
    """Frobenius norm of a float32 array, accumulated in float64 (no float64 copy of a large weight)."""
    flat = x.reshape(-1)
    return float(np.sqrt(np.einsum("i,i->", flat, flat, dtype=np.float64)))


def summary(losses: list[Loss]) -> dict | None:
    """The figures for reports and ``--json`` (None when no store lost anything: no lossy store was written)."""
    if not losses:
        return None
    sites: dict[str, list[float]] = {}
    for loss in losses:  # a module split over several stores has one loss per store
        acc = sites.setdefault(loss.path, [0.0, 0.0])
        acc[0] += loss.delta ** 2
        acc[1] += loss.error ** 2
    delta = math.sqrt(sum(d for d, _ in sites.values()))
    error = math.sqrt(sum(e for _, e in sites.values()))
    per_site = {path: {"kept": _kept(math.sqrt(d), math.sqrt(e)), "delta_norm": math.sqrt(d),
                       "error_norm": math.sqrt(e)} for path, (d, e) in sites.items()}
    kept = _kept(delta, error)
    low = sum(s["kept"] < WARN_BELOW for s in per_site.values())
    warning = None
    if kept < WARN_BELOW:
        warning = (f"merging into the quantized weights keeps {kept:.0%} of the adapter's delta ({low} of "
                   f"{len(per_site)} site(s) keep under half): requantization rounds the rest away; --strategy "
                   "dynamic applies the adapter exactly beside the quantized weights")
    return {"delta_kept": kept, "delta_norm": delta, "error_norm": error, "sites": per_site, "warning": warning}
