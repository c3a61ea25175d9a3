"""fx site discovery: every torch linear of a torch.export / symbolic_trace graph, named as PEFT names it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from builders import Wrapper, build, example_ids, torch_linears
from transformers.pytorch_utils import Conv1D

from lorapass.fx.program import Program
from lorapass.fx.sites import find_sites
from lorapass.onnx.load import load_model
from lorapass.onnx.sites import find_sites as find_onnx_sites

FAMILIES = ("llama", "gpt2", "bert")


@pytest.fixture(scope="module")
def traced():
    cache: dict[str, tuple[torch.nn.Module, torch.export.ExportedProgram]] = {}

    def get(family: str):
        if family not in cache:
            model = build(family)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.export(Wrapper(model).eval(), (example_ids(),), strict=False)
            cache[family] = (model, ep)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_found_with_path_shape_layout_and_weight(traced, family):
    model, ep = traced(family)
    program = Program(ep)
    report = find_sites(program)
    expected = torch_linears(model)
    assert report.prefix == "m" and report.prefix_source == "nn_module_stack classes"
    assert report.unresolved == []
    linears = [s for s in report.sites if s.kind == "linear"]
    assert {s.path for s in linears} == set(expected)
    embeddings = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    assert {s.path for s in report.sites if s.kind == "embedding"} == embeddings  # aten.embedding sites
    for site in linears:
        module = model.get_submodule(site.path)
        assert (site.in_features, site.out_features) == expected[site.path]
        assert site.source == "nn_module_stack" and site.dtype == "float"
        if isinstance(module, Conv1D):
            assert (site.op, site.layout) == ("aten.addmm", "in_out")  # GPT-2 Conv1D: addmm, weight [in, out]
        else:
            assert (site.op, site.layout) == ("aten.linear", "out_in")
        weight = program.tensor(site.weight)
        np.testing.assert_array_equal(weight.detach().numpy(), module.weight.detach().numpy())
        assert (site.bias is not None) == (getattr(module, "bias", None) is not None), site.path


@pytest.mark.parametrize("family,heads", [("llama", ["lm_head"]), ("gpt2", ["lm_head"]), ("bert", [])])
def test_output_heads(traced, family, heads):
    assert find_sites(Program(traced(family)[1])).output_heads == heads


def test_same_paths_as_the_onnx_frontend(traced, exported):
    """One vocabulary: the fx and ONNX frontends name the same sites the same way."""
    for family in FAMILIES:
        fx_report = find_sites(Program(traced(family)[1]))
        onnx_report = find_onnx_sites(load_model(exported(family)[1]))
        fx = {s.path: (s.in_features, s.out_features, s.layout) for s in fx_report.sites}
        onnx = {s.path: (s.in_features, s.out_features) for s in onnx_report.sites}
        assert {p: v[:2] for p, v in fx.items()} == onnx
        assert fx_report.output_heads == onnx_report.output_heads


def test_prefix_given_or_guessed_from_wanted_paths(traced):
    program = Program(traced("llama")[1])
    assert find_sites(program, prefix="").sites[1].path == "m.model.layers.0.self_attn.q_proj"  # [0]: embed_tokens
    assert find_sites(program, prefix="m.model").sites[1].path == "layers.0.self_attn.q_proj"


def test_unwrapped_model_needs_no_prefix():
    model = build("bert")
    ep = torch.export.export(model, (), {"input_ids": example_ids()}, strict=False)
    report = find_sites(Program(ep))
    assert report.prefix == "" and "encoder.layer.0.attention.self.query" in {s.path for s in report.sites}


def test_decomposed_program_sites_are_mm_of_transposed_weights(traced):
    """After run_decompositions linear is mm(view(x), permute(W)), or bmm(x, view(expand(permute(W)))) when its
    input is not contiguous (o_proj): all still found, layout out_in."""
    model, ep = traced("llama")
    report = find_sites(Program(ep.run_decompositions()))
    linears = [s for s in report.sites if s.kind == "linear"]
    assert {s.path for s in linears} == set(torch_linears(model))
    assert {(s.op, s.layout) for s in linears} == {("aten.mm", "out_in"), ("aten.bmm", "out_in")}
    assert {s.path for s in linears if s.op == "aten.bmm"} == {f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)}
    assert report.output_heads == ["lm_head"]


class Block(torch.nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.q = torch.nn.Linear(width, width)
        self.v = torch.nn.Linear(width, width, bias=False)
        self.proj = Conv1D(width, width)
        self.gain = torch.nn.Parameter(torch.randn(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.relu(self.q(x)) * self.v(x)
        return x + self.proj(mixed) + 0.1 * (mixed @ self.gain)  # a raw matmul of Block's own parameter


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.head = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_symbolic_trace_sites_are_module_calls_and_conv1d_addmm():
    torch.manual_seed(0)
    program = Program(torch.fx.symbolic_trace(Tiny().eval()))
    report = find_sites(program)
    found = {s.path: (s.op, s.layout, s.source) for s in report.sites}
    assert found == {
        **{f"blocks.{i}.{n}": ("call_module", "out_in", "call_module") for i in (0, 1) for n in ("q", "v")},
        **{f"blocks.{i}.proj": ("torch.addmm", "in_out", "nn_module_stack") for i in (0, 1)},
        "head": ("call_module", "out_in", "call_module"),
    }
    # Block's own `mixed @ gain` is a linear op, but not a module PEFT can give LoRA: reported, not a site
    assert len(report.unresolved) == 2 and all("not a LoRA layer" in u for u in report.unresolved)
    assert report.output_heads == ["head"] and report.prefix == ""
