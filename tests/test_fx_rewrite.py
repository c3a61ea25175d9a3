"""lorapass.fx.rewrite: the rewritten graph module equals PEFT's eager (unmerged) output, merge and dynamic."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from builders import PEFT_CONFIGS, FAMILIES, Wrapper, build, eager, example_ids, make_adapter, rel_err

from lorapass import fx
from lorapass.adapter import load_adapter
from lorapass.errors import AdapterError, ModelError, RuleError, UnsupportedError
from lorapass.fx.program import Program
from lorapass.fx.sites import find_sites
from lorapass.fx.trace import trace
from lorapass.onnx.slots import METADATA_KEY
from lorapass.rules import LoraRule, RuleSet

TOL = 1e-4
TRIO = ("llama", "gpt2", "bert")


def run(program, ids: torch.Tensor) -> np.ndarray:
    module = program.module() if isinstance(program, torch.export.ExportedProgram) else program
    with torch.no_grad():
        return module(ids).numpy()


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """``case(family)`` -> (model, program, adapter dir, ids, PEFT eager output, base output), made once."""
    cache = {}

    def get(family: str):
        if family not in cache:
            model = build(family)
            folder = tmp_path_factory.mktemp(f"fx_{family}")
            peft_model = make_adapter(model, folder / "adapter", r=4, lora_alpha=8,
                                      target_modules=list(FAMILIES[family].targets))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = trace(Wrapper(model), (example_ids(),))
            ids = example_ids(batch=2, seq=9, seed=3)  # another shape than the trace's example
            cache[family] = (model, program, folder / "adapter", ids, eager(peft_model, ids), eager(model, ids))
        return cache[family]

    return get


@pytest.mark.parametrize("strategy", ["merge", "dynamic"])
@pytest.mark.parametrize("family", TRIO)
def test_rewritten_program_matches_peft(case, family, strategy):
    _, program, adapter, ids, expected, base = case(family)
    before = {k: v.clone() for k, v in program.state_dict.items()}
    result = fx.apply(program, adapter, strategy)
    assert isinstance(result.program, torch.export.ExportedProgram)
    assert rel_err(run(result.program, ids), expected) <= TOL
    assert rel_err(base, expected) > 1e-3  # the adapter really changes the output
    # the program passed in is untouched: same state, same output
    assert all(torch.equal(before[k], v) for k, v in program.state_dict.items())
    assert rel_err(run(program, ids), base) == 0
    assert len(result.targets) == len(load_adapter(adapter).modules)


def test_module_is_traced_with_torch_export_and_left_unchanged(case):
    model, _, adapter, ids, expected, base = case("llama")
    wrapper = Wrapper(model).train()  # traced in eval mode, training flags restored
    rewritten = fx.rewrite(wrapper, adapter, "dynamic", example_inputs=(example_ids(),))
    assert isinstance(rewritten, torch.export.ExportedProgram)
    assert wrapper.training and all(m.training for m in wrapper.modules())
    wrapper.eval()
    assert rel_err(run(rewritten, ids), expected) <= TOL
    assert rel_err(eager(model, ids), base) == 0


def test_dynamic_inserts_real_nodes_not_modules(case):
    _, program, adapter, ids, _, _ = case("llama")
    result = fx.apply(program, adapter, "dynamic")
    rewritten = result.program
    paths = [t.site.path for t in result.targets]
    assert result.slots == {p: {f"{p}.lora_{k}": f"m.{p}.lora_{k}" for k in "AB"} for p in paths}
    specs = {s.target: s for s in rewritten.graph_signature.input_specs}
    from safetensors.numpy import load_file

    peft = load_file(str(adapter / "adapter_model.safetensors"))
    for path in paths:
        a, b = rewritten.state_dict[f"m.{path}.lora_A"], rewritten.state_dict[f"m.{path}.lora_B"]
        assert specs[f"m.{path}.lora_A"].kind == torch.export.graph_signature.InputKind.BUFFER
        key = f"base_model.model.{path}"
        np.testing.assert_array_equal(a.numpy(), peft[f"{key}.lora_A.weight"].T)  # [in, r]
        np.testing.assert_allclose(b.numpy(), peft[f"{key}.lora_B.weight"].T * 2.0)  # [r, out], scale 8/4 folded in
    ops = [n.target for n in rewritten.graph.nodes if n.op == "call_function"]
    base_ops = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.aten.matmul.default) - base_ops.count(torch.ops.aten.matmul.default) == 2 * len(paths)
    assert ops.count(torch.ops.aten.add.Tensor) - base_ops.count(torch.ops.aten.add.Tensor) == len(paths)
    assert not any("lora" in type(m).__module__ for m in rewritten.module().modules())
    records = rewritten.graph_module.meta[METADATA_KEY]
    assert [r["path"] for r in records] == paths and records[0]["lora_A"] == f"{paths[0]}.lora_A"
    assert rel_err(run(rewritten, ids), case("llama")[4]) <= TOL
    # the branch belongs to no module: discovery on the rewritten program finds the model's sites only
    again = find_sites(Program(rewritten))
    assert [s.path for s in again.sites] == [s.path for s in result.report.sites] and again.unresolved == []


def test_dynamic_without_adapter_is_the_base_model(case):
    _, program, _, ids, _, base = case("llama")
    rewritten = fx.rewrite(program, LoraRule(target_modules="all-linear", r=4, strategy="dynamic"))
    assert rel_err(run(rewritten, ids), base) <= 1e-6
    assert "m.lm_head.lora_A" not in rewritten.state_dict  # all-linear leaves the output head alone


@pytest.mark.parametrize("config", list(PEFT_CONFIGS.values()), ids=list(PEFT_CONFIGS))
def test_peft_config_semantics(case, tmp_path, config):
    model, program, _, ids, _, _ = case("llama")
    peft_model = make_adapter(model, tmp_path / "adapter", **config)
    expected = eager(peft_model, ids)
    for strategy in ("merge", "dynamic"):
        assert rel_err(run(fx.rewrite(program, tmp_path / "adapter", strategy), ids), expected) <= TOL, strategy


def test_rules_and_adapter_given_separately(case):
    """Explicit rules (a RuleSet) override the adapter's config, through the same plan()."""
    _, program, adapter, ids, expected, _ = case("llama")
    rules = RuleSet(rules=[LoraRule(name="attn", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, lora_alpha=8),
                           LoraRule(name="mlp", target_modules=["gate_proj", "up_proj", "down_proj"], r=4, lora_alpha=8)])
    rewritten = fx.rewrite(program, adapter=load_adapter(adapter), rules=rules, strategy="merge")
    assert rel_err(run(rewritten, ids), expected) <= TOL


