"""Sites inside subgraphs: a merged decoder (an ``If`` on ``use_cache_branch`` whose two branches read shared
outer-scope initializers, as optimum's ``merge_decoders`` builds it) rewritten by merge and dynamic, both
branches checked against PEFT."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import onnx
import pytest
import torch
import transformers as tf
from onnx import helper, numpy_helper

from builders import build, make_adapter
from lorapass.onnx.load import load_model
from lorapass.onnx.rewrite import rewrite
from lorapass.onnx.sites import find_sites
from lorapass.ort_adapter import Session, export_adapter
from lorapass.rules import LoraRule

LAYERS = 2
PRESENT = [f"present.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
PAST = [f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]


class _Decoder(torch.nn.Module):
    """input_ids (+ past keys/values as flat tensors) -> logits, present keys/values: optimum's decoder I/O."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids, *past):
        cache = tf.DynamicCache(config=self.m.config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        start = past[0].shape[2] if past else 0
        positions = torch.arange(start, start + input_ids.shape[1]).unsqueeze(0)
        out = self.m(input_ids=input_ids, past_key_values=cache, position_ids=positions, use_cache=True)
        return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])


def _export(model, args, names, path):
    axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    axes |= {n: {0: "batch", 2: "past"} for n in names[1:len(args)]} | {n: {0: "batch", 2: "total"} for n in PRESENT}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Decoder(model), args, str(path), dynamo=False, input_names=names[:len(args)],
                          output_names=["logits", *PRESENT], dynamic_axes=axes)
    return onnx.load(str(path))


def merge_decoders(decoder: onnx.ModelProto, with_past: onnx.ModelProto) -> onnx.ModelProto:
    """optimum's merge_decoders: initializers deduplicated by content into the outer graph (small integer ones
    stay in their branch), an ``If`` on ``use_cache_branch`` with the with-past graph as then-branch."""
    shared: dict[tuple, str] = {}
    outer, branch_inits = [], ([], [])
    for k, model in enumerate((decoder, with_past)):
        renames = {}
        for t in model.graph.initializer:
            if len(t.dims) == 0 or (len(t.dims) == 1 and t.data_type in (onnx.TensorProto.INT32, onnx.TensorProto.INT64)):
                branch_inits[k].append(t)
                continue
            key = (t.data_type, tuple(t.dims), hashlib.sha512(numpy_helper.to_array(t).tobytes()).hexdigest())
            if key not in shared:
                shared[key] = t.name if t.name not in {o.name for o in outer} else f"{t.name}_merged_{len(outer)}"
                outer.append(numpy_helper.from_array(numpy_helper.to_array(t), shared[key]))
            renames[t.name] = shared[key]
        for node in model.graph.node:
            node.input[:] = [renames.get(name, name) for name in node.input]
    no_past = helper.make_graph(decoder.graph.node, "no_past", [], decoder.graph.output, branch_inits[0])
    past = helper.make_graph(with_past.graph.node, "with_past", [], with_past.graph.output, branch_inits[1])
    flag = helper.make_tensor_value_info("use_cache_branch", onnx.TensorProto.BOOL, [1])
    node = helper.make_node("If", ["use_cache_branch"], [o.name for o in decoder.graph.output], name="optimum::if",
                            then_branch=past, else_branch=no_past)
    inputs = {v.name: v for m in (decoder, with_past) for v in m.graph.input}
    graph = helper.make_graph([node], "merged", [*inputs.values(), flag], decoder.graph.output, outer)
    return helper.make_model(graph, opset_imports=decoder.opset_import)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """(torch model, merged decoder path, prompt ids, next id) for a tiny Llama (eager attention: TorchScript)."""
    folder = tmp_path_factory.mktemp("merged_decoder")
    model = build("llama")
    model.set_attn_implementation("eager")
    ids, nxt = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(3)), torch.tensor([[7]])
    with torch.no_grad():
        past = _Decoder(model)(ids)[1:]
    decoder = _export(model, (ids,), ["input_ids"], folder / "decoder.onnx")
    with_past = _export(model, (nxt, *past), ["input_ids", *PAST], folder / "decoder_with_past.onnx")
    path = folder / "decoder_model_merged.onnx"
    onnx.save(merge_decoders(decoder, with_past), str(path))
    return model, path, ids.numpy(), nxt.numpy()


def _both_branches(run, ids, nxt):
    """Logits of the prompt (no-past branch) and of the next token with the present it returned (past branch)."""
    empty = {n: np.zeros((1, 2, 0, 8), np.float32) for n in PAST}
    first = run({"input_ids": ids, "use_cache_branch": np.array([False]), **empty})
    past = dict(zip(PAST, first[1:]))
    second = run({"input_ids": nxt, "use_cache_branch": np.array([True]), **past})
    return first[0], second[0]


def _peft_logits(peft_model, ids, nxt):
    with torch.no_grad():
        full = peft_model(input_ids=torch.tensor(np.concatenate([ids, nxt], 1))).logits.numpy()
    return full[:, :-1], full[:, -1:]


