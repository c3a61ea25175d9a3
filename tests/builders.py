"""Real transformers models from tiny configs (random weights), their ONNX exports, and real PEFT adapters."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import transformers as tf

VOCAB = 96


@dataclass(frozen=True)
class Family:
    """One model family: how to build it tiny, and which module names a typical adapter targets."""

    make: Callable[[], torch.nn.Module]
    targets: tuple[str, ...]
    torchscript: bool = False  # whether the TorchScript exporter handles it


def _llama() -> torch.nn.Module:
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _mistral() -> torch.nn.Module:
    return tf.MistralForCausalLM(tf.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _qwen2() -> torch.nn.Module:
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _phi3() -> torch.nn.Module:
    return tf.Phi3ForCausalLM(tf.Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                            pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _gpt2() -> torch.nn.Module:
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            bos_token_id=0, eos_token_id=0))


def _gpt_neox() -> torch.nn.Module:
    return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                  num_attention_heads=4, max_position_embeddings=64,
                                                  bos_token_id=0, eos_token_id=0))


def _bert() -> torch.nn.Module:
    return tf.BertModel(tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=64), add_pooling_layer=False)


def _opt() -> torch.nn.Module:
    return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                                          num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                          bos_token_id=0, eos_token_id=0, pad_token_id=1))


def _falcon() -> torch.nn.Module:
    return tf.FalconForCausalLM(tf.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                                                bias=False, bos_token_id=0, eos_token_id=0))


FAMILIES: dict[str, Family] = {
    "llama": Family(_llama, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "mistral": Family(_mistral, ("q_proj", "v_proj", "down_proj")),
    "qwen2": Family(_qwen2, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "phi3": Family(_phi3, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "gpt2": Family(_gpt2, ("c_attn", "c_proj", "c_fc")),
    "gpt_neox": Family(_gpt_neox, ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
    "bert": Family(_bert, ("query", "key", "value", "dense"), torchscript=True),
    "opt": Family(_opt, ("q_proj", "v_proj", "out_proj", "fc1", "fc2"), torchscript=True),
    "falcon": Family(_falcon, ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"), torchscript=True),
}


PEFT_CONFIGS = {  # LoraConfig keyword sets that exercise PEFT's targeting semantics on the llama family
    "rslora-all-linear": dict(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
    "rank-alpha-pattern": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "gate_proj"], rank_pattern={"v_proj": 2},
                               alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32}),
    "regex": dict(r=4, lora_alpha=8, target_modules=r".*\.(k_proj|up_proj)"),
    "layers": dict(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"], layers_to_transform=[1], layers_pattern="layers"),
    "exclude": dict(r=2, lora_alpha=8, target_modules=["q_proj", "o_proj"], exclude_modules=["model.layers.0.self_attn.o_proj"]),
}


class Wrapper(torch.nn.Module):
    """What users export: a module holding the model that returns one tensor (logits or hidden states)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.m.config.model_type == "bert":
            return self.m(input_ids=input_ids).last_hidden_state
        return self.m(input_ids=input_ids, use_cache=False).logits


def torch_linears(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Module path -> (in, out) of every nn.Linear / Conv1D: the ground truth site discovery must reproduce."""
    from transformers.pytorch_utils import Conv1D

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            out[name] = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):
            out[name] = (module.weight.shape[0], module.weight.shape[1])
    return out


def build(family: str, seed: int = 0) -> torch.nn.Module:
    """The family's tiny model with random weights, biases randomised too (so no two tensors coincide)."""
    torch.manual_seed(seed)
    model = FAMILIES[family].make().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


def example_ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def export(model: torch.nn.Module, path: Path, dynamo: bool = True) -> Path:
    """Export ``Wrapper(model)`` with the chosen torch exporter; leaves ``model`` in eval mode."""
    wrapper = Wrapper(model).eval()
    ids = example_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(wrapper, (ids,), str(path), dynamo=True, input_names=["input_ids"], output_names=["output"],
                              dynamic_shapes=({0: "batch", 1: "seq"},), verbose=False)
        else:
            torch.onnx.export(wrapper, (ids,), str(path), dynamo=False, input_names=["input_ids"], output_names=["output"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "seq"}})
    model.eval()
    return path


def make_adapter(model: torch.nn.Module, directory: Path, seed: int = 0, **config) -> torch.nn.Module:
    """Save a real PEFT adapter with non-zero B for ``model`` into ``directory``; returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config.setdefault("init_lora_weights", False)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**config)).eval()
    peft_model.save_pretrained(str(directory))
    return peft_model


def eager(model: torch.nn.Module, ids: torch.Tensor) -> np.ndarray:
    """The model's own output for ``ids`` (a PEFT model gives its unmerged LoRA output)."""
    with torch.no_grad():
        return Wrapper(model).eval()(ids).numpy()


def run_onnx(path: Path, ids: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| relative to the expected output's max magnitude."""
    return float(np.abs(actual - expected).max() / np.abs(expected).max())
