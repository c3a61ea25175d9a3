"""The workload file (``W.yaml``) of ``lorapass analyse --workload``: a pydantic schema whose errors name the key.

```yaml
adapters:            # count + ranks (round-robin, as S-LoRA assigns them) + target_modules; or rules; or dirs
  count: 100
  ranks: [8, 16, 32, 64]
  target_modules: [q_proj, k_proj, v_proj, o_proj]
popularity: {kind: zipf, alpha: 1.0}        # uniform | zipf | power (S-LoRA's) | weights
arrivals: {kind: poisson, rate: 10}         # poisson | gamma (rate, cv) | trace (CSV file)
prompt: {kind: uniform, low: 8, high: 511}  # fixed (value) | uniform (low, high inclusive) | lognormal
output: {kind: uniform, low: 8, high: 511}
duration_s: 600                             # rate * duration requests (or requests: N)
slo: {ttft_s: 6, tpot_s: 0.2}
seed: 0
server: {max_loras: 8, max_cpu_loras: 64, bank: padded}   # see Server
merge: {switch: drain}                      # drain (S-LoRA) | threshold (dLoRA)
```

Paths (``adapters.rules``, ``adapters.dirs``, ``arrivals.file``) are relative to the workload file's folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from lorapass.cost.hw import _Strict, read_yaml, validated
from lorapass.errors import SpecError


class Adapters(_Strict):
    """The adapter set: generated (count, ranks, target_modules or a rules file) or real PEFT directories."""

    count: int | None = Field(None, gt=0)
    ranks: list[Annotated[int, Field(gt=0)]] | None = Field(None, min_length=1)
    rank_weights: list[Annotated[float, Field(ge=0)]] | None = None  # sample ranks with these weights
    target_modules: list[str] | str | None = None
    rules: str | None = None
    dirs: list[str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> Adapters:
        if self.dirs is not None:
            extra = [k for k in ("ranks", "rank_weights", "target_modules", "rules") if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"dirs carry their own ranks and targets; drop {', '.join(extra)}")
            if self.count not in (None, len(self.dirs)):
                raise ValueError(f"count {self.count} differs from the {len(self.dirs)} dirs")
            return self
        if self.count is None:
            raise ValueError("give count (with ranks and target_modules, or rules) or dirs")
        if (self.rules is None) == (self.target_modules is None):
            raise ValueError("give exactly one of target_modules and rules")
        if self.rules is not None and self.ranks is not None:
            raise ValueError("a rules file sets the ranks (r, rank_pattern); drop ranks")
        if self.target_modules is not None and self.ranks is None:
            raise ValueError("target_modules needs ranks")
        if self.rank_weights is not None and len(self.rank_weights) != len(self.ranks or []):
            raise ValueError("rank_weights needs one weight per entry of ranks")
        return self


class UniformPopularity(_Strict):
    kind: Literal["uniform"]


class SkewedPopularity(_Strict):
    """``zipf``: p_i proportional to 1 / i^alpha (i = 1..n). ``power``: S-LoRA's generator, adapter =
    floor(n * x) with x ~ power(alpha) on [0, 1], so p_i = ((i+1)/n)^alpha - (i/n)^alpha (alpha 1: uniform)."""

    kind: Literal["zipf", "power"]
    alpha: float = Field(gt=0)


class WeightPopularity(_Strict):
    kind: Literal["weights"]
    weights: list[Annotated[float, Field(ge=0)]] = Field(min_length=1)


Popularity = Annotated[Union[UniformPopularity, SkewedPopularity, WeightPopularity],
                       Field(discriminator="kind")]


class PoissonArrivals(_Strict):
    kind: Literal["poisson"]
    rate: float = Field(gt=0)  # requests per second


class GammaArrivals(_Strict):
    """Gamma inter-arrival times with coefficient of variation cv (cv = 1 is Poisson), as S-LoRA generates."""

    kind: Literal["gamma"]
    rate: float = Field(gt=0)
    cv: float = Field(gt=0)


class TraceArrivals(_Strict):
    """A CSV file with header ``timestamp_s,prompt_tokens,output_tokens,adapter`` (adapter: index or name)."""

    kind: Literal["trace"]
    file: str


Arrivals = Annotated[Union[PoissonArrivals, GammaArrivals, TraceArrivals], Field(discriminator="kind")]


class FixedLength(_Strict):
    kind: Literal["fixed"]
    value: int = Field(gt=0)


class UniformLength(_Strict):
    """Integers low..high, both inclusive."""

    kind: Literal["uniform"]
    low: int = Field(gt=0)
    high: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> UniformLength:
        if self.high < self.low:
            raise ValueError(f"high {self.high} is below low {self.low}")
        return self


class LogNormalLength(_Strict):
    """Rounded lognormal with this median and sigma (of the log), clipped to 1..max."""

    kind: Literal["lognormal"]
    median: float = Field(gt=0)
    sigma: float = Field(gt=0)
    max: int = Field(gt=0)


Lengths = Annotated[Union[FixedLength, UniformLength, LogNormalLength], Field(discriminator="kind")]


class Slo(_Strict):
    ttft_s: float | None = Field(None, gt=0)
    tpot_s: float | None = Field(None, gt=0)


class Server(_Strict):
    """The serving engine: batching limits, adapter slots and host cache, the adapter bank, loads."""

    max_loras: int | None = Field(None, gt=0)  # GPU adapter slots = distinct adapters per batch (None: no limit)
    max_cpu_loras: int | None = Field(None, gt=0)  # host adapter cache, LRU (None: every adapter on the host)
    max_lora_rank: int | None = Field(None, gt=0)  # padded bank's slot rank (default: the largest adapter rank)
    bank: Literal["grouped", "padded"] = "grouped"  # grouped per rank (Punica/S-LoRA) | padded to the slot (vLLM)
    load_overlap: bool = True  # host->device loads on a copy stream while other requests decode
    max_batch_tokens: int = Field(4096, gt=0)  # prompt tokens one prefill iteration may take
    max_running: int = Field(256, gt=0)  # sequences in the running batch
    admit_every: int = Field(1, gt=0)  # decode steps between admission attempts (S-LoRA: 10)
    kv_tokens: int | None = Field(None, gt=0)  # KV pool in tokens (default: from memory_utilization)
    memory_utilization: float = Field(0.9, gt=0, le=1)  # fraction of device memory the engine may use
    kv_block_tokens: int = Field(16, gt=0)  # KV page size (fragmentation; 1 = token-level pages)
    storage_gb_s: float = Field(2.0, gt=0)  # read bandwidth for adapters missing from the host cache
    kernel_overhead_us: float | None = Field(None, ge=0)  # per kernel launch (default: the hardware spec's)


class MergeOptions(_Strict):
    """How the merge policy switches adapters."""

    switch: Literal["drain", "threshold"] = "drain"
    max_other_waiting: int = Field(30, ge=0)  # drain rule: stop admitting once this many others wait ahead


class Workload(_Strict):
    adapters: Adapters
    popularity: Popularity = UniformPopularity(kind="uniform")
    arrivals: Arrivals
    prompt: Lengths | None = None
    output: Lengths | None = None
    duration_s: float | None = Field(None, gt=0)
    requests: int | None = Field(None, gt=0)
    slo: Slo = Slo()
    seed: int = 0
    server: Server = Server()
    merge: MergeOptions = MergeOptions()

    @model_validator(mode="after")
    def _consistent(self) -> Workload:
        if isinstance(self.arrivals, TraceArrivals):
            given = [k for k in ("prompt", "output", "duration_s", "requests") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"a trace gives its own lengths and count; drop {', '.join(given)}")
            return self
        missing = [k for k in ("prompt", "output") if getattr(self, k) is None]
        if missing:
            raise ValueError(f"missing {' and '.join(missing)} length distribution")
        if (self.duration_s is None) == (self.requests is None):
            raise ValueError("give exactly one of duration_s and requests")
        return self


class WorkloadFile:
    """A validated workload and the folder its relative paths start from."""

    def __init__(self, workload: Workload, folder: Path, source: str) -> None:
        self.workload, self.folder, self.source = workload, folder, source

    def path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.folder / p


def load_workload(path: str | os.PathLike) -> WorkloadFile:
    """Read and validate a workload file; SpecError naming the file and key on any problem."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such workload file")
    return WorkloadFile(validated(Workload, read_yaml(path), str(path)), path.parent, str(path))


def from_dict(data: dict, folder: str | os.PathLike = ".", source: str = "workload") -> WorkloadFile:
    """A workload from a mapping (what the file would hold)."""
    return WorkloadFile(validated(Workload, data, source), Path(folder), source)
