"""Real PEFT adapters of every LoRA variant, trained tensors moved away from PEFT's initialisation."""

from __future__ import annotations

import copy
import warnings

import torch


def make_variant(model, directory, seed: int = 0, **config):
    """A real PEFT adapter saved in ``directory`` whose every trained tensor is non-zero and moved away from PEFT's
    initial value (B, DoRA magnitudes, copied heads, biases and token rows alike); returns the PEFT model."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lora_bias without a base bias, tied embeddings, fan_in_fan_out
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**config)).eval()
        initial = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in peft_model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn(param.shape, generator=generator) * (0.3 * param.abs().mean() + 0.05))
        peft_model.save_pretrained(str(directory))
        saved = get_peft_model_state_dict(peft_model)
    for key, value in saved.items():
        if key.endswith("base_layer.weight"):
            continue  # save_embedding_layers' copy of the untrained base weight
        assert value.abs().max() > 0 and not torch.equal(value, initial[key]), key
    return peft_model