def _check(actual, expected):
    for got, want in zip(actual, expected):
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_sites_found_in_both_branches_sharing_one_store(merged):
    _, path, _, _ = merged
    report = find_sites(load_model(path), prefix="m")
    by_path = {p: sites for p, sites in report.by_path().items() if sites[0].kind == "linear"}
    assert len(by_path) == 15 and all(len(sites) == 2 for sites in by_path.values())
    for sites in by_path.values():  # the two branches read one outer initializer: one store, edited once
        assert sites[0].storage.store is sites[1].storage.store
        assert sites[0].storage.node.graph is not sites[1].storage.node.graph


def test_merge_changes_each_shared_weight_once_and_matches_peft_on_both_branches(merged, tmp_path):
    model, path, ids, nxt = merged
    peft_model = make_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, target_modules="all-linear")
    out = tmp_path / "merged.onnx"
    result = rewrite(path, out, adapter=str(tmp_path / "ad"), strategy="merge", prefix="m")
    assert len(result.targets) == 28  # 14 modules, each computed in both branches
    before, after = onnx.load(str(path)), onnx.load(str(out))
    assert len(after.graph.initializer) == len(before.graph.initializer)  # merged in place, no per-branch copies
    session = Session(out)
    expected = _peft_logits(peft_model, ids, nxt)
    _check(_both_branches(session.run, ids, nxt), expected)
    base = _both_branches(Session(path).run, ids, nxt)
    assert all(np.abs(b - e).max() > 0.05 * np.abs(e).max() for b, e in zip(base, expected))


def test_dynamic_shares_one_slot_set_between_branches(merged, tmp_path):
    model, path, ids, nxt = merged
    peft_a = make_adapter(model, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    out = tmp_path / "dynamic.onnx"
    rewrite(path, out, adapter=str(tmp_path / "a"), strategy="dynamic", prefix="m")
    slot_inputs = [v.name for v in onnx.load(str(out)).graph.input if ".lora_" in v.name]
    assert len(slot_inputs) == 2 * 6  # six modules, one A/B pair each, read by both branches
    _check(_both_branches(Session(out).run, ids, nxt), _peft_logits(peft_a, ids, nxt))


def test_lora_ready_slots_hot_swap_adapters_on_both_branches(merged, tmp_path):
    model, path, ids, nxt = merged
    peft = {"a": make_adapter(model, tmp_path / "a", r=4, lora_alpha=8, target_modules="all-linear"),
            "b": make_adapter(model, tmp_path / "b", r=2, lora_alpha=4, target_modules=["v_proj", "up_proj"], seed=5)}
    out = tmp_path / "slots.onnx"
    rewrite(path, out, rules=LoraRule(name="slots", target_modules="all-linear", r=8, strategy="dynamic"), prefix="m")
    session = Session(out)
    for name in peft:
        export_adapter(str(tmp_path / name), out, tmp_path / f"{name}.onnx_adapter")
        session.add_adapter(name, tmp_path / f"{name}.onnx_adapter")
    for name in ("a", "b", "a"):
        run = lambda feeds, name=name: session.run(feeds, adapter=name)  # noqa: E731
        _check(_both_branches(run, ids, nxt), _peft_logits(peft[name], ids, nxt))


def in_loop(decoder: onnx.ModelProto) -> onnx.ModelProto:
    """The prompt decoder as the body of a ``Loop`` (a trip count input, logits as the body's scan output) reading
    its weights from the outer scope, as generation loops (ORT's BeamSearch/Loop exports) hold a decoder."""
    body_in = [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
               helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, [])]
    keep = helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going")
    small = [t for t in decoder.graph.initializer if len(t.dims) == 0]  # scalars stay in the body
    body = helper.make_graph([*decoder.graph.node, keep], "step", body_in,
                             [helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
                              helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None)], small)
    loop = helper.make_node("Loop", ["trips", "cond"], ["steps_logits"], name="generate", body=body)
    graph = helper.make_graph([loop], "looped",
                              [decoder.graph.input[0], helper.make_tensor_value_info("trips", onnx.TensorProto.INT64, []),
                               helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("steps_logits", onnx.TensorProto.FLOAT, None)],
                              [t for t in decoder.graph.initializer if len(t.dims) > 0])
    return helper.make_model(graph, opset_imports=decoder.opset_import)


@pytest.mark.parametrize("strategy", ["merge", "dynamic"])
def test_a_decoder_inside_a_loop_body_matches_peft(strategy, tmp_path):
    model = build("llama")
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(4))
    path = tmp_path / "looped.onnx"
    onnx.save(in_loop(_export(model, (ids,), ["input_ids"], tmp_path / "decoder.onnx")), str(path))
    report = find_sites(load_model(path), prefix="m")
    assert len([s for s in report.sites if s.kind == "linear"]) == 15  # every linear, found inside the body
    peft_model = make_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    out = tmp_path / f"{strategy}.onnx"
    rewrite(path, out, adapter=str(tmp_path / "ad"), strategy=strategy, prefix="m")
    feeds = {"input_ids": ids.numpy(), "trips": np.array(2, np.int64), "cond": np.array(True)}
    steps = Session(out).run(feeds)[0]
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits.numpy()
    assert steps.shape[0] == 2
    for step in steps:  # each iteration of the loop computes the adapted decoder
        assert np.abs(step - expected).max() <= 1e-4 * np.abs(expected).max()
    base = Session(path).run(feeds)[0][0]
    assert np.abs(base - expected).max() > 0.05 * np.abs(expected).max()
