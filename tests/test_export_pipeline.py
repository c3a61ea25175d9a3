"""lorapass.export: trace → rewrite → torch.onnx.export. The ONNX matches PEFT's eager output, exposes the same
LoRA inputs as ``lorapass rewrite --strategy dynamic``, and takes ONNX Runtime adapters (hot-swapped) alike."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from builders import FAMILIES, Wrapper, build, eager, example_ids, make_adapter, rel_err
from safetensors.numpy import load_file

from lorapass.cli import main as lorapass_main
from lorapass.errors import ModelError
from lorapass.fx.export import ExportResult, export, save
from lorapass.onnx.slots import METADATA_KEY
from lorapass.onnx.load import load_model
from lorapass.onnx.sites import find_sites as find_onnx_sites

TOL = 1e-4
TRIO = ("llama", "gpt2", "bert")
_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<kind>lora_A|lora_B)\.weight$")


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # LoRA initializers are graph inputs on purpose: no warning per input
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(path, ids: torch.Tensor, adapter_file=None) -> np.ndarray:
    sess = session(path)
    options = None
    if adapter_file is not None:
        adapter = ort.LoraAdapter()
        adapter.Load(str(adapter_file))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
    return sess.run(None, {sess.get_inputs()[0].name: ids.numpy()}, options)[0]


def ort_adapter(adapter_dir, path) -> dict[str, np.ndarray]:
    """An ONNX Runtime adapter file from a PEFT directory, written from the contract alone: ``<path>.lora_A`` =
    A.T [in, r], ``<path>.lora_B`` = (alpha/r)·B.T [r, out] (what ``lorapass export-adapter`` produces)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    params = {}
    for key, value in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        match = _KEY.match(key)
        weight = value.T if match["kind"] == "lora_A" else value.T * np.float32(scale)
        params[f"{match['path']}.{match['kind']}"] = np.ascontiguousarray(weight, dtype=np.float32)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    fmt.export_adapter(str(path))
    return params


@pytest.fixture(scope="module")
def family_case(tmp_path_factory):
    """``family_case(family)`` -> (model, adapter dir, folder, ids, PEFT eager output, base output)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            model = build(family)
            folder = tmp_path_factory.mktemp(f"export_{family}")
            peft_model = make_adapter(model, folder / "adapter", r=4, lora_alpha=8,
                                      target_modules=list(FAMILIES[family].targets))
            ids = example_ids(batch=3, seq=11, seed=5)  # another shape than the trace's example
            cache[family] = (model, folder / "adapter", folder, ids, eager(peft_model, ids), eager(model, ids))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def exports(family_case):
    """``exports(family, strategy)`` -> ExportResult of the pipeline on ``Wrapper(model)``, made once."""
    cache: dict[tuple[str, str], ExportResult] = {}

    def get(family: str, strategy: str) -> ExportResult:
        if (family, strategy) not in cache:
            model, adapter, folder, _, _, _ = family_case(family)
            cache[(family, strategy)] = export(Wrapper(model), (example_ids(),), adapter=adapter, strategy=strategy,
                                               path=folder / f"{strategy}.onnx")
        return cache[(family, strategy)]

    return get


@pytest.mark.parametrize("strategy", ["merge", "dynamic"])
@pytest.mark.parametrize("family", TRIO)
def test_exported_onnx_matches_peft(family_case, exports, family, strategy):
    _, _, _, ids, expected, base = family_case(family)
    result = exports(family, strategy)
    assert result.path.is_file()
    assert rel_err(run(result.path, ids), expected) <= TOL
    assert rel_err(base, expected) > 1e-3


@pytest.mark.parametrize("family", TRIO)
def test_dynamic_onnx_contract(family_case, exports, family):
    """Inputs ``<path>.lora_A`` [in, <path>.r] / ``<path>.lora_B`` [<path>.r, out], B pre-scaled, defaults = the
    adapter, ``lorapass.lora`` metadata: the contract of lorapass/onnx/dynamic.py."""
    _, adapter, folder, _, _, _ = family_case(family)
    result = exports(family, "dynamic")
    proto = onnx.load(str(result.path))
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    defaults = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    expected = ort_adapter(adapter, folder / "contract.onnx_adapter")
    records = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    assert sorted(result.lora_inputs) == sorted(expected) == sorted(n for n in inputs if ".lora_" in n)
    for record in records:
        path = record["path"]
        assert record["lora_A"] == f"{path}.lora_A" and record["lora_B"] == f"{path}.lora_B"
        assert inputs[record["lora_A"]] == [record["in"], f"{path}.r"]
        assert inputs[record["lora_B"]] == [f"{path}.r", record["out"]]
        assert (record["r"], record["alpha"], record["scale"]) == (4, 8.0, 2.0)
        for name in (record["lora_A"], record["lora_B"]):
            np.testing.assert_allclose(defaults[name], expected[name], rtol=1e-6, atol=1e-7)
    assert len(records) == len(expected) // 2
    overridable = {i.name for i in session(result.path).get_overridable_initializers()}
    assert set(expected) <= overridable
    # the LoRA branch is no linear layer of the model: ONNX site discovery sees the base model's sites only
    sites = find_onnx_sites(load_model(result.path))
    assert sorted(s.path for s in sites.sites) == sorted(s.path for s in result.fx.report.sites)


@pytest.mark.parametrize("strategy", ["merge", "dynamic"])
@pytest.mark.parametrize("family", TRIO)
def test_pipeline_and_rewrite_of_a_plain_export_agree(family_case, exports, exported, tmp_path, family, strategy):
    _, adapter, _, ids, expected, _ = family_case(family)
    _, plain = exported(family)
    out = tmp_path / "rewritten.onnx"
    assert lorapass_main(["rewrite", str(plain), "--adapter", str(adapter), "--strategy", strategy, "-o", str(out)]) == 0
    ours = exports(family, strategy).path
    assert rel_err(run(ours, ids), run(out, ids)) <= 1e-5
    assert rel_err(run(out, ids), expected) <= TOL
    if strategy == "dynamic":
        def lora_inputs(path):
            proto = onnx.load(str(path), load_external_data=False)
            return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                    for i in proto.graph.input if ".lora_" in i.name}

        def records(path):
            proto = onnx.load(str(path), load_external_data=False)
            return sorted(json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY]), key=lambda r: r["path"])

        assert lora_inputs(ours) == lora_inputs(out)
        assert records(ours) == records(out)


def test_hot_swapped_ort_adapter_works_on_both(family_case, exports, exported, tmp_path):
    """One ONNX Runtime adapter file (another adapter, another rank) drives the pipeline's ONNX and the
    rewritten plain export alike, at run time, without reloading the model."""
    model, adapter, _, ids, expected, _ = family_case("llama")
    swapped = make_adapter(model, tmp_path / "other", seed=7, r=8, lora_alpha=16, target_modules=list(FAMILIES["llama"].targets))
    expected_other = eager(swapped, ids)
    ort_adapter(tmp_path / "other", tmp_path / "other.onnx_adapter")
    rewritten = tmp_path / "rewritten.onnx"
    assert lorapass_main(["rewrite", str(exported("llama")[1]), "--adapter", str(adapter), "--strategy", "dynamic",
                          "-o", str(rewritten)]) == 0
    for path in (exports("llama", "dynamic").path, rewritten):
        assert rel_err(run(path, ids, tmp_path / "other.onnx_adapter"), expected_other) <= TOL
        assert rel_err(run(path, ids), expected) <= TOL  # no active adapter: the defaults
    assert rel_err(expected_other, expected) > 1e-3


def test_bare_transformers_model_with_keyword_inputs(family_case, tmp_path):
    """The user's own model (no wrapper) with keyword example inputs: paths need no prefix."""
    model, adapter, _, ids, expected, _ = family_case("bert")
    result = export(model, example_kwargs={"input_ids": example_ids()}, adapter=adapter, strategy="dynamic",
                    path=tmp_path / "bert.onnx", external_data=True)
    assert result.fx.report.prefix == ""
    assert "encoder.layer.0.attention.self.query.lora_A" in result.lora_inputs
    assert (tmp_path / "bert.onnx.data").is_file()
    sess = session(result.path)
    assert [i.name for i in sess.get_inputs()] == ["input_ids"]
    assert rel_err(sess.run(None, {"input_ids": ids.numpy()})[0], expected) <= TOL


