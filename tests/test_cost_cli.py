"""``lorapass analyse``: tables, JSON, CSV, the roofline plot, sweeps, rules/adapters, and typed errors."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
import yaml

from lorapass.cli import main as lorapass_main
from lorapass.cost import cli
from lorapass.errors import LorapassError, SpecError

ROOT = Path(__file__).resolve().parents[1]
H100 = str(ROOT / "hw_specs" / "h100.yaml")
L70 = str(ROOT / "models" / "llama2-70b.yaml")


def run(argv: list[str]):
    parser = argparse.ArgumentParser(prog="lorapass")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_analyse_parser(sub)
    cli.add_calibrate_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_table(capsys):
    assert run(["analyse", L70, "--hw", H100, "--tp", "4", "--pp", "2", "--batch", "8", "--seq", "2048",
                "--gen", "256"]) == 0
    out = capsys.readouterr().out
    assert "Llama-2-70B on 8 x H100-SXM5-80GB, TP4xPP2xEP1xDP1" in out
    for word in ("prefill", "decode", "TTFT", "TPOT", "tokens/s", "kv_cache", "per operator class", "GEMM",
                 "ATTENTION"):
        assert word in out


def test_json_csv_plot_with_rules(tmp_path, capsys):
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"name": "attn", "target_modules": ["q_proj", "v_proj"], "r": 16,
                                     "lora_alpha": 32, "strategy": "dynamic"}))
    table, png = tmp_path / "ops.csv", tmp_path / "roofline.png"
    assert run(["analyse", L70, "--hw", H100, "--tp", "8", "--batch", "4", "--seq", "1024", "--gen", "64",
                "--rules", str(rules), "--json", "--csv", str(table), "--plot", str(png)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["strategy"] == "dynamic" and data["lora_sites"] == 160
    assert set(data["lora_overhead_pct"]) == {"prefill", "decode"}
    assert data["memory"]["fits"] is True and data["layout"]["devices"] == 8
    assert data["tokens_per_s"] == pytest.approx(4 / data["tpot_s"])
    rows = list(csv.DictReader(table.open()))
    assert {r["phase"] for r in rows} == {"prefill", "decode"}
    assert {"GEMM_LORA_A", "GEMM_LORA_B", "ADD"} <= {r["class"] for r in rows}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_merge_strategy_and_adapter_config(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "bias": "none", "task_type": "CAUSAL_LM"}))
    assert run(["analyse", str(ROOT / "models/llama3-8b.yaml"), "--hw", str(ROOT / "hw_specs/l4.yaml"),
                "--adapter", str(adapter), "--strategy", "merge", "--tp", "2", "--batch", "2", "--seq", "512",
                "--gen", "32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["strategy"] == "merge" and data["lora_sites"] == 4 * 32
    assert "merge" in data["phases"] and data["phases"]["merge"]["flops"] > 0
    assert data["memory"]["adapters"] == 0


def test_sweep(tmp_path, capsys):
    out = tmp_path / "sweep.csv"
    assert run(["analyse", L70, "--hw", H100, "--sweep", "--devices", "8,16", "--batch", "16", "--seq", "1024",
                "--gen", "64", "--csv", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    labels = [r["layout"]["label"] for r in data["results"]]
    assert "TP8xPP1xEP1xDP1" in labels and "TP8xPP1xEP1xDP2" in labels and "TP2xPP8xEP1xDP1" in labels
    assert len(labels) == len(set(labels)) == len(list(csv.reader(out.open()))) - 1
    fits = [r["memory"]["fits"] for r in data["results"]]
    assert fits == sorted(fits, reverse=True)


def test_sweep_table(capsys):
    assert run(["analyse", str(ROOT / "models/mixtral-8x7b.yaml"), "--hw", str(ROOT / "hw_specs/mi300x.yaml"),
                "--sweep", "--devices", "8", "--batch", "8", "--seq", "512", "--gen", "32"]) == 0
    out = capsys.readouterr().out
    assert "layouts ranked by throughput" in out and "EP8" in out


@pytest.mark.parametrize("argv,needle", [
    (["--tp", "3"], "num_attention_heads"),
    (["--batch", "3", "--dp", "2"], "batch"),
    (["--ep", "2"], "num_local_experts"),
    (["--dtype", "fp9"], "fp9"),
])
def test_bad_layouts_are_typed_errors(argv, needle):
    with pytest.raises(SpecError) as err:
        run(["analyse", str(ROOT / "models/llama2-7b.yaml"), "--hw", H100, *argv])
    assert needle in str(err.value)


def test_bad_spec_exits_2_naming_file_and_field(tmp_path, capsys):
    spec = yaml.safe_load(Path(H100).read_text())
    spec["memory_bandwidth_tb_s"] = -1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec))
    assert lorapass_main(["analyse", L70, "--hw", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "memory_bandwidth_tb_s" in err


def test_fp8_on_a_device_without_it(capsys):
    with pytest.raises(LorapassError, match="fp8"):
        run(["analyse", L70, "--hw", str(ROOT / "hw_specs/a100.yaml"), "--tp", "8", "--dtype", "fp8"])
    assert run(["analyse", L70, "--hw", H100, "--tp", "4", "--dtype", "fp8", "--json"]) == 0
    fp8 = json.loads(capsys.readouterr().out)
    norms = (2 * 80 + 1) * 8192  # RMSNorm weights stay replicated under TP; everything else split 4 ways, 1 byte
    assert fp8["memory"]["weights"] == (68_976_648_192 - norms) / 4 + norms
