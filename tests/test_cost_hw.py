"""Hardware specs: the shipped files match the datasheets, and bad specs are typed errors naming file and field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lorapass.cost.hw import load_spec
from lorapass.errors import LorapassError, SpecError

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "hw_specs").glob("*.yaml"))
SHIPPED = {"a100.yaml", "h100.yaml", "h200.yaml", "l4.yaml", "mi300x.yaml", "tpu-v5e.yaml", "a10g.yaml", "l40s.yaml"}

# /work/shared/reference.md, "Accelerator datasheet numbers (dense, per device)"
DATASHEET = {  # file: (bf16 TFLOP/s, HBM TB/s, GiB, per-direction interconnect GB/s)
    "a100.yaml": (312, 2.039, 80, 300),
    "h100.yaml": (989.4, 3.35, 80, 450),
    "h200.yaml": (989, 4.8, 141, 450),
    "l4.yaml": (121, 0.30, 24, 32),
    "mi300x.yaml": (1307.4, 5.3, 192, 7 * 64),
    "tpu-v5e.yaml": (197, 0.819, 16, 200),
}


def test_every_required_device_ships():
    assert SHIPPED <= {p.name for p in SPECS}


@pytest.mark.parametrize("name", sorted(DATASHEET))
def test_spec_matches_datasheet(name):
    spec = load_spec(ROOT / "hw_specs" / name)
    bf16, tb_s, gib, link = DATASHEET[name]
    assert spec.peak("bf16") == pytest.approx(bf16 * 1e12)
    assert spec.bandwidth == pytest.approx(tb_s * 1e12)
    assert spec.capacity == pytest.approx(gib * 2**30)
    assert spec.interconnect.intra_node.bandwidth == pytest.approx(link * 1e9)
    assert 0 < spec.efficiency.compute <= 1 and 0 < spec.efficiency.memory <= 1


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_every_number_has_a_source_comment(path):
    """Each numeric field line carries a comment (its datasheet source or why it is an assumption)."""
    numeric = re.compile(r"^\s*[a-z0-9_]+:\s*(-?[0-9.]+|null)\s*(#.*)?$")
    missing = []
    lines = path.read_text().splitlines()
    for k, line in enumerate(lines):
        m = numeric.match(line)
        # a number may be explained by its own comment or by its section's comment line just above
        if m and not m.group(2) and not any("#" in lines[j] for j in range(max(0, k - 3), k)):
            missing.append(line.strip())
    assert not missing, f"{path.name}: numbers without a source comment: {missing}"


def test_fp8_absent_on_a100_is_a_typed_error():
    spec = load_spec(ROOT / "hw_specs" / "a100.yaml")
    assert spec.peak("int8") == pytest.approx(624e12)
    with pytest.raises(SpecError, match="fp8"):
        spec.peak("fp8")
    # fp16 falls back to bf16 on a device that lists only bf16
    tpu = load_spec(ROOT / "hw_specs" / "tpu-v5e.yaml")
    assert tpu.peak("fp16") == pytest.approx(197e12)


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _good() -> dict:
    return yaml.safe_load((ROOT / "hw_specs" / "h100.yaml").read_text())


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.pop("memory_bandwidth_tb_s"), "memory_bandwidth_tb_s"),
    (lambda d: d.__setitem__("memory_bandwidth_tb_s", -3.35), "memory_bandwidth_tb_s"),
    (lambda d: d["interconnect"]["intra_node"].__setitem__("bandwidth_gb_s", -1),
     "interconnect.intra_node.bandwidth_gb_s"),
    (lambda d: d["interconnect"].pop("inter_node"), "interconnect.inter_node"),
    (lambda d: d["efficiency"].__setitem__("compute", 1.5), "efficiency.compute"),
    (lambda d: d["peak_tflops"].__setitem__("bf16", 0), "peak_tflops.bf16"),
    (lambda d: d.__setitem__("memory_bandwith_tb_s", 1.0), "memory_bandwith_tb_s"),  # typo: unknown field
    (lambda d: d.__setitem__("peak_tflops", {"fp32": None, "bf16": None}), "peak_tflops"),
])
def test_bad_spec_names_file_and_field(tmp_path, mutate, field):
    data = _good()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(path) in str(err.value)
    assert field in str(err.value)
    assert isinstance(err.value, LorapassError)


def test_unreadable_specs(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(lst)
