"""SDXL-shaped UNet (SDXL's block layout, linear proj_in/out, text/time conditioning) and its two CLIP text encoders,
with a kohya SDXL file: SGM/LDM UNet names (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``, ``in_layers_2``,
``emb_layers_1``, ``skip_connection``, ``op``) and ``lora_te1_`` / ``lora_te2_`` keys. The truth is diffusers' SDXL
loader (``_maybe_map_sgm_blocks_to_diffusers`` with the UNet's config, then its kohya conversion).
"""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig
from safetensors.torch import save_file

from diffusion_files import SDXL_UNET, rel, run, sdxl_kohya_name
from lorapass import demo
from lorapass.cli import main

TOL = 1e-4


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    unet, te1, te2 = demo.sd_unet(SDXL_UNET), demo.clip_text(seed=1), demo.clip_text(seed=2, projection=True)
    feeds, ids = demo.unet_feeds(unet), demo.text_ids()
    (folder / "config.json").write_text(json.dumps(dict(unet.config)))
    unet_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=demo.UNET_TARGETS)
    text_cfg = LoraConfig(r=4, lora_alpha=2, target_modules=demo.TEXT_TARGETS)
    state = (demo.kohya_state(demo.trained(unet, unet_cfg, 3)[1], sdxl_kohya_name, 8.0)
             | demo.kohya_state(demo.trained(te1, text_cfg, 4)[1], demo.kohya_names("lora_te1_", text=True), 2.0)
             | demo.kohya_state(demo.trained(te2, text_cfg, 5)[1], demo.kohya_names("lora_te2_", text=True), 2.0))
    save_file(state, str(folder / "sdxl.safetensors"))
    file = [(folder / "sdxl.safetensors", 1.0)]
    return {"dir": folder, "file": folder / "sdxl.safetensors", "feeds": feeds, "ids": ids,
            "unet": demo.export_unet(unet, feeds, folder / "unet.onnx"),
            "te2": demo.export_text(te2, ids, folder / "te2.onnx"),
            "expected_unet": demo.run_unet(demo.diffusers_loaded(unet, file, unet_config=unet.config), feeds),
            "expected_te2": demo.run_text(demo.diffusers_loaded(te2, file, "text_encoder_2"), ids),
            "base_unet": demo.run_unet(unet, feeds)}


@pytest.mark.parametrize("strategy", ["merge", "dynamic"])
def test_sgm_names_map_onto_the_unet(sdxl, tmp_path, strategy):
    out = tmp_path / "out.onnx"
    assert main(["rewrite", str(sdxl["unet"]), "--adapter", str(sdxl["file"]), "--strategy", strategy, "--strict",
                 "-o", str(out)]) == 0
    assert rel(run(out, sdxl["feeds"]), sdxl["expected_unet"]) <= TOL
    assert rel(sdxl["base_unet"], sdxl["expected_unet"]) > 1e-2


def test_sgm_layout_from_unet_config(sdxl, tmp_path):
    out = tmp_path / "out.onnx"
    assert main(["rewrite", str(sdxl["unet"]), "--adapter", str(sdxl["file"]), "--strategy", "merge",
                 "--unet-config", str(sdxl["dir"] / "config.json"), "--component", "unet", "-o", str(out)]) == 0
    assert rel(run(out, sdxl["feeds"]), sdxl["expected_unet"]) <= TOL


def test_second_text_encoder_needs_component(sdxl, tmp_path, capsys):
    out = tmp_path / "te2.onnx"
    args = ["rewrite", str(sdxl["te2"]), "--adapter", str(sdxl["file"]), "--strategy", "merge", "-o", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--component" in err and "text_encoder (" in err and "text_encoder_2 (" in err and not out.exists()
    assert main(args + ["--component", "text_encoder_2", "--strict"]) == 0
    assert rel(run(out, {"input_ids": sdxl["ids"]}), sdxl["expected_te2"]) <= TOL
