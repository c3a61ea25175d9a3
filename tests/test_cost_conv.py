"""The cost model on convolutions: a diffusers UNet's Conv2d and Linear FLOPs as torch runs them, LoCon LoRA on
conv sites (selected as the rewrite selects them, priced like the Conv nodes a dynamic rewrite inserts), and the
convolutions lorapass does not adapt (grouped, transposed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lorapass import demo
from lorapass.cost import ops as O
from lorapass.cost.lora import apply_dynamic, merge_ops, select
from lorapass.cost.onnx_ops import load_onnx_graph
from lorapass.onnx.rewrite import rewrite
from lorapass.rules import LoraRule


@pytest.fixture(scope="module")
def unet(tmp_path_factory) -> tuple[Path, dict[str, float], dict[str, tuple[int, int, int]]]:
    """(the tiny SD UNet exported by TorchScript, torch's FLOPs per Conv2d/Linear module path, and per Conv2d
    module its (output positions, in_channels * kh * kw, out_channels)) for one batch of two."""
    folder = tmp_path_factory.mktemp("unet_cost")
    model = demo.sd_unet()
    feeds = demo.unet_feeds(model)
    path = demo.export_unet(model, feeds, folder / "unet.onnx")
    flops: dict[str, float] = {}
    convs: dict[str, tuple[int, int, int]] = {}

    def hook(name):
        def record(module, args, out):
            if isinstance(module, torch.nn.Conv2d):
                per = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
                flops[name] = flops.get(name, 0.0) + 2.0 * out.numel() * per
                convs[name] = (out.shape[0] * out.shape[2] * out.shape[3], per, module.out_channels)
            else:
                tokens = args[0].numel() // module.in_features
                flops[name] = flops.get(name, 0.0) + 2.0 * tokens * module.in_features * module.out_features
        return record

    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_hook(hook(name))
    with torch.no_grad():
        model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return path, flops, convs


def test_unet_convolutions_and_linears_cost_what_torch_computes(unet):
    path, flops, convs = unet
    graph = load_onnx_graph(path, batch=2, q_len=1, kv_len=1, prefix="unet")
    costed = {op.path: op.flops for op in graph.ops if op.kind == O.GEMM and op.path}
    assert set(costed) == set(flops)  # every Conv2d and Linear of the UNet, by its module path
    for name, value in flops.items():
        assert costed[name] == pytest.approx(value, rel=1e-12), name
    conv_total = sum(op.flops for op in graph.ops if op.onnx_op == "Conv")
    assert conv_total == pytest.approx(sum(flops[n] for n in convs), rel=1e-12)
    assert len(convs) >= 10 and conv_total > sum(flops[n] for n in flops if n not in convs)  # convs dominate


def test_locon_on_conv_sites_is_priced_as_its_two_convolutions(unet, tmp_path):
    path, _, convs = unet
    graph = load_onnx_graph(path, batch=2, q_len=1, kv_len=1, prefix="unet")
    rule = LoraRule(name="locon", target_modules=["conv1", "to_q"], r=4, lora_alpha=4, strategy="dynamic")
    selection = select(graph, rule)
    conv1 = [n for n in convs if n.endswith("conv1")]
    assert conv1 and set(conv1) <= set(selection) and any(p.endswith("to_q") for p in selection)
    added = apply_dynamic(graph, selection)
    lora = {(op.kind, op.path): op.flops for op in added.ops if op.kind in (O.GEMM_LORA_A, O.GEMM_LORA_B)}
    for name in conv1:  # A: a kh x kw conv to r channels; B: a 1x1 conv from r channels
        positions, per, out = convs[name]
        assert lora[(O.GEMM_LORA_A, name)] == 2.0 * positions * per * 4
        assert lora[(O.GEMM_LORA_B, name)] == 2.0 * positions * 4 * out
    merged = {op.path: op for op in merge_ops(graph, selection)}
    for name in conv1:
        _, per, out = convs[name]
        assert merged[name].flops == 2.0 * 4 * per * out
    # all-linear skips the convolutions, as the rewrite does
    linear = select(graph, LoraRule(name="all", target_modules="all-linear", r=4, lora_alpha=4))
    assert linear and not set(linear) & set(convs)

    # the Conv nodes of a real dynamic rewrite cost the same as the rule-based insertion above
    dynamic = rewrite(path, tmp_path / "dynamic.onnx", rules=rule, prefix="unet", progress=False).output
    rewritten = load_onnx_graph(dynamic, batch=2, q_len=1, kv_len=1, prefix="unet")
    found = {(op.kind, op.path): op.flops for op in rewritten.ops if op.kind in (O.GEMM_LORA_A, O.GEMM_LORA_B)}
    assert found == lora


def test_grouped_and_transposed_convolutions_cost_their_products(tmp_path):
    """Convolutions that are not sites (grouped; ConvTranspose) still cost their multiply-adds, counted by hand."""
    rng = np.random.default_rng(0)
    w_group = numpy_helper.from_array(rng.standard_normal((8, 2, 3, 3)).astype(np.float32), "w_group")  # groups=2
    w_up = numpy_helper.from_array(rng.standard_normal((8, 3, 2, 2)).astype(np.float32), "w_up")  # in 8 -> out 3
    nodes = [helper.make_node("Conv", ["x", "w_group"], ["y"], name="grouped", group=2, pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["y", "w_up"], ["z"], name="up", strides=[2, 2])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [w_group, w_up])
    path = tmp_path / "convs.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    ops = {op.name: op for op in load_onnx_graph(path, batch=1, q_len=1, kv_len=1).ops}
    # grouped: 8 x 5 x 5 outputs, each 2 input channels x 3 x 3 taps
    assert ops["grouped"].kind == O.GEMM and ops["grouped"].flops == 2.0 * (8 * 5 * 5) * (2 * 3 * 3)
    # transposed: each of the 8 x 5 x 5 inputs scatters into 3 output channels x 2 x 2 taps
    assert ops["up"].kind == O.GEMM and ops["up"].flops == 2.0 * (8 * 5 * 5) * (3 * 2 * 2)


def test_analyse_prices_a_kohya_file_bound_to_the_unet(unet, tmp_path, capsys):
    """A kohya LoCon file (conv and linear modules, two ranks): analyse binds it as the rewrite does and prices each
    module at its own rank, as rules naming the same modules would."""
    import json

    from safetensors.numpy import save_file

    from lorapass.cli import main

    path, _, convs = unet
    conv1 = sorted(n for n in convs if n.endswith("conv1"))
    rng = np.random.default_rng(0)
    tensors = {}
    for name, r in [(conv1[0], 4), (conv1[1], 4), ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 2)]:
        key = "lora_unet_" + name.replace(".", "_")
        _, per, out = convs.get(name, (0, 32, 32))
        down = (r, per // 9, 3, 3) if name in convs else (r, per)
        up = (out, r, 1, 1) if name in convs else (out, r)
        tensors |= {f"{key}.lora_down.weight": rng.standard_normal(down).astype(np.float32),
                    f"{key}.lora_up.weight": rng.standard_normal(up).astype(np.float32),
                    f"{key}.alpha": np.array(r, np.float32)}
    kohya = tmp_path / "style.safetensors"
    save_file(tensors, str(kohya))
    hw = str(Path(__file__).resolve().parents[1] / "hw_specs" / "h100.yaml")
    args = ["analyse", str(path), "--hw", hw, "--prefix", "unet", "--batch", "2", "--seq", "1", "--gen", "1", "--json",
            "--ops"]
    assert main([*args, "--adapter", str(kohya), "--strategy", "dynamic"]) == 0
    out = capsys.readouterr()
    assert "3 module(s) matched, 0 unmatched" in out.err
    ops = [op for op in json.loads(out.out)["phases"]["prefill"]["ops"] if op["class"] in (O.GEMM_LORA_A, O.GEMM_LORA_B)]
    graph = load_onnx_graph(path, batch=2, q_len=1, kv_len=1, prefix="unet")
    by_rank = {}
    for r, names in ((4, conv1[:2]), (2, ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"])):
        rule = LoraRule(name=f"r{r}", target_modules=names, r=r, lora_alpha=r)
        by_rank |= {(op.kind, op.path): op.flops for op in apply_dynamic(graph, select(graph, rule)).ops
                    if op.kind in (O.GEMM_LORA_A, O.GEMM_LORA_B)}
    assert {(op["class"], op["path"]): op["flops"] for op in ops} == pytest.approx(by_rank)
    assert len(ops) == 6
    assert main([*args, "--adapter", str(kohya), "--component", "unet"]) == 0  # the file's own strategy: merge
    assert json.loads(capsys.readouterr().out)["strategy"] == "merge"
