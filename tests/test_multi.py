"""Strategy multi: one graph, a different adapter per batch row, against PEFT's own mixed-batch forward."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from builders import example_ids, make_adapter, rel_err, run_onnx
from lorapass.cli import main
from lorapass.errors import AdapterError
from lorapass.ort_adapter import Session

TOL = 1e-4
# per family: the adapters (PEFT LoraConfig keywords), which differ in rank, alpha, rsLoRA, patterns and targets
ADAPTERS = {
    "llama": {
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj", "down_proj"],
                  rank_pattern={"down_proj": 2}),
        "c": dict(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj", "gate_proj"],
                  alpha_pattern={r"layers\.1\.self_attn\.v_proj": 12}),
    },
    "gpt2": {  # Conv1D sites, c_attn the fused q/k/v projection; activations flattened to [batch*seq, in]
        "a": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        "b": dict(r=6, lora_alpha=6, use_rslora=True, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    },
    "bert": {  # TorchScript: Gemm on [batch*seq, in]
        "a": dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
        "b": dict(r=8, lora_alpha=4, target_modules=["key", "dense"], rank_pattern={"output.dense": 3}),
    },
}
CASES = [("llama", True), ("gpt2", True), ("bert", False)]
ID_VECTORS = [[0, 0, 0, 0], [1, 2, 3, 0], [2, 2, 2, 2], [3, 1, 3, 1], [0, 1, 0, 2, 1]]


def peft_mixed(model, directories: dict) -> torch.nn.Module:
    """One PEFT model holding every adapter under its name (PEFT's own mixed-batch reference)."""
    from peft import PeftModel

    names = list(directories)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(directories[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(directories[name]), adapter_name=name)
    return peft_model.eval()


def reference(peft_model, ids: torch.Tensor, names: list[str | None]) -> np.ndarray:
    """PEFT's output with ``adapter_names`` (None: ``__base__``)."""
    rows = [name or "__base__" for name in names]
    kwargs = {} if peft_model.config.model_type == "bert" else {"use_cache": False}
    with torch.no_grad():
        out = peft_model(input_ids=ids, adapter_names=rows, **kwargs)
    return (out.last_hidden_state if peft_model.config.model_type == "bert" else out.logits).numpy()


@pytest.fixture(scope="module")
def multi(exported, tmp_path_factory):
    """``multi(family, dynamo)`` -> (model, base onnx, multi onnx, adapter dirs, PEFT model), made once."""
    cache = {}

    def get(family: str, dynamo: bool):
        if family not in cache:
            model, base = exported(family, dynamo)
            folder = tmp_path_factory.mktemp(f"multi_{family}")
            dirs = {}
            for seed, (name, config) in enumerate(ADAPTERS[family].items(), start=1):
                make_adapter(model, folder / name, seed=seed, **config)
                dirs[name] = folder / name
            out = folder / "multi.onnx"
            args = ["rewrite", str(base), "--strategy", "multi", "-o", str(out)]
            assert main(args + [a for d in dirs.values() for a in ("--adapter", str(d))]) == 0
            cache[family] = (model, base, out, dirs, peft_mixed(model, dirs))
        return cache[family]

    return get


@pytest.mark.parametrize("family,dynamo", CASES, ids=[f"{f}-{'dynamo' if d else 'torchscript'}" for f, d in CASES])
def test_multi_matches_peft_mixed_batches(multi, family, dynamo):
    model, base, out, dirs, peft_model = multi(family, dynamo)
    names = [None, *dirs]
    session = ort.InferenceSession(str(out), _quiet(), providers=["CPUExecutionProvider"])
    for seed, lora_ids in enumerate(ID_VECTORS):
        lora_ids = [i % len(names) for i in lora_ids]
        ids = example_ids(batch=len(lora_ids), seq=6, seed=seed)
        expected = reference(peft_model, ids, [names[i] for i in lora_ids])
        got = session.run(None, {"input_ids": ids.numpy(), "lora_ids": np.array(lora_ids, np.int64)})[0]
        assert rel_err(got, expected) <= TOL, lora_ids
        base_out = run_onnx(base, ids)
        for row, i in enumerate(lora_ids):  # each row is its own adapter's output, never its neighbours'
            if i:
                assert rel_err(base_out[row], expected[row]) > 1e-3
            else:
                np.testing.assert_array_equal(got[row], base_out[row])  # the base model, exactly


def test_metadata_records_the_bank(multi):
    _, _, out, _, _ = multi("llama", True)
    proto = onnx.load(out, load_external_data=False)
    records = {r["path"]: r for r in json.loads({p.key: p.value for p in proto.metadata_props}["lorapass.lora"])}
    assert {r["slot"] for r in records.values()} == {"bank"}
    assert all((r["adapters"], r["slots"], r["ids"]) == (["a", "b", "c"], 4, "lora_ids") for r in records.values())
    q, down, v1 = (records[f"model.layers.{i}.{m}"]
                   for i, m in ((0, "self_attn.q_proj"), (0, "mlp.down_proj"), (1, "self_attn.v_proj")))
    assert (q["ranks"], q["r"], down["ranks"], down["r"], v1["ranks"]) == ([4, 8, 0], 8, [0, 2, 0], 2, [4, 0, 2])
    path = "model.layers.1.self_attn.v_proj"
    assert v1["modules"] == [{path: {"r": 4, "alpha": 8, "scale": 2.0}}, {},
                             {path: {"r": 2, "alpha": 12, "scale": 6.0}}]
    assert q["modules"][1]["model.layers.0.self_attn.q_proj"]["scale"] == pytest.approx(16 / 8 ** 0.5)  # rsLoRA
    inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    path = "model.layers.0.self_attn.q_proj"
    assert inputs[f"{path}.lora_A_bank"] == ["lora_slots", 32, f"{path}.r"]
    assert inputs[f"{path}.lora_B_bank"] == ["lora_slots", f"{path}.r", 32]
    assert inputs["lora_ids"] == ["batch"] and len(inputs) == 1 + 1 + 2 * len(records)
    banks = {i.name: onnx.numpy_helper.to_array(i, str(out.parent))
             for i in proto.graph.initializer if i.name.endswith("_bank")}
    a_bank = banks[f"{path}.lora_A_bank"]
    assert a_bank.shape == (4, 32, 8) and not a_bank[0].any() and not a_bank[1][:, 4:].any() and not a_bank[3].any()


def test_session_runs_adapters_by_name(multi):
    model, base, out, dirs, peft_model = multi("llama", True)
    session = Session(out)
    rows = ["a", None, "c", "a", "b"]
    ids = example_ids(batch=len(rows), seq=5, seed=11)
    got = session.run({"input_ids": ids.numpy()}, adapters=rows)[0]
    assert rel_err(got, reference(peft_model, ids, rows)) <= TOL
    feeds = {"input_ids": ids.numpy()}
    with pytest.raises(AdapterError, match=r"row 1: no adapter named 'x'.*\['a', 'b', 'c'\]"):
        session.run(feeds, adapters=["a", "x", None, None, None])
    with pytest.raises(AdapterError, match="4 row adapter"):
        session.run(feeds, adapters=["a", None, None, None])
    with pytest.raises(AdapterError, match=r"row 2 has id 4, outside the bank \(ids 0..3\)"):
        session.run(feeds | {"lora_ids": np.array([0, 1, 4, 0, 0], np.int64)})
    with pytest.raises(AdapterError, match="needs each row's adapter"):
        session.run(feeds)


@pytest.mark.parametrize("bad", [[0, 1, 4, 0], [0, -1, 0, 0], [0, 1, 2]], ids=["past-end", "negative", "length"])
def test_onnx_runtime_rejects_ids_outside_the_bank(multi, bad):
    _, _, out, _, _ = multi("llama", True)
    session = ort.InferenceSession(str(out), _quiet(), providers=["CPUExecutionProvider"])
    node = "lora_ids/rows_of_batch" if len(bad) == 3 else "lora_ids/bounds"
    with pytest.raises(Exception, match=node):
        session.run(None, {"input_ids": example_ids(batch=4).numpy(), "lora_ids": np.array(bad, np.int64)})


def test_empty_banks_filled_by_a_bank_file(exported, multi, tmp_path, capsys):
    model, base = exported("llama")
    ready = tmp_path / "ready.onnx"
    assert main(["rewrite", str(base), "--strategy", "multi", "--slots", "3", "--target", "q_proj", "k_proj", "v_proj",
                 "o_proj", "gate_proj", "up_proj", "down_proj", "--rank", "4", "-o", str(ready)]) == 0
    assert "lora_ids 0=base 1=(empty) 2=(empty) 3=(empty)" in capsys.readouterr().out
    ids = example_ids(batch=4, seq=5, seed=12)
    plain = {"input_ids": ids.numpy()}
    np.testing.assert_array_equal(Session(ready).run(plain, adapters=[0, 1, 2, 3])[0], run_onnx(base, ids))

    _, _, _, dirs, peft_model = multi("llama", True)
    bank = tmp_path / "bank.onnx_adapter"
    assert main(["export-adapter", str(dirs["c"]), str(dirs["b"]), "--model", str(ready), "-o", str(bank)]) == 0
    session = Session(ready)
    session.add_adapter("v1", bank, adapters=["c", "b"])  # ranks 2 and 8 into banks made for rank 4: any rank fits
    rows = ["b", None, "c", "b"]
    assert rel_err(session.run(plain, adapter="v1", adapters=rows)[0], reference(peft_model, ids, rows)) <= TOL
    with pytest.raises(AdapterError, match=r"row 2 has id 3, outside the bank \(ids 0..2\)"):
        session.run(plain | {"lora_ids": np.array([0, 1, 3, 0], np.int64)}, adapter="v1")
    with pytest.raises(AdapterError, match="holds 2 adapter"):
        session.add_adapter("v2", bank, adapters=["c"])


def test_bank_file_reorders_the_adapters_of_a_multi_graph(multi, tmp_path):
    _, _, out, dirs, peft_model = multi("llama", True)
    bank = tmp_path / "ca.onnx_adapter"
    assert main(["export-adapter", str(dirs["c"]), str(dirs["a"]), "--model", str(out), "-o", str(bank)]) == 0
    session = Session(out)
    session.add_adapter("ca", bank, adapters=["c", "a"])
    ids = example_ids(batch=3, seq=4, seed=13)
    lora_ids = np.array([2, 1, 0], np.int64)  # a, c, base in the file's order
    got = session.run({"input_ids": ids.numpy(), "lora_ids": lora_ids}, adapter="ca")[0]
    assert rel_err(got, reference(peft_model, ids, ["a", "c", None])) <= TOL
    assert rel_err(session.run({"input_ids": ids.numpy(), "lora_ids": lora_ids})[0],
                   reference(peft_model, ids, ["b", "a", None])) <= TOL  # the graph's own bank: a, b, c


def test_export_bank_rejects_modules_without_a_bank(exported, multi, tmp_path, capsys):
    _, base = exported("llama")
    qv = tmp_path / "qv.onnx"
    assert main(["rewrite", str(base), "--strategy", "multi", "--slots", "2", "--target", "q_proj", "v_proj",
                 "-o", str(qv)]) == 0
    _, _, _, dirs, _ = multi("llama", True)
    target = tmp_path / "bank.onnx_adapter"
    assert main(["export-adapter", str(dirs["a"]), str(dirs["b"]), "--model", str(qv), "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"{dirs['b']}: 6 adapter module(s)" in err and "model.layers.0.self_attn.k_proj.lora_A_bank" in err
    assert not target.exists() and not list(tmp_path.glob(".bank.onnx_adapter*"))


@pytest.mark.parametrize("args,message", [
    (["--strategy", "dynamic", "--slots", "2", "--target", "q_proj"], "slots are for strategy multi"),
    (["--strategy", "multi", "--target", "q_proj"], "needs adapters"),
    (["--strategy", "multi", "--slots", "1", "--adapter", "{a}", "--adapter", "{b}"], "1 slot(s) cannot hold 2"),
    (["--strategy", "multi", "--slots", "0", "--target", "q_proj"], "a bank needs at least one slot"),
])
def test_rewrite_multi_bad_options(exported, multi, tmp_path, capsys, args, message):
    _, base = exported("llama")
    _, _, _, dirs, _ = multi("llama", True)
    out = tmp_path / "out.onnx"
    args = [a.format(a=dirs["a"], b=dirs["b"]) for a in args]
    assert main(["rewrite", str(base), "-o", str(out), *args]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_analyse_costs_the_gathered_bank_reads(multi):
    from pathlib import Path

    from lorapass.cost import ops as O
    from lorapass.cost.analysis import Analyser, ModelSource, Workload
    from lorapass.cost.hw import load_spec
    from lorapass.cost.onnx_ops import load_onnx_graph
    from lorapass.cost.parallel import Layout

    _, _, out, _, _ = multi("llama", True)
    proto = onnx.load(out, load_external_data=False)
    banks = {i.name: list(i.dims) for i in proto.graph.initializer if i.name.endswith("_bank")}  # fp32
    for batch, dims, distinct in ((2, None, 2), (8, None, 4), (8, {"lora_distinct": 1}, 1)):
        g = load_onnx_graph(out, batch, 1, 16, dims=dims)  # a decode step over 16 cached keys
        gathers = {op.name: op for op in g.ops if op.kind == O.GATHER_LORA}
        assert len(gathers) == len(banks)
        lora_a = 0
        for name, (slots, *slot) in banks.items():
            path, kind = name.removesuffix("_bank").rsplit(".lora_", 1)
            op, slot_bytes = gathers[f"{path}/lora_{kind}/Gather"], 4 * int(np.prod(slot))
            # distinct adapters' slots read, one slot per row written (and read by the batched MatMul)
            assert (op.weight_bytes, op.param_bytes, op.act_out) == (distinct * slot_bytes, slots * slot_bytes,
                                                                     batch * slot_bytes), name
            lora_a += 2 * batch * slot[0] * slot[1] if kind == "A" else 0  # every row: x @ its own [in, r] slot
        assert sum(op.flops for op in g.ops if op.kind == O.GEMM_LORA_A) == lora_a
    spec = load_spec(Path(__file__).resolve().parents[1] / "hw_specs" / "h100.yaml")
    decode = {}
    for distinct in (1, 4):
        source = ModelSource(out, dims={"lora_distinct": distinct})
        a = Analyser(source, spec, Workload(8, 16, 4)).analyse(Layout())
        assert a.strategy == "in-graph" and a.lora_sites == len(banks) // 2
        decode[distinct] = a.phases["decode"].bytes
    per_extra = sum(4 * int(np.prod(slot)) for _, *slot in banks.values())  # one more slot of every bank
    assert decode[4] - decode[1] == pytest.approx(3 * per_extra)


def _quiet() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 4  # banks are graph inputs on purpose, and bad ids are meant to fail
    return options


def test_lora_biases_ride_in_their_own_bank(exported, tmp_path, capsys):
    """PEFT's lora_bias in mixed batches: each row adds its adapter's B bias times the scale (a [slots, out] bank
    beside A and B); a bank file carries it; a bank without one refuses a biased adapter by key."""
    from variants import make_variant

    model, base = exported("llama")
    configs = {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True),
               "b": dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"]),
               "c": dict(r=8, lora_alpha=8, target_modules=["v_proj", "down_proj"], lora_bias=True)}
    dirs = {}
    for seed, (name, config) in enumerate(configs.items(), start=1):
        make_variant(model, tmp_path / name, seed=seed, **config)
        dirs[name] = tmp_path / name
    out = tmp_path / "multi.onnx"
    assert main(["rewrite", str(base), "--strategy", "multi", "-o", str(out)]
                + [a for d in dirs.values() for a in ("--adapter", str(d))]) == 0
    peft_model = peft_mixed(model, dirs)
    session = Session(out)
    ids = example_ids(batch=4, seq=6, seed=14)
    for rows in (["a", "b", "c", None], ["c", "c", "a", "b"]):
        assert rel_err(session.run({"input_ids": ids.numpy()}, adapters=rows)[0], reference(peft_model, ids, rows)) <= TOL
    with torch.no_grad():  # the biases matter: PEFT without them moves
        unbiased = copy.deepcopy(peft_model)
        for name, param in unbiased.named_parameters():
            if "lora_B" in name and name.endswith(".bias"):
                param.zero_()
    assert rel_err(reference(unbiased, ids, ["a", "b", "c", None]), reference(peft_model, ids, ["a", "b", "c", None])) > 1e-3

    bank = tmp_path / "ca.onnx_adapter"
    assert main(["export-adapter", str(dirs["c"]), str(dirs["a"]), "--model", str(out), "-o", str(bank)]) == 0
    session.add_adapter("ca", bank, adapters=["c", "a"])
    assert rel_err(session.run({"input_ids": ids.numpy()}, adapter="ca", adapters=["a", None, "c", "c"])[0],
                   reference(peft_model, ids, ["a", None, "c", "c"])) <= TOL

    plain = tmp_path / "plain.onnx"
    assert main(["rewrite", str(base), "--strategy", "multi", "--adapter", str(dirs["b"]), "--adapter", str(dirs["b"]),
                 "-o", str(plain)]) == 0
    make_variant(model, tmp_path / "d", seed=4, r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True)
    capsys.readouterr()
    assert main(["export-adapter", str(tmp_path / "d"), "--model", str(plain), "-o", str(tmp_path / "x.onnx_adapter")]) == 2
    err = capsys.readouterr().err
    assert "q_proj.lora_B.bias" in err and "no bias input" in err
