"""Hostile inputs found by a fuzzing campaign that crashed lorapass, or were applied where the reference library
computes something else: each is now a typed error naming the file, key, tensor or node (exit 2), with nothing
written and every input unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file, save_file

from reliability_case import cli, fails, ort_output, peft_output, tiny, tiny_template  # noqa: F401
from lorapass.cli import main
from lorapass.errors import AdapterError, ModelError

REPO = Path(__file__).resolve().parents[1]
Q = "base_model.model.q"
DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested past Python's recursion limit


def merge(case, model=None, adapter=None, *extra) -> list:
    return ["rewrite", model or case.model, "--adapter", adapter or case.a, "-o", case.out / "o.onnx", *extra]


def edit_tensors(case, change) -> None:
    path = case.a / "adapter_model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def edit_config(case, **changes) -> None:
    path = case.a / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ------------------------------------------------------------------ ONNX graphs lorapass read wrongly or not at all

def _inline(case) -> onnx.ModelProto:
    return onnx.load(case.model)  # weights read in: edits below write one self-contained file


def _twice(case, proto):
    copy_ = onnx.TensorProto()
    copy_.CopyFrom(proto.graph.initializer[1])
    copy_.raw_data = np.zeros((16, 16), np.float32).tobytes()  # onnx_ir kept this one, silently
    proto.graph.initializer.append(copy_)


def _dangling(case, proto):
    proto.graph.node[1].input[0] = "nowhere"


def _cycle(case, proto):
    proto.graph.node[1].input[0] = "hv"  # q reads v's output, v reads q's


def _no_dtype(case, proto):
    proto.graph.initializer[1].data_type = TensorProto.UNDEFINED


def _short_raw(case, proto):
    proto.graph.initializer[1].raw_data = proto.graph.initializer[1].raw_data[:-4]


def _short_typed(case, proto):
    tensor = proto.graph.initializer[1]
    tensor.ClearField("raw_data")
    tensor.float_data.extend([1.0] * 10)


def _outside(name: str) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(np.ones((16, 16), np.float32), name)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": "../tiny.pt", "offset": "0", "length": "1024"}.items():
        tensor.external_data.add(key=key, value=value)
    return tensor


def _constant_outside(case, proto):
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["c"], value=_outside("c")))
    proto.graph.node.append(helper.make_node("MatMul", ["x", "c"], ["z"], name="c_matmul"))
    proto.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))


def _subgraph_outside(case, proto):
    then = helper.make_graph([helper.make_node("MatMul", ["x", "s"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)], [_outside("s")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    proto.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    proto.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=other))
    proto.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))


@pytest.mark.parametrize("edit, names", [
    (_twice, ["'q.weight' is defined 2 times"]),
    (_dangling, ["'q_matmul'", "'nowhere'", "which no node"]),
    (_cycle, ["form a cycle", "'q_matmul'"]),
    (_no_dtype, ["'q.weight'", "no data type"]),
    (_short_raw, ["'q.weight'", "1020 bytes", "needs 1024"]),
    (_short_typed, ["'q.weight'", "does not fit its shape"]),
    (_constant_outside, ["Constant node giving 'c'", "'../tiny.pt' outside the model's folder"]),
    (_subgraph_outside, ["tensor 's'", "'../tiny.pt' outside the model's folder"]),
], ids=["initializer-twice", "dangling-input", "cycle", "no-dtype", "short-raw-data", "short-typed-data",
        "constant-outside-folder", "subgraph-initializer-outside-folder"])
def test_malformed_graph(tiny, capsys, edit, names):
    """Before: silently merged (one duplicate dropped, dangling inputs and cycles copied, data outside the folder
    referenced) or crashed (dynamic's sort, numpy reshapes, onnx_ir's bit widths)."""
    proto = _inline(tiny)
    edit(tiny, proto)
    bad = tiny.model.with_name("bad.onnx")
    bad.write_bytes(proto.SerializeToString())
    for strategy in ("merge", "dynamic"):
        fails(capsys, tiny, [*merge(tiny, bad), "--strategy", strategy], 2, bad, *names)


def test_integer_weight_is_reported_not_adapted(tiny, capsys):
    """Before: a site; the float delta was rounded into the integer weight."""
    proto = onnx.load(tiny.model, load_external_data=False)
    proto.graph.initializer[1].data_type = TensorProto.INT32  # q.weight's 1024 bytes, read as int32
    onnx.save(proto, tiny.model)
    fails(capsys, tiny, merge(tiny), 2, "module 'q' matches no site")
    assert main(["inspect", str(tiny.model)]) == 0
    assert "q_matmul: MatMul over the INT32 weight 'q.weight'" in capsys.readouterr().out


# ------------------------------------------------------------------ PEFT adapters PEFT itself would read otherwise

def test_magnitude_without_use_dora_and_use_dora_without_magnitude(tiny, capsys):
    """Before: DoRA applied where PEFT ignores the magnitude, plain LoRA where PEFT starts DoRA from the base norms."""
    plain = tiny.root / "plain"
    shutil.copytree(tiny.a, plain)
    edit_tensors(tiny, lambda t: t.update({f"{Q}.lora_magnitude_vector.weight": np.ones(16, np.float32)}))
    x = torch.randn(3, 16)
    np.testing.assert_array_equal(peft_output(tiny, tiny.a, x), peft_output(tiny, plain, x))  # PEFT ignores it
    fails(capsys, tiny, merge(tiny), 2, "use_dora=False", f"'{Q}.lora_magnitude_vector.weight'", "PEFT would ignore")
    edit_config(tiny, use_dora=True)
    edit_tensors(tiny, lambda t: t.pop(f"{Q}.lora_magnitude_vector.weight"))
    fails(capsys, tiny, merge(tiny), 2, "use_dora=True", "module 'k' has no lora_magnitude_vector")


def test_bias_for_a_layer_without_one(tiny, capsys):
    """Before: a bias was added to the bias-less q; PEFT drops the tensor (no such parameter)."""
    edit_tensors(tiny, lambda t: t.update({f"{Q}.base_layer.bias": np.ones(16, np.float32)}))
    x = torch.randn(3, 16)
    reference = peft_output(tiny, tiny.a, x)
    edit_tensors(tiny, lambda t: t.pop(f"{Q}.base_layer.bias"))
    np.testing.assert_array_equal(reference, peft_output(tiny, tiny.a, x))
    edit_tensors(tiny, lambda t: t.update({f"{Q}.base_layer.bias": np.ones(16, np.float32)}))
    for strategy in ("merge", "dynamic"):
        fails(capsys, tiny, merge(tiny, None, None, "--strategy", strategy), 2, f"{Q}.base_layer.bias",
              "site 'q'", "which has none")


# ------------------------------------------------------------------ single files (kohya / LyCORIS / diffusers)

def _f(*shape) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.1


def _ly(**tensors) -> dict:
    return {f"lycoris_q.{role}": value for role, value in tensors.items()}


LORA = {"lora_down.weight": _f(4, 16), "lora_up.weight": _f(16, 4)}
DIFFUSERS = {"q.lora_A.weight": _f(4, 16), "q.lora_B.weight": _f(16, 4)}


def _metadata(**config) -> dict:
    return {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 4, "target_modules": ["q"], **config})}


@pytest.mark.parametrize("tensors, metadata, names", [
    (_ly(**LORA, alpha=np.zeros(0, np.float32)), None, ["'lycoris_q.alpha'", "shape [0]", "one value"]),
    (_ly(**LORA, alpha=np.array([4.0, 1.0], np.float32)), None, ["'lycoris_q.alpha'", "shape [2]"]),
    (_ly(**{"lora_down.weight": _f(0, 16), "lora_up.weight": _f(16, 0)}), None,
     ["'lycoris_q.lora_down.weight'", "no rank"]),
    (_ly(lokr_w1_a=_f(4), lokr_w1_b=_f(2, 4), lokr_w2=_f(4, 4)), None, ["'lycoris_q.lokr_w1_a'", "no rank"]),
    (_ly(lokr_w1=_f(4, 4, 1), lokr_w2=_f(4, 4)), None, ["lycoris_q.lokr_w1 has shape [4, 4, 1]", "a matrix"]),
    (_ly(lokr_w1_a=_f(4, 2), lokr_w1_b=_f(3, 4), lokr_w2=_f(4, 4)), None,
     ["lycoris_q.lokr_w1_a [4, 2] and lycoris_q.lokr_w1_b [3, 4] do not compose"]),
    ({"q.lora_A.weight": _f(4, 16), "q.lora_B.weight": _f(16)}, None, ["'q.lora_B.weight'", "no rank"]),
    ({**DIFFUSERS, "q.alpha": np.array([1.0, 2.0], np.float32)}, None, ["'q.alpha'", "one value"]),
    (DIFFUSERS, {"lora_adapter_metadata": DEEP}, ["'lora_adapter_metadata'", "not valid JSON"]),
    (DIFFUSERS, _metadata(use_dora=True), ["sets use_dora", "DoRA"]),
    (DIFFUSERS, _metadata(exclude_modules=["q"]), ["module 'q' has LoRA weights", "does not target it"]),
], ids=["kohya-alpha-empty", "kohya-alpha-vector", "kohya-rank-0", "lokr-factor-1d", "lokr-factor-3d",
        "lokr-inner-sizes", "diffusers-b-1d", "diffusers-alpha-vector", "diffusers-metadata-deep",
        "diffusers-metadata-dora", "diffusers-metadata-excludes"])
def test_single_file(tiny, capsys, tensors, metadata, names):
    """Before: IndexError / ZeroDivisionError / RecursionError, a vector alpha's first value, a DoRA config or an
    excluded module applied as plain LoRA."""
    path = tiny.root / "lora.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    fails(capsys, tiny, merge(tiny, None, path), 2, path, *names)


# ------------------------------------------------------------------ lorapass's own metadata, companion configs

@pytest.fixture
def dynamic(tiny, capsys):
    path = tiny.out / "dyn.onnx"
    assert cli(capsys, ["rewrite", tiny.model, "--strategy", "dynamic", "--target", "k", "q", "-o", path])[0] == 0
    return path


def _with_metadata(model, key: str, value: str):
    proto = onnx.load(model, load_external_data=False)
    entry = next(p for p in proto.metadata_props if p.key == key)
    entry.value = value
    bad = model.with_name("bad.onnx")
    onnx.save(proto, bad)
    return bad


def _record(dynamic, change):
    records = json.loads(next(p.value for p in onnx.load(dynamic, load_external_data=False).metadata_props
                              if p.key == "lorapass.lora"))
    change(records[0])
    return json.dumps(records)


@pytest.mark.parametrize("value, names", [
    (lambda d: DEEP, ["'lorapass.lora' is not valid JSON"]),
    (lambda d: _record(d, lambda r: r.update(path=3)), ["record.path = 3 is not a name"]),
    (lambda d: _record(d, lambda r: r.update(r="x")), ["record.r = 'x' is not a positive size"]),
], ids=["deep", "path-int", "rank-str"])
def test_tampered_slot_records(tiny, dynamic, capsys, value, names):
    """Before: RecursionError in site discovery and analyse, AttributeError in export-adapter, or a silent pass."""
    bad = _with_metadata(dynamic, "lorapass.lora", value(dynamic))
    spec = REPO / "hw_specs" / "h100.yaml"
    for args in (["export-adapter", tiny.a, "--model", bad, "-o", tiny.out / "a.onnx_adapter"],
                 ["inspect", bad], ["rewrite", bad, "--adapter", tiny.a, "--force", "-o", tiny.out / "o.onnx"],
                 ["analyse", bad, "--hw", spec, "--dims", "n=4"]):
        fails(capsys, tiny, args, 2, bad, *names)


@pytest.mark.parametrize("text, code, names", [
    (DEEP, 2, ["genai_config.json", "not a readable JSON file"]),
    (json.dumps({"model": [1]}), 0, []),
], ids=["deep", "model-a-list"])
def test_genai_config_beside_the_model(tiny, capsys, text, code, names):
    """Before: RecursionError, and AttributeError for a "model" that is not an object (now: not a genai folder)."""
    (tiny.model.parent / "genai_config.json").write_text(text)
    if code:
        fails(capsys, tiny, merge(tiny), code, *names)
    else:
        assert cli(capsys, merge(tiny))[0] == 0
        x = torch.randn(3, 16)
        np.testing.assert_allclose(ort_output(tiny.out / "o.onnx", x), peft_output(tiny, tiny.a, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [
    {"down_block_types": ["A", "B"], "up_block_types": ["A", "B"], "layers_per_block": "2"},
    {"down_block_types": [1], "up_block_types": [2]},
    {"down_block_types": ["A", "B"], "up_block_types": ["A", "B"], "layers_per_block": [1]},
], ids=["layers-str", "types-int", "layers-short"])
def test_unet_config_of_the_wrong_types(tiny, capsys, config):
    """Before: TypeError while laying out the blocks."""
    (tiny.root / "unet.json").write_text(json.dumps(config))
    path = tiny.root / "lora.safetensors"
    save_file({"lora_unet_q.lora_down.weight": _f(4, 16), "lora_unet_q.lora_up.weight": _f(16, 4)}, str(path))
    fails(capsys, tiny, [*merge(tiny, None, path), "--unet-config", tiny.root / "unet.json"], 2, "unet.json",
          "not a diffusers UNet config")


# ------------------------------------------------------------------ commands and the Python API

def test_verify_a_multi_graph(tiny, capsys):
    """Before: ONNX Runtime's ValueError (no lora_ids feed), exit 3."""
    multi = tiny.out / "multi.onnx"
    assert cli(capsys, ["rewrite", tiny.model, "--strategy", "multi", "--adapter", tiny.a, "--adapter", tiny.b,
                        "-o", multi])[0] == 0
    fails(capsys, tiny, ["verify", tiny.model, multi, "--adapter", tiny.a], 2, multi, "['lora_ids']")


