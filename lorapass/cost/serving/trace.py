"""Requests of a workload: arrival times, prompt and output lengths, adapter ids; seeded, or read from a trace.

Generated traces draw from four independent streams spawned from ``seed`` (adapter ids, prompt lengths, output
lengths, inter-arrival times), so changing one distribution leaves the other three draws unchanged.
``duration_s`` means ``round(rate * duration_s)`` requests (S-LoRA's generator), arriving at the cumulative sum
of the inter-arrival draws.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass

import numpy as np

from lorapass.cost.serving.workload import (GammaArrivals, LogNormalLength, PoissonArrivals, SkewedPopularity,
                                            TraceArrivals, UniformLength, WeightPopularity, WorkloadFile)
from lorapass.errors import SpecError

TRACE_COLUMNS = ("timestamp_s", "prompt_tokens", "output_tokens", "adapter")


@dataclass
class Requests:
    """One row per request, sorted by arrival."""

    arrival: np.ndarray  # seconds
    prompt: np.ndarray  # tokens
    output: np.ndarray  # tokens to generate (>= 1)
    adapter: np.ndarray  # index into the adapter set

    def __len__(self) -> int:
        return len(self.arrival)


def popularity(spec, n: int, source: str = "workload") -> np.ndarray:
    """Probability of each of the ``n`` adapters."""
    i = np.arange(n, dtype=float)
    if isinstance(spec, SkewedPopularity) and spec.kind == "zipf":
        w = 1.0 / (i + 1) ** spec.alpha
    elif isinstance(spec, SkewedPopularity):
        w = ((i + 1) / n) ** spec.alpha - (i / n) ** spec.alpha
    elif isinstance(spec, WeightPopularity):
        if len(spec.weights) != n:
            raise SpecError(f"{source}: popularity.weights: {len(spec.weights)} weights for {n} adapters")
        w = np.array(spec.weights, dtype=float)
        if w.sum() <= 0:
            raise SpecError(f"{source}: popularity.weights: all weights are zero")
    else:
        w = np.ones(n)
    return w / w.sum()


def expected_distinct(p: np.ndarray, batch: float | np.ndarray) -> np.ndarray:
    """E[distinct adapters among ``batch`` requests drawn from ``p``] = sum_i 1 - (1 - p_i)^batch."""
    b = np.asarray(batch, dtype=float)
    return (1.0 - np.power.outer(1.0 - np.asarray(p, dtype=float), b)).sum(axis=0)


def _lengths(spec, size: int, rng: np.random.Generator) -> np.ndarray:
    if isinstance(spec, UniformLength):
        return rng.integers(spec.low, spec.high + 1, size)
    if isinstance(spec, LogNormalLength):
        x = np.rint(spec.median * np.exp(spec.sigma * rng.standard_normal(size)))
        return np.clip(x, 1, spec.max).astype(np.int64)
    return np.full(size, spec.value, dtype=np.int64)


def _intervals(spec, size: int, rng: np.random.Generator) -> np.ndarray:
    if isinstance(spec, GammaArrivals):
        shape = 1.0 / spec.cv**2
        return rng.gamma(shape, 1.0 / (spec.rate * shape), size)
    return rng.exponential(1.0 / spec.rate, size)


def generate(wf: WorkloadFile, names: list[str]) -> Requests:
    """The workload's requests for the adapters ``names`` (the adapter set, in order)."""
    w = wf.workload
    if isinstance(w.arrivals, TraceArrivals):
        return read_trace(wf.path(w.arrivals.file), names)
    assert isinstance(w.arrivals, (PoissonArrivals, GammaArrivals))
    n = w.requests if w.requests is not None else max(1, round(w.arrivals.rate * w.duration_s))
    ids, prompt, output, gaps = np.random.default_rng(w.seed).spawn(4)
    p = popularity(w.popularity, len(names), wf.source)
    return Requests(arrival=np.cumsum(_intervals(w.arrivals, n, gaps)),
                    prompt=_lengths(w.prompt, n, prompt).astype(np.int64),
                    output=_lengths(w.output, n, output).astype(np.int64),
                    adapter=ids.choice(len(names), size=n, p=p).astype(np.int64))


def read_trace(path, names: list[str]) -> Requests:
    """A CSV trace (header ``timestamp_s,prompt_tokens,output_tokens,adapter``); SpecError naming file and line."""
    index = {name: k for k, name in enumerate(names)}
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or set(TRACE_COLUMNS) - set(reader.fieldnames):
                raise SpecError(f"{path}: a trace needs the header {','.join(TRACE_COLUMNS)}")
            for line, row in enumerate(reader, start=2):
                rows.append(_trace_row(path, line, row, index))
    except OSError as err:
        raise SpecError(f"{path}: cannot read the trace ({err.strerror or err})") from err
    except UnicodeDecodeError as err:
        raise SpecError(f"{path}: the trace is not UTF-8 text ({err})") from err
    if not rows:
        raise SpecError(f"{path}: the trace holds no requests")
    rows.sort(key=lambda r: r[0])
    t, p, o, a = (np.array(c) for c in zip(*rows))
    return Requests(t.astype(float), p.astype(np.int64), o.astype(np.int64), a.astype(np.int64))


def _trace_row(path, line: int, row: dict, index: dict[str, int]) -> tuple[float, int, int, int]:
    def number(key: str, cast, low: float):
        try:
            value = cast(row[key])
        except (TypeError, ValueError):
            raise SpecError(f"{path}:{line}: {key}: {row[key]!r} is not a number") from None
        if not value >= low:
            raise SpecError(f"{path}:{line}: {key}: {value} must be >= {low}")
        return value

    key = (row["adapter"] or "").strip()
    if key in index:
        adapter = index[key]
    elif key.isdigit() and int(key) < len(index):
        adapter = int(key)
    else:
        raise SpecError(f"{path}:{line}: adapter: {key!r} is neither an adapter name nor an index below {len(index)}")
    return (number("timestamp_s", float, 0.0), number("prompt_tokens", int, 1), number("output_tokens", int, 1),
            adapter)
