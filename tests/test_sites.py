"""Site discovery on real exports: every torch linear found, named by its module path, with its layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from builders import FAMILIES, torch_linears
from lorapass.onnx import naming
from lorapass.onnx.load import load_model
from lorapass.onnx.sites import find_sites


def weight_as_out_in(site, graph) -> np.ndarray:
    w = graph.graph.initializers[site.weight].const_value.numpy()
    return w.T if site.layout == "in_out" else w


CASES = [(f, True) for f in FAMILIES] + [(f, False) for f, fam in FAMILIES.items() if fam.torchscript]


@pytest.mark.parametrize("family,dynamo", CASES, ids=[f"{f}-{'dynamo' if d else 'torchscript'}" for f, d in CASES])
def test_every_linear_found_with_its_path_shape_and_weight(exported, family, dynamo):
    model, path = exported(family, dynamo)
    graph = load_model(path)
    report = find_sites(graph, prefix=None if dynamo else "m")
    expected = torch_linears(model)
    found = {s.path: s for s in report.sites if s.kind == "linear"}
    assert report.unresolved == []
    assert set(found) == set(expected)
    tables = {s.path: s for s in report.sites if s.kind == "embedding"}  # every nn.Embedding, as its Gather
    embeddings = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    assert set(tables) == set(embeddings)
    for path, site in tables.items():
        assert (site.in_features, site.out_features) == tuple(embeddings[path].weight.shape) and site.op == "Gather"
        np.testing.assert_array_equal(graph.graph.initializers[site.weight].const_value.numpy(),
                                      embeddings[path].weight.detach().numpy())
    for path, site in found.items():
        assert (site.in_features, site.out_features) == expected[path]
        module = model.get_submodule(path)
        torch_w = module.weight.detach().numpy()  # tied weights (lm_head) appear once in named_parameters
        if isinstance(module, Conv1D):
            torch_w = torch_w.T
        # the graph's weight is the module's own weight, whatever the layout it was stored in
        np.testing.assert_array_equal(weight_as_out_in(site, graph), torch_w)
        if getattr(module, "bias", None) is not None:
            assert site.bias is not None, path


def test_dynamo_prefix_read_from_class_records(exported):
    _, path = exported("llama")
    report = find_sites(load_model(path))
    assert report.prefix == "m" and report.prefix_source == "exporter class records"
    assert report.output_heads == ["lm_head"]
    assert all(s.source == "name_scopes" for s in report.sites)


def test_torchscript_prefix_guessed_from_adapter_names(exported):
    model, path = exported("opt", dynamo=False)
    wanted = ["model.decoder.layers.0.self_attn.q_proj", "model.decoder.layers.1.fc1"]
    report = find_sites(load_model(path), wanted=wanted)
    assert report.prefix == "m" and report.prefix_source == "adapter module names"
    assert set(wanted) <= {s.path for s in report.sites}


def test_torchscript_scope_map_repairs_dropped_scopes():
    # TorchScript names OPT's nodes /m/decoder/... although the module is m.model.decoder
    mapping = naming.learn_scope_map([("m.decoder.layers.0.fc1", "m.model.decoder.layers.0.fc1")])
    assert mapping == {"m.decoder": "m.model.decoder"}
    assert naming.apply_scope_map("m.decoder.layers.1.self_attn.q_proj", mapping) == "m.model.decoder.layers.1.self_attn.q_proj"
    assert naming.apply_scope_map("m.lm_head", mapping) == "m.lm_head"


def test_node_name_strategy_alone(exported):
    """The TorchScript node-name strategy by itself names the attention projections of BERT."""
    _, path = exported("bert", dynamo=False)
    graph = load_model(path)
    node = next(n for n in graph.graph if n.name == "/m/encoder/layer.0/attention/self/query/MatMul")
    assert naming.from_node_name(node, node.inputs[1], None) == "m.encoder.layer.0.attention.self.query"


def test_genai_builder_style_names_are_reported_as_they_are():
    """onnxruntime-genai names nodes /model/layers.N/attn/q_proj/MatMul: kept verbatim (attn, not self_attn)."""
    import onnx_ir as ir

    x = ir.Value(name="x", shape=ir.Shape(["b", 8]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", shape=ir.Shape([8, 4]), type=ir.TensorType(ir.DataType.FLOAT),
                 const_value=ir.Tensor(np.ones((8, 4), np.float32), name="w"))
    node = ir.Node("", "MatMul", [x, w], name="/model/layers.3/attn/q_proj/MatMul")
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 18})
    report = find_sites(ir.Model(graph, ir_version=10))
    assert [s.path for s in report.sites] == ["model.layers.3.attn.q_proj"]
    assert report.sites[0].source == "node_name"