def test_decomposed_program(case):
    """A core-ATen program (mm / bmm of transposed weights) gets the same result."""
    _, program, adapter, ids, expected, _ = case("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decomposed = program.run_decompositions()
    for strategy in ("merge", "dynamic"):
        assert rel_err(run(fx.rewrite(decomposed, adapter, strategy), ids), expected) <= TOL, strategy


@pytest.mark.parametrize("strategy", ["merge", "dynamic"])
def test_tied_output_head(case, tmp_path, strategy):
    """GPT-2's lm_head shares its weight with wte: LoRA on lm_head must leave the embedding alone (as PEFT does)."""
    import copy

    from peft import LoraConfig, get_peft_model

    model, program, _, ids, _, _ = case("gpt2")
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "c_attn"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied lm_head, Conv1D fan_in_fan_out
        peft_model = get_peft_model(copy.deepcopy(model), config).eval()
        peft_model.save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=False)  # LoRA weights only
    expected = eager(peft_model, ids)
    rewritten = fx.rewrite(program, tmp_path / "adapter", strategy)
    assert rel_err(run(rewritten, ids), expected) <= TOL
    assert torch.equal(rewritten.state_dict["m.transformer.wte.weight"], model.transformer.wte.weight)


class Block(torch.nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.q = torch.nn.Linear(width, width)
        self.v = torch.nn.Linear(width, width, bias=False)
        self.proj = Conv1D(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(torch.relu(self.q(x)) * self.v(x))


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.head = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.mark.parametrize("strategy", ["merge", "dynamic"])
def test_symbolic_trace_fallback(tmp_path, strategy):
    """Without example inputs a plain module is traced with torch.fx.symbolic_trace; a GraphModule comes back."""
    torch.manual_seed(0)
    model = Tiny().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT sets fan_in_fan_out for Conv1D itself
        peft_model = make_adapter(model, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q", "v", "proj"])
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        expected, base = peft_model(x).numpy(), model(x).numpy()
    rewritten = fx.rewrite(model, tmp_path / "adapter", strategy)
    assert isinstance(rewritten, torch.fx.GraphModule)
    with torch.no_grad():
        assert rel_err(rewritten(x).numpy(), expected) <= TOL
    assert rel_err(base, expected) > 1e-3
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    again = fx.rewrite(torch.fx.symbolic_trace(model), tmp_path / "adapter", strategy)  # a GraphModule given
    with torch.no_grad():
        assert rel_err(again(x).numpy(), expected) <= TOL
    if strategy == "dynamic":
        assert isinstance(rewritten.get_submodule("blocks.0.q"), torch.nn.Linear)  # no module swapped
        assert rewritten.get_buffer("blocks.0.q.lora_A").shape == (16, 2)


def test_errors_name_the_problem(case, tmp_path):
    _, llama, adapter, _, _, _ = case("llama")
    _, gpt2, _, _, _, _ = case("gpt2")
    with pytest.raises(RuleError, match="selects none"):
        fx.rewrite(gpt2, adapter, "merge")  # llama's adapter on GPT-2
    with pytest.raises(AdapterError, match="fit no target"):  # rules narrower than the adapter
        fx.rewrite(llama, adapter=adapter, rules=LoraRule(target_modules=["q_proj"], r=4, lora_alpha=8))
    with pytest.raises(RuleError, match="needs an adapter"):
        fx.rewrite(llama, LoraRule(target_modules=["q_proj"]), "merge")
    with pytest.raises(RuleError, match="selects none"):
        fx.rewrite(llama, LoraRule(target_modules=["no_such_proj"]), "dynamic")
    with pytest.raises(ModelError):
        fx.rewrite("not a model", adapter)
    with pytest.raises(UnsupportedError, match="example inputs"):
        fx.rewrite(Wrapper(build("llama")), adapter)  # transformers models do not symbolic_trace


class Reuse(torch.nn.Module):
    """``proj.weight`` is read by proj's own call and, directly, by the parent: LoRA applies to the call only."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return self.out(h + 0.1 * (h @ self.proj.weight))


def test_weight_also_read_outside_its_module_is_copied(tmp_path):
    torch.manual_seed(0)
    model = Reuse().eval()
    peft_model = make_adapter(model, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["proj"])
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        expected = peft_model(x).numpy()  # PEFT's proj.weight is still the base weight
    rewritten = fx.rewrite(model, tmp_path / "adapter", "merge", example_inputs=(x,))
    assert rel_err(run(rewritten, x), expected) <= TOL
    assert torch.equal(rewritten.state_dict["proj.weight"], model.proj.weight)  # the parent's read: unchanged
    assert "proj.weight_1" in rewritten.state_dict  # the site's merged copy
    assert rel_err(run(fx.rewrite(model, tmp_path / "adapter", "dynamic", example_inputs=(x,)), x), expected) <= TOL
    with pytest.raises(UnsupportedError, match="also read outside"):  # symbolic_trace: a module call, no copy
        fx.rewrite(model, tmp_path / "adapter", "merge")
