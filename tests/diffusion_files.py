"""Helpers of the diffusion tests: LoRA files as the tools people use write them, and ORT runs.

Models, exports and PEFT/diffusers file makers come from :mod:`lorapass.demo` (the diffusion demo's builders).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from safetensors.torch import save_file

from lorapass import demo

SDXL_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=8, use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, norm_num_groups=16)
"""SDXL-shaped: three blocks (no attention in the first), two layers per block, linear proj_in/out, text/time
conditioning; the real SDXL block layout, so SGM indices are the ones real SDXL kohya files carry."""


def rel(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual.astype(np.float32) - expected).max() / np.abs(expected).max())


def run(model: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The model's first output in ONNX Runtime, float inputs cast to the graph's float type (fp16 graphs)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    half = {i.name for i in session.get_inputs() if i.type == "tensor(float16)"}
    feeds = {k: v.astype(np.float16) if k in half else v for k, v in feeds.items()}
    return session.run(None, feeds)[0].astype(np.float32)


def lycoris_file(state: dict, path: Path, alpha: float, prefix: str = "lora_unet_") -> Path:
    """A PEFT LoRA / LoHa / LoKr state dict saved with kohya / LyCORIS keys (PEFT's LoHa/LoKr tensor names are
    LyCORIS's own) and one alpha per module."""
    save_file(demo.kohya_state(state, demo.kohya_names(prefix), alpha), str(path))
    return path


def processor_spelling(state: dict) -> dict:
    """The to_q / to_out.0 modules of a PEFT UNet state dict in diffusers' older attention-processor spelling
    (``unet.<attn>.processor.to_q_lora.down.weight``, ``to_out_lora`` for ``to_out.0``)."""
    out = {}
    for key, tensor in state.items():
        module, role = key.rsplit(".lora_", 1)
        for proj, spelled in (("to_q", "to_q"), ("to_out.0", "to_out")):
            if module.endswith("." + proj):
                parent = module[: -len(proj) - 1]
                out[f"unet.{parent}.processor.{spelled}_lora.{'down' if role[0] == 'A' else 'up'}.weight"] = tensor
    return out


def sdxl_kohya_name(path: str) -> str:
    """kohya's SDXL name of a diffusers UNet module path, from sd-scripts' ``make_unet_conversion_map`` for SDXL's
    layout (3 blocks, 2 layers each), written out here independently of lorapass's layout-driven map."""
    table = []
    for i in range(3):
        for j in range(2):
            table += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0."),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1.")]
        for j in range(3):
            table += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0."),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1.")]
        table += [(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * (i + 1)}.0.op."),
                  (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.2.")]
    table += [("mid_block.attentions.0.", "middle_block.1."), ("mid_block.resnets.0.", "middle_block.0."),
              ("mid_block.resnets.1.", "middle_block.2.")]
    resnet = {"conv1.": "in_layers.2.", "conv2.": "out_layers.3.", "time_emb_proj.": "emb_layers.1.",
              "conv_shortcut.": "skip_connection."}
    name = path + "."
    for hf, sgm in table:
        if name.startswith(hf):
            inner = name[len(hf):]
            if ".resnets." in hf or hf.startswith("mid_block.resnets"):
                inner = next((b + inner[len(a):] for a, b in resnet.items() if inner.startswith(a)), inner)
            name = sgm + inner
            break
    return "lora_unet_" + name[:-1].replace(".", "_")
