"""Hardware specs: one YAML file per device, validated by a pydantic schema.

Units are the datasheets' own: TFLOP/s (dense, no sparsity), TB/s and GB/s (decimal, 1e12 / 1e9 bytes/s),
GiB for memory capacity (HBM stacks are sized in binary units), MB (1e6 bytes) for the last-level cache,
microseconds for latencies. ``host`` (optional; the serving simulation needs it) is the host link and the host
memory per device. Every problem is a :class:`~lorapass.errors.SpecError` naming the file and the field
(``hw_specs/h100.yaml: interconnect.intra_node.bandwidth_gb_s: must be > 0``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lorapass.errors import SpecError

DTYPE_BYTES: dict[str, float] = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}
"""Bytes per element of every dtype the cost model knows."""

DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16",
                 "float8": "fp8", "float8e4m3fn": "fp8", "float8e5m2": "fp8", "uint8": "int8", "int4": "int4"}


def canonical_dtype(name: str) -> str:
    """``float16`` -> ``fp16`` and so on; SpecError for an unknown dtype."""
    key = name.lower()
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        raise SpecError(f"unknown dtype {name!r} (known: {', '.join(DTYPE_BYTES)})")
    return key


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # .inf / .nan: never a spec value


class PeakTflops(_Strict):
    """Dense peak per dtype in TFLOP/s (TOP/s for int8); null where the device has no such unit."""

    fp32: float | None = Field(None, gt=0)
    bf16: float | None = Field(None, gt=0)
    fp16: float | None = Field(None, gt=0)
    fp8: float | None = Field(None, gt=0)
    int8: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _any(self) -> PeakTflops:
        if all(v is None for v in (self.fp32, self.bf16, self.fp16, self.fp8, self.int8)):
            raise ValueError("at least one dtype needs a peak")
        return self


class Efficiency(_Strict):
    """Fraction of peak an operator reaches: FLOP/s for compute, bytes/s for memory (0 < e <= 1)."""

    compute: float = Field(gt=0, le=1)
    memory: float = Field(gt=0, le=1)


class Link(_Strict):
    """One level of the interconnect: per-direction bandwidth per device and per-message latency."""

    bandwidth_gb_s: float = Field(gt=0)
    latency_us: float = Field(ge=0)

    @property
    def bandwidth(self) -> float:
        return self.bandwidth_gb_s * 1e9

    @property
    def latency(self) -> float:
        return self.latency_us * 1e-6


class Interconnect(_Strict):
    devices_per_node: int = Field(gt=0)
    intra_node: Link
    inter_node: Link


class Host(_Strict):
    """The host a device hangs off: its link (PCIe or NVLink-C2C, per direction) and the host memory per device."""

    link: Link
    link_efficiency: float = Field(gt=0, le=1)  # achieved fraction of the link's peak for pinned copies
    memory_gib: float = Field(gt=0)  # host memory available per device (the machine's share)

    def load_time(self, nbytes: float, tensors: int) -> float:
        """Seconds to copy ``nbytes`` in ``tensors`` transfers host -> device: size / effective bandwidth +
        one link latency per transfer."""
        return nbytes / (self.link.bandwidth * self.link_efficiency) + tensors * self.link.latency

    @property
    def capacity(self) -> float:
        """Host memory per device in bytes."""
        return self.memory_gib * 2**30


class HardwareSpec(_Strict):
    """One device."""

    name: str
    peak_tflops: PeakTflops
    memory_bandwidth_tb_s: float = Field(gt=0)
    memory_capacity_gib: float = Field(gt=0)
    l2_cache_mb: float | None = Field(None, ge=0)
    efficiency: Efficiency
    interconnect: Interconnect
    kernel_overhead_us: float = Field(0.0, ge=0)
    host: Host | None = None  # needed by the serving simulation (adapter loads, host adapter cache)
    source: str | None = None

    def peak(self, dtype: str) -> float:
        """Dense FLOP/s for ``dtype`` (fp16 falls back to bf16 and back); SpecError when the device has none."""
        key = canonical_dtype(dtype)
        value = getattr(self.peak_tflops, key, None) if key in PeakTflops.model_fields else None
        if value is None and key in ("bf16", "fp16"):
            value = self.peak_tflops.bf16 or self.peak_tflops.fp16
        if value is None:
            raise SpecError(f"{self.name}: peak_tflops.{key} is not given, so {key} operators cannot be costed "
                            f"(use --dtype with one of: {', '.join(k for k, v in self.peak_tflops if v)})")
        return value * 1e12

    @property
    def bandwidth(self) -> float:
        """Memory bandwidth in bytes/s."""
        return self.memory_bandwidth_tb_s * 1e12

    @property
    def capacity(self) -> float:
        """Memory capacity in bytes."""
        return self.memory_capacity_gib * 2**30

    @property
    def kernel_overhead(self) -> float:
        return self.kernel_overhead_us * 1e-6


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        msg = "missing required field"
    elif error["type"] == "extra_forbidden":
        msg = "unknown field (typo?)"
    return f"{loc}: {msg}" if loc else msg


def validated(model: type[BaseModel], data: Any, source: str) -> Any:
    """``model.model_validate(data)`` with every pydantic error turned into one SpecError naming file and field."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{source}: " + "; ".join(_describe(e) for e in err.errors())) from None


def read_yaml(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SpecError(f"{path}: cannot read ({err.strerror or err})") from err
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: not valid YAML ({err})") from err


def load_spec(path: str | os.PathLike) -> HardwareSpec:
    """Read and validate one hardware spec file."""
    return validated(HardwareSpec, read_yaml(path), str(path))
