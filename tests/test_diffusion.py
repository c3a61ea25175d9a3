"""SD1.x-shaped UNet and CLIP text encoder (random weights) exported to ONNX, with LoRA files as people share them:
kohya (LoCon convolutions included), diffusers' own save path (and its older attention-processor spelling), and
LyCORIS LoHa/LoKr. The truth is diffusers' eager model with the file loaded by diffusers' own loaders; diffusers
cannot load SD LoHa/LoKr, so for those it is PEFT's LoHa/LoKr tuners, whose tensors and formulas are LyCORIS's
(same names and shapes, ΔW = (w1a·w1b)⊙(w2a·w2b)·alpha/r and kron(w1, w2)·alpha/r; the LoKr files here decompose
w2, where LyCORIS's scale is also alpha/r).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from peft import LoHaConfig, LoKrConfig, LoraConfig
from safetensors.torch import save_file

from diffusion_files import lycoris_file, processor_spelling, rel, run
from lorapass import Session, demo
from lorapass.cli import main

TOL = 1e-4
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """The tiny SD1.x UNet + text encoder, their TorchScript exports, inputs and base outputs."""
    folder = tmp_path_factory.mktemp("sd")
    unet, te = demo.sd_unet(), demo.clip_text()
    feeds, ids = demo.unet_feeds(unet), demo.text_ids()
    return {"dir": folder, "unet": unet, "te": te, "feeds": feeds, "ids": ids,
            "unet_onnx": demo.export_unet(unet, feeds, folder / "unet.onnx"),
            "te_onnx": demo.export_text(te, ids, folder / "text_encoder.onnx")}


@pytest.fixture(scope="module")
def files(sd):
    """name -> (file, eager UNet reference output, eager text encoder reference output or None)."""
    folder, unet, te, feeds, ids = sd["dir"], sd["unet"], sd["te"], sd["feeds"], sd["ids"]
    out = {}
    style_unet = LoraConfig(r=8, lora_alpha=4, target_modules=demo.UNET_TARGETS)
    style_text = LoraConfig(r=4, lora_alpha=4, target_modules=demo.TEXT_TARGETS)
    unet_state, text_state = demo.trained(unet, style_unet, 1)[1], demo.trained(te, style_text, 2)[1]
    style = folder / "style.safetensors"
    save_file(demo.kohya_state(unet_state, demo.kohya_names("lora_unet_"), 4.0)
              | demo.kohya_state(text_state, demo.kohya_names("lora_te_", text=True), 4.0), str(style))
    detail_unet = LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION + ["proj_in", "conv1"])
    detail_text = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    unet_detail = demo.trained(unet, detail_unet, 3)[1]
    detail = demo.save_diffusers(folder / "detail.safetensors", unet_detail, detail_unet,
                                 demo.trained(te, detail_text, 4)[1], detail_text)
    for name, file in (("style", style), ("detail", detail)):
        out[name] = (file, demo.run_unet(demo.diffusers_loaded(unet, [(file, 1.0)]), feeds),
                     demo.run_text(demo.diffusers_loaded(te, [(file, 1.0)], "text_encoder"), ids))
    # diffusers' older attention-processor spelling (no metadata: alpha = rank), as diffusers still loads it
    save_file(processor_spelling(unet_detail), str(folder / "processor.safetensors"))
    out["processor"] = (folder / "processor.safetensors",
                        demo.run_unet(demo.diffusers_loaded(unet, [(folder / "processor.safetensors", 1.0)]), feeds), None)
    loha = LoHaConfig(r=4, alpha=8, target_modules=demo.UNET_TARGETS, use_effective_conv2d=True)
    lokr = LoKrConfig(r=2, alpha=6, target_modules=demo.UNET_TARGETS, use_effective_conv2d=True)
    for name, config, alpha in (("loha", loha, 8.0), ("lokr", lokr, 6.0)):
        tuned, state = demo.trained(unet, config, 5)
        out[name] = (lycoris_file(state, folder / f"{name}.safetensors", alpha), demo.run_unet(tuned, feeds), None)
    return out


def rewrite(src, out, *args) -> None:
    assert main(["rewrite", str(src), "--strategy", *args, "-o", str(out)]) == 0


@pytest.mark.parametrize("strategy", ["merge", "dynamic"])
@pytest.mark.parametrize("name", ["style", "detail", "processor", "loha", "lokr"])
def test_unet_matches_reference(sd, files, tmp_path, name, strategy):
    file, expected, _ = files[name]
    rewrite(sd["unet_onnx"], tmp_path / "out.onnx", strategy, "--adapter", str(file), "--strict")
    assert rel(run(tmp_path / "out.onnx", sd["feeds"]), expected) <= TOL
    assert rel(demo.run_unet(sd["unet"], sd["feeds"]), expected) > 1e-2  # the file changes the output


def test_unet_sites_include_every_conv_and_linear(sd):
    import torch

    from lorapass.onnx.load import load_model
    from lorapass.onnx.sites import find_sites

    sites = {s.path: s for s in find_sites(load_model(sd["unet_onnx"]), prefix="unet").sites}  # the export wrapper
    expected = {n: m for n, m in sd["unet"].named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert set(sites) == set(expected)
    for path, module in expected.items():
        site = sites[path]
        if isinstance(module, torch.nn.Conv2d):
            assert (site.kind, site.kernel, site.in_features, site.out_features) == (
                "conv", module.kernel_size, module.in_channels, module.out_channels)
        else:
            assert site.kind == "linear" and (site.in_features, site.out_features) == (module.in_features, module.out_features)


@pytest.mark.parametrize("strategy", ["merge", "dynamic"])
def test_text_encoder_component_detected(sd, files, tmp_path, strategy):
    for name in ("style", "detail"):  # kohya lora_te_text_model_... and diffusers text_encoder.<path> on a flat CLIP
        file, _, expected = files[name]
        rewrite(sd["te_onnx"], tmp_path / f"{name}.onnx", strategy, "--adapter", str(file), "--strict")
        assert rel(run(tmp_path / f"{name}.onnx", {"input_ids": sd["ids"]}), expected) <= TOL


@pytest.fixture(scope="module")
def blend(sd, files):
    """style at 0.8 + detail at 0.5, weighted as diffusers' set_adapters weights them."""
    pair = [(files["style"][0], 0.8), (files["detail"][0], 0.5)]
    return pair, demo.run_unet(demo.diffusers_loaded(sd["unet"], pair), sd["feeds"])


