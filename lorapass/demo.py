"""Build a quick-start workspace: a tiny Llama (random weights), its ONNX export, and two PEFT adapters.

``python -m lorapass.demo DIR`` writes DIR/model.onnx (+ .data), DIR/adapter_a, DIR/adapter_b (PEFT
directories made by ``peft``), DIR/input_ids.npy and DIR/expected_a.npy (PEFT's own output for adapter_a).
Needs the test extras (torch, transformers, peft); nothing is downloaded.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    build(parser.parse_args().folder)


if __name__ == "__main__":
    main()
