"""`lorapass verify`: passes real rewrites, fails loudly on a corrupted weight or a different adapter."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from builders import example_ids, make_adapter

from lorapass.cli import main


@pytest.fixture(params=["llama", "gpt2"])
def rewritten(request, exported, tmp_path):
    model, base = exported(request.param)
    targets = ["q_proj", "down_proj"] if request.param == "llama" else ["c_attn", "c_fc"]
    make_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=targets)
    outs = {}
    for strategy in ("merge", "dynamic"):
        outs[strategy] = tmp_path / f"{strategy}.onnx"
        assert main(["rewrite", str(base), "--adapter", str(tmp_path / "ad"), "--strategy", strategy, "-o", str(outs[strategy])]) == 0
    return model, base, tmp_path / "ad", outs


@pytest.mark.parametrize("strategy", ["merge", "dynamic"])
def test_verify_passes_real_rewrites(rewritten, strategy, capsys):
    _, base, adapter, outs = rewritten
    assert main(["verify", str(base), str(outs[strategy]), "--adapter", str(adapter), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["outputs"][0]["max_rel"] <= 1e-4
    assert report["outputs"][0]["changed_from_base"] > 1e-3  # the check is not vacuous


def test_verify_fails_on_a_corrupted_weight(rewritten, tmp_path, capsys):
    _, base, adapter, outs = rewritten
    bad = tmp_path / "bad" / "merged.onnx"
    bad.parent.mkdir()
    shutil.copy(outs["merge"], bad)
    shutil.copy(outs["merge"].with_name("merge.onnx.data"), bad.with_name("merged.onnx.data"))
    proto = onnx.load(bad, load_external_data=False)
    for t in proto.graph.initializer:  # point the copy at its own data file
        for e in t.external_data:
            if e.key == "location":
                e.value = "merged.onnx.data"
    onnx.save(proto, bad)
    # nudge one element of the first merged weight by 0.05
    from lorapass.onnx.load import load_model
    from lorapass.onnx.sites import find_sites

    config = json.loads((adapter / "adapter_config.json").read_text())
    site = next(s for s in find_sites(load_model(bad)).sites if s.path.endswith(tuple(config["target_modules"])))
    tensor = next(t for t in proto.graph.initializer if t.name == site.weight)
    offset = int({e.key: e.value for e in tensor.external_data}["offset"])
    data = bytearray(bad.with_name("merged.onnx.data").read_bytes())
    value = np.frombuffer(bytes(data[offset:offset + 4]), np.float32)[0] + np.float32(0.05)
    data[offset:offset + 4] = np.float32(value).tobytes()
    bad.with_name("merged.onnx.data").write_bytes(bytes(data))
    assert main(["verify", str(base), str(bad), "--adapter", str(adapter)]) == 1
    captured = capsys.readouterr()
    assert "FAIL output" in captured.out and "verify failed: output" in captured.err


def test_verify_fails_against_another_adapter(rewritten, tmp_path, capsys):
    model, base, adapter, outs = rewritten
    config = json.loads((adapter / "adapter_config.json").read_text())
    make_adapter(model, tmp_path / "other", seed=9, r=4, lora_alpha=8, target_modules=config["target_modules"])
    assert main(["verify", str(base), str(outs["dynamic"]), "--adapter", str(tmp_path / "other")]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_verify_with_inputs_file(rewritten, tmp_path, capsys):
    _, base, adapter, outs = rewritten
    np.savez(tmp_path / "in.npz", input_ids=example_ids(batch=3, seq=11, seed=2).numpy())
    assert main(["verify", str(base), str(outs["merge"]), "--adapter", str(adapter), "--inputs", str(tmp_path / "in.npz")]) == 0
    np.savez(tmp_path / "wrong.npz", tokens=example_ids().numpy())
    assert main(["verify", str(base), str(outs["merge"]), "--adapter", str(adapter), "--inputs", str(tmp_path / "wrong.npz")]) == 2
    assert "tokens" in capsys.readouterr().err
    assert main(["verify", str(base), str(tmp_path / "missing.onnx"), "--adapter", str(adapter)]) == 2


def test_verify_bad_inputs_exit_2(rewritten, tmp_path, capsys):
    _, base, adapter, outs = rewritten
    cmd = ["verify", str(base), str(outs["dynamic"]), "--adapter", str(adapter), "--inputs"]
    ids = example_ids(batch=1, seq=5).numpy()
    np.savez(tmp_path / "i32.npz", input_ids=ids.astype(np.int32))  # lossless integer widening is accepted
    assert main([*cmd, str(tmp_path / "i32.npz")]) == 0
    capsys.readouterr()
    for name, arrays, needle in [
        ("float", {"input_ids": ids.astype(np.float32)}, "float32"),
        ("rank", {"input_ids": ids[0]}, "dimensions"),
        ("empty", {}, "no array for"),
        ("vocab", {"input_ids": ids + 10_000}, "embedding table"),
    ]:
        np.savez(tmp_path / f"{name}.npz", **arrays)
        assert main([*cmd, str(tmp_path / f"{name}.npz")]) == 2, name
        assert needle in capsys.readouterr().err, name
    (tmp_path / "junk.npz").write_text("not a zip")
    assert main([*cmd, str(tmp_path / "junk.npz")]) == 2
    assert main([*cmd, str(tmp_path / "absent.npz")]) == 2


def test_verify_adapter_that_does_not_fit_exits_2(rewritten, exported, tmp_path, capsys):
    model, base, _, outs = rewritten
    other_family = "gpt2" if model.config.model_type == "llama" else "llama"
    other_model, _ = exported(other_family)
    make_adapter(other_model, tmp_path / "foreign", r=4, lora_alpha=8, target_modules="all-linear")
    assert main(["verify", str(base), str(outs["merge"]), "--adapter", str(tmp_path / "foreign")]) == 2
    assert "lorapass: error:" in capsys.readouterr().err
    assert main(["verify", str(base), str(outs["merge"]), "--adapter", str(tmp_path / "no-such-adapter")]) == 2


def test_verify_rtol_atol(rewritten, capsys):
    _, base, adapter, outs = rewritten
    cmd = ["verify", str(base), str(outs["dynamic"]), "--adapter", str(adapter), "--json"]
    assert main(cmd) == 0
    max_abs = json.loads(capsys.readouterr().out)["outputs"][0]["max_abs"]
    assert max_abs > 0
    assert main([*cmd, "--rtol", "0", "--atol", str(max_abs / 2)]) == 1  # exact: past atol alone
    capsys.readouterr()
    assert main([*cmd, "--rtol", "0", "--atol", str(max_abs * 2)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rtol"] == 0 and report["atol"] == max_abs * 2
    assert main([*cmd, "--tol", "0"]) == 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # argparse: usage error, exit 2
        main([*cmd, "--tol", "-1"])
    assert exc.value.code == 2