@pytest.mark.parametrize("strategy", ["merge", "dynamic"])
def test_two_file_weighted_blend(sd, blend, tmp_path, strategy):
    pair, expected = blend
    adapters = [arg for file, w in pair for arg in ("--adapter", f"{file}:{w}")]
    rewrite(sd["unet_onnx"], tmp_path / "blend.onnx", strategy, *adapters)
    assert rel(run(tmp_path / "blend.onnx", sd["feeds"]), expected) <= TOL


def test_hot_swap_files_of_every_kind_on_one_session(sd, files, blend, tmp_path):
    ready = tmp_path / "ready.onnx"
    rewrite(sd["unet_onnx"], ready, "dynamic", "--target", *demo.UNET_TARGETS, "--rank", "8")
    session = Session(ready)
    for name in ("style", "detail", "loha", "lokr"):
        assert main(["export-adapter", str(files[name][0]), "--model", str(ready), "-o", str(tmp_path / f"{name}.onnx_adapter")]) == 0
        session.add_adapter(name, tmp_path / f"{name}.onnx_adapter")
    (style, a), (detail, b) = blend[0]
    assert main(["export-adapter", f"{style}:{a}", f"{detail}:{b}", "--model", str(ready), "-o", str(tmp_path / "blend.onnx_adapter")]) == 0
    session.add_adapter("blend", tmp_path / "blend.onnx_adapter")
    for _ in range(2):  # back and forth on the same session
        for name in ("style", "detail", "loha", "lokr"):
            assert rel(session.run(sd["feeds"], adapter=name)[0], files[name][1]) <= TOL
        assert rel(session.run(sd["feeds"], adapter="blend")[0], blend[1]) <= TOL
    assert rel(session.run(sd["feeds"])[0], demo.run_unet(sd["unet"], sd["feeds"])) <= TOL


def test_swap_zeroes_slots_the_file_leaves_out(sd, files, tmp_path):
    """A dynamic graph made from one file defaults to its weights; another file's adapter fills the rest with zeros."""
    dyn = tmp_path / "style.onnx"
    rewrite(sd["unet_onnx"], dyn, "dynamic", "--adapter", str(files["style"][0]))
    assert main(["export-adapter", str(files["detail"][0]), "--model", str(dyn), "-o", str(tmp_path / "d.onnx_adapter")]) == 0
    session = Session(dyn)
    session.add_adapter("detail", tmp_path / "d.onnx_adapter")
    assert rel(session.run(sd["feeds"], adapter="detail")[0], files["detail"][1]) <= TOL
    assert rel(session.run(sd["feeds"])[0], files["style"][1]) <= TOL


@pytest.fixture(scope="module")
def variants(sd, tmp_path_factory):
    """The same UNet exported by dynamo (fp32), and in fp16 by TorchScript with its fp32 twin (same rounded weights)."""
    folder = tmp_path_factory.mktemp("variants")
    half = copy.deepcopy(sd["unet"]).half()
    twin = copy.deepcopy(half).float()
    return {"dynamo": demo.export_unet(sd["unet"], sd["feeds"], folder / "dynamo.onnx", dynamo=True),
            "fp16": demo.export_unet(half, sd["feeds"], folder / "fp16.onnx"), "twin": twin}


@pytest.mark.parametrize("strategy", ["merge", "dynamic"])
def test_dynamo_export(sd, files, variants, tmp_path, strategy):
    file, expected, _ = files["style"]
    rewrite(variants["dynamo"], tmp_path / "out.onnx", strategy, "--adapter", str(file), "--strict")
    assert rel(run(tmp_path / "out.onnx", sd["feeds"]), expected) <= TOL


@pytest.mark.parametrize("strategy", ["merge", "dynamic"])
def test_fp16_within_twice_the_exports_own_error(sd, files, variants, tmp_path, strategy):
    import onnx

    file = files["style"][0]
    twin, feeds = variants["twin"], sd["feeds"]
    base_error = rel(run(variants["fp16"], feeds), demo.run_unet(twin, feeds))
    expected = demo.run_unet(demo.diffusers_loaded(twin, [(file, 1.0)]), feeds)
    rewrite(variants["fp16"], tmp_path / "out.onnx", strategy, "--adapter", str(file))
    assert rel(run(tmp_path / "out.onnx", feeds), expected) <= 2 * base_error
    weights = {t.name: t.data_type for t in onnx.load(tmp_path / "out.onnx").graph.initializer if len(t.dims) == 4}
    assert set(weights.values()) == {onnx.TensorProto.FLOAT16}  # written back in the graph's dtype


def test_multi_refuses_convolutions_by_name(sd, files, tmp_path, capsys):
    out = tmp_path / "multi.onnx"
    assert main(["rewrite", str(sd["unet_onnx"]), "--strategy", "multi", "--adapter", str(files["style"][0]),
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no banks for convolutions (31 targeted" in err and "down_blocks.0.attentions.0.proj_in" in err and not out.exists()