def test_in_memory_export_and_save(family_case, exports, tmp_path):
    result = exports("gpt2", "merge")
    copy = save(result.onnx, tmp_path / "sub" / "copy.onnx")
    assert copy.is_file() and not list((tmp_path / "sub").glob(".*tmp*"))
    _, _, _, ids, expected, _ = family_case("gpt2")
    assert rel_err(run(copy, ids), expected) <= TOL


def test_export_errors():
    with pytest.raises(ModelError, match="example inputs"):
        export(build("bert"), adapter=None, rules=None)
    with pytest.raises(ModelError, match="directory"):
        save(onnx_model_stub(), "/")


def onnx_model_stub():
    import onnx_ir as ir

    return ir.Model(ir.Graph([], [], nodes=[]), ir_version=10)


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("strategy", ["merge", "dynamic"])
def test_symbolically_traced_graph_module(tmp_path, strategy):
    """A GraphModule (torch.fx.symbolic_trace) goes through the same pipeline; torch.onnx traces it itself."""
    torch.manual_seed(0)
    model = Tiny().eval()
    peft_model = make_adapter(model, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["up", "down"])
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        expected = peft_model(x).numpy()
    result = export(torch.fx.symbolic_trace(model), (torch.randn(2, 5, 16),), adapter=tmp_path / "adapter",
                    strategy=strategy, path=tmp_path / "tiny.onnx")
    assert result.lora_inputs == (["up.lora_A", "up.lora_B", "down.lora_A", "down.lora_B"] if strategy == "dynamic" else [])
    sess = session(result.path)
    assert rel_err(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], expected) <= TOL


def test_deployment_recipe_zero_defaults_and_many_adapters(family_case, tmp_path):
    """docs/deployment.md: export the slots from rules alone (zero defaults: the base model), then serve any
    number of adapters of any rank, each covering all or some of those slots, from one session."""
    from lorapass.rules import LoraRule

    model, _, _, ids, _, base = family_case("llama")
    result = export(model, example_kwargs={"input_ids": example_ids(), "use_cache": False},
                    rules=LoraRule(target_modules=["q_proj", "v_proj"], r=8), strategy="dynamic",
                    path=tmp_path / "model.onnx")
    assert len(result.lora_inputs) == 8 and result.fx.report.prefix == ""
    assert rel_err(run(result.path, ids), base) <= 1e-5  # no adapter active: the base model
    for name, config in {"r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                         "r16": dict(r=16, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                         "q-only": dict(r=2, lora_alpha=4, target_modules=["q_proj"])}.items():
        peft_model = make_adapter(model, tmp_path / name, seed=len(name), **config)
        with torch.no_grad():
            expected = peft_model(input_ids=ids, use_cache=False).logits.numpy()
        ort_adapter(tmp_path / name, tmp_path / f"{name}.onnx_adapter")
        assert rel_err(run(result.path, ids, tmp_path / f"{name}.onnx_adapter"), expected) <= TOL, name
