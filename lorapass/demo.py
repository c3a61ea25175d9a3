"""Build a quick-start workspace: a tiny Llama (random weights), its ONNX export, and two PEFT adapters.

``python -m lorapass.demo DIR`` writes DIR/model.onnx (+ .data), DIR/adapter_a, DIR/adapter_b (PEFT
directories made by ``peft``), DIR/input_ids.npy and DIR/expected_a.npy (PEFT's own output for adapter_a).

``python -m lorapass.demo --diffusion DIR`` writes a tiny SD1.x-shaped UNet and CLIP text encoder (random weights)
as DIR/unet.onnx and DIR/text_encoder.onnx, two LoRA files as people share them (DIR/style.safetensors in kohya's
format with LoCon convolutions, DIR/detail.safetensors as diffusers saves it), the inputs (DIR/unet_inputs.npz,
DIR/input_ids.npy) and diffusers' own outputs with each file loaded by its loaders (DIR/expected_*.npy).
Needs the test extras (torch, transformers, peft, diffusers); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import warnings
from pathlib import Path

import numpy as np


def build(folder: Path) -> None:
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    class Logits(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=input_ids, use_cache=False).logits

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = tf.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (2, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(model).eval(), (ids,), str(folder / "model.onnx"), dynamo=True,
                          input_names=["input_ids"], output_names=["logits"],
                          dynamic_shapes=({0: "batch", 1: "seq"},), verbose=False)
    np.save(folder / "input_ids.npy", ids.numpy())
    for name, config in {"a": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                         "b": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)}.items():
        peft_model = get_peft_model(copy.deepcopy(model), config).eval()
        peft_model.save_pretrained(str(folder / f"adapter_{name}"))
        with torch.no_grad():
            np.save(folder / f"expected_{name}.npy", peft_model(input_ids=ids).logits.numpy())
    print(f"wrote {folder}/model.onnx, adapter_a, adapter_b, input_ids.npy, expected_a.npy, expected_b.npy")


# ---- the diffusion workspace; its builders double as the diffusion tests' model and file makers ----

SD_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)
CLIP_TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2",
                "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def sd_unet(config: dict = SD_UNET, seed: int = 0):
    """A diffusers UNet2DConditionModel of ``config`` with random weights, in eval mode."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def clip_text(seed: int = 0, projection: bool = False, **overrides):
    """A tiny CLIP text encoder (``CLIPTextModelWithProjection`` for SDXL's second one), random weights."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.CLIPTextConfig(**(CLIP_TEXT | overrides))
    return (tf.CLIPTextModelWithProjection if projection else tf.CLIPTextModel)(config).eval()


def unet_feeds(unet, batch: int = 2, seed: int = 1) -> dict[str, np.ndarray]:
    """One denoising step's inputs for ``unet`` (SDXL's added text/time conditioning when it takes them)."""
    rng = np.random.default_rng(seed)
    c = unet.config
    feeds = {"sample": rng.standard_normal((batch, c.in_channels, c.sample_size, c.sample_size), np.float32),
             "timestep": np.array([10, 500][:batch] + [999] * max(0, batch - 2), np.int64),
             "encoder_hidden_states": rng.standard_normal((batch, 7, c.cross_attention_dim), np.float32)}
    if c.addition_embed_type == "text_time":
        width = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        feeds["text_embeds"] = rng.standard_normal((batch, width), np.float32)
        feeds["time_ids"] = np.tile(np.array([[16, 16, 0, 0, 16, 16]], np.float32), (batch, 1))
    return feeds


def _unet_step(unet):
    import torch

    class UnetStep(torch.nn.Module):
        """One denoising step as an exporter sees it: positional tensors in, the predicted noise out."""

        def __init__(self) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
            added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
            return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]

    return UnetStep().eval()


def _torch_feeds(feeds: dict[str, np.ndarray], dtype) -> tuple:
    import torch

    return tuple(torch.from_numpy(v).to(dtype) if v.dtype == np.float32 else torch.from_numpy(v) for v in feeds.values())


def run_unet(unet, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The eager UNet's float32 output for ``feeds`` (a PEFT-injected UNet runs its LoRA unmerged)."""
    import torch

    dtype = next(unet.parameters()).dtype
    with torch.no_grad():
        return _unet_step(unet)(*_torch_feeds(feeds, dtype)).float().numpy()