@pytest.mark.parametrize("args, names", [
    (lambda c: ["analyse", c.model, "--hw", "hw_specs/h100.yaml", "--dims", "n=-5"], ["--dims 'n=-5'", "positive"]),
    (lambda c: merge(c)[:-1] + [str(c.out / "a\0b.onnx")], ["NUL byte"]),
], ids=["negative-dims", "nul-in-output"])
def test_command_line_values(tiny, capsys, monkeypatch, args, names):
    """Before: a negative batch priced as negative FLOPs; ValueError (exit 3) for a NUL in -o."""
    monkeypatch.chdir(REPO)
    fails(capsys, tiny, args(tiny), 2, *names)


def test_session_refuses_what_onnx_runtime_would_fail_on_later(tiny, dynamic, capsys):
    """Before: RuntimeError for an unparsable adapter file, an error only on the first run for a bank file on a
    dynamic graph, OverflowError for a uint64 row id, JSONDecodeError / KeyError for corrupt metadata."""
    from lorapass import Session

    multi = tiny.out / "multi.onnx"
    assert cli(capsys, ["rewrite", tiny.model, "--strategy", "multi", "--adapter", tiny.a, "--adapter", tiny.b,
                        "-o", multi])[0] == 0
    bank = tiny.out / "bank.onnx_adapter"
    assert cli(capsys, ["export-adapter", tiny.a, tiny.b, "--model", multi, "-o", bank])[0] == 0
    garbage = tiny.out / "garbage.onnx_adapter"
    garbage.write_bytes(b"not an adapter" * 8)
    session = Session(dynamic)
    with pytest.raises(AdapterError, match="garbage.onnx_adapter: not an ONNX Runtime adapter file"):
        session.add_adapter("g", garbage)
    with pytest.raises(AdapterError, match=r"parameter '[kq]\.lora_[AB]_bank' is no input of"):
        session.add_adapter("bank", bank)
    rows = Session(multi)
    x = np.ones((3, 16), np.float32)
    with pytest.raises(AdapterError, match="row 0: id 18446744073709551615 is outside the bank"):
        rows.run({"x": x}, adapters=[np.uint64(2**64 - 1), 0, 0])
    rows.add_adapter("ab", bank, adapters=["a", "b"])
    assert np.isfinite(rows.run({"x": x}, adapter="ab", adapters=["b", None, "a"])[0]).all()
    for value, message in ((DEEP, "is not valid JSON"), (json.dumps([{"slot": "bank"}]), "has no 'ids'")):
        with pytest.raises(ModelError, match=message):
            Session(_with_metadata(multi, "lorapass.lora", value))


def test_slots_mean_banks(tiny, capsys):
    """Before: ``--slots`` with a rules file fell back to the rules' merge ("needs an adapter's weights"), and
    ``--dora`` was silently dropped from banks that cannot carry it."""
    rules = tiny.root / "rules.yaml"
    rules.write_text("target_modules: [k]\nr: 2\n")
    out = tiny.out / "o.onnx"
    fails(capsys, tiny, ["rewrite", tiny.model, "--slots", "2", "--target", "k", "--dora", "-o", out], 2, "--dora",
          "multi banks hold additive LoRA only")
    assert cli(capsys, ["rewrite", tiny.model, "--slots", "2", "--rules", rules, "-o", out])[0] == 0
    graph = onnx.load(out, load_external_data=False).graph
    assert {"lora_ids", "k.lora_A_bank"} <= {i.name for i in graph.input} and "q.lora_A_bank" not in str(graph.input)