def export_unet(unet, feeds: dict[str, np.ndarray], path: Path, dynamo: bool = False,
                dynamic_axes: dict | None = None) -> Path:
    """``unet`` as one ONNX graph (TorchScript or dynamo exporter, in the UNet's own dtype), inputs named as feeds;
    ``dynamic_axes`` (TorchScript's) leaves e.g. the latent size free."""
    import torch

    dtype = next(unet.parameters()).dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_unet_step(unet), _torch_feeds(feeds, dtype), str(path), dynamo=dynamo, verbose=False,
                          input_names=list(feeds), output_names=["noise"], dynamic_axes=dynamic_axes)
    return path


def _text(te):
    import torch

    class Text(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.te = te

        def forward(self, input_ids):
            return self.te(input_ids=input_ids).last_hidden_state

    return Text().eval()


def text_ids(batch: int = 2, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, CLIP_TEXT["vocab_size"], (batch, 9)).astype(np.int64)


def run_text(te, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return _text(te)(torch.from_numpy(ids)).numpy()


def export_text(te, ids: np.ndarray, path: Path, dynamo: bool = False) -> Path:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_text(te), (torch.from_numpy(ids),), str(path), dynamo=dynamo, verbose=False,
                          input_names=["input_ids"], output_names=["last_hidden_state"])
    return path


def trained(model, config, seed: int = 0):
    """(a copy of ``model`` with a random LoRA-style adapter of ``config`` injected by PEFT, its PEFT state dict).

    ``config`` is a peft LoraConfig, LoHaConfig or LoKrConfig; weights are random and non-zero (as after training;
    LoHa/LoKr factors larger, as their products shrink).
    """
    import torch
    from peft import get_peft_model_state_dict

    torch.manual_seed(seed)
    tuned = copy.deepcopy(model)
    tuned.add_adapter(config)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
            elif "hada_" in name or "lokr_" in name:
                p.normal_(0, 0.3)
    return tuned.eval(), get_peft_model_state_dict(tuned)


def kohya_names(prefix: str, text: bool = False):
    """The module path -> kohya lora name map of SD1.x files (``lora_unet_`` + the diffusers path underscored; text
    encoders named from transformers' ``CLIPTextModel`` root, which holds ``text_model``)."""
    def name(path: str) -> str:
        if text and not path.startswith("text_model."):
            path = "text_model." + path
        return prefix + path.replace(".", "_")

    return name


def kohya_state(state: dict, name, alphas: dict[str, float] | float | None) -> dict:
    """A PEFT LoRA / LoHa / LoKr state dict in kohya / LyCORIS keys: ``name(module path)`` + ``lora_down.weight``
    (PEFT lora_A), ``lora_up.weight`` (lora_B), LyCORIS's own tensor names (PEFT uses the same), ``alpha``."""
    import torch

    out = {}
    for key, tensor in state.items():
        module, _, role = key.rpartition(".")
        if role == "weight":
            module, _, role = module.rpartition(".")
            role = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight"}[role]
        out[f"{name(module)}.{role}"] = tensor.detach().contiguous()
        alpha = alphas.get(module) if isinstance(alphas, dict) else alphas
        if alpha is not None:
            out[f"{name(module)}.alpha"] = torch.tensor(float(alpha))
    return out


def save_diffusers(path: Path, unet_state: dict | None = None, unet_config=None, text_state: dict | None = None,
                   text_config=None) -> Path:
    """A diffusers LoRA file written by diffusers' own ``save_lora_weights`` (keys ``unet.`` / ``text_encoder.``,
    each LoraConfig in ``lora_adapter_metadata``)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    folder = path.with_suffix(".saving")
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(folder), unet_lora_layers=unet_state, text_encoder_lora_layers=text_state,
        unet_lora_adapter_metadata=unet_config.to_dict() if unet_config else None,
        text_encoder_lora_adapter_metadata=text_config.to_dict() if text_config else None)
    (folder / "pytorch_lora_weights.safetensors").replace(path)
    folder.rmdir()
    return path


def diffusers_loaded(model, files: list[tuple[Path, float]], component: str = "unet", unet_config=None):
    """A copy of ``model`` (a UNet or a text encoder) with each LoRA file loaded by diffusers' own loaders
    (``lora_state_dict`` + ``load_lora_into_unet`` / ``load_lora_into_text_encoder``) and weighted as
    ``set_adapters`` weights them: the reference every diffusion test compares with."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    mixin = StableDiffusionXLLoraLoaderMixin if unet_config is not None or component == "text_encoder_2" else StableDiffusionLoraLoaderMixin
    loaded = copy.deepcopy(model)
    names = []
    for i, (file, _) in enumerate(files):
        kwargs = {"unet_config": unet_config} if unet_config is not None else {}
        state, alphas, metadata = mixin.lora_state_dict(str(file), return_lora_metadata=True, **kwargs)
        name = f"file{i}"
        if component == "unet":
            mixin.load_lora_into_unet(state, alphas, loaded, adapter_name=name, metadata=metadata)
        else:
            mixin.load_lora_into_text_encoder(state, alphas, loaded, prefix=component, adapter_name=name, metadata=metadata)
        names.append(name)
    set_weights_and_activate_adapters(loaded, names, [w for _, w in files])
    return loaded.eval()


def build_diffusion(folder: Path) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    unet, te = sd_unet(), clip_text()
    feeds, ids = unet_feeds(unet), text_ids()
    export_unet(unet, feeds, folder / "unet.onnx")
    export_text(te, ids, folder / "text_encoder.onnx")
    np.savez(folder / "unet_inputs.npz", **feeds)
    np.save(folder / "input_ids.npy", ids)
    style_unet = LoraConfig(r=8, lora_alpha=4, target_modules=UNET_TARGETS)
    style_text = LoraConfig(r=4, lora_alpha=4, target_modules=TEXT_TARGETS)
    _, unet_state = trained(unet, style_unet, seed=1)
    _, text_state = trained(te, style_text, seed=2)
    save_file(kohya_state(unet_state, kohya_names("lora_unet_"), 4.0)
              | kohya_state(text_state, kohya_names("lora_te_", text=True), 4.0), str(folder / "style.safetensors"))
    detail_unet = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    detail_text = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    save_diffusers(folder / "detail.safetensors", trained(unet, detail_unet, seed=3)[1], detail_unet,
                   trained(te, detail_text, seed=4)[1], detail_text)
    for name in ("style", "detail"):
        file = [(folder / f"{name}.safetensors", 1.0)]
        np.save(folder / f"expected_unet_{name}.npy", run_unet(diffusers_loaded(unet, file), feeds))
        np.save(folder / f"expected_text_{name}.npy", run_text(diffusers_loaded(te, file, "text_encoder"), ids))
    blend = [(folder / "style.safetensors", 0.8), (folder / "detail.safetensors", 0.5)]
    np.save(folder / "expected_unet_blend.npy", run_unet(diffusers_loaded(unet, blend), feeds))
    print(f"wrote {folder}/unet.onnx, text_encoder.onnx, style.safetensors (kohya), detail.safetensors (diffusers), "
          "unet_inputs.npz, input_ids.npy, expected_{unet,text}_{style,detail}.npy, expected_unet_blend.npy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path, nargs="?", help="the LLM workspace to write")
    parser.add_argument("--diffusion", type=Path, metavar="DIR", help="write the Stable Diffusion workspace instead")
    args = parser.parse_args()
    if (args.folder is None) == (args.diffusion is None):
        parser.error("give a folder, or --diffusion DIR")
    if args.diffusion is not None:
        build_diffusion(args.diffusion)
    else:
        build(args.folder)


if __name__ == "__main__":
    main()
