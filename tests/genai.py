"""onnxruntime-genai model builder runs for tests: a tiny HF model folder (random weights, a local WordLevel
tokenizer, no hub), built in process with ``precision`` fp32 / fp16 / int4 and any ``--extra_options``."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

from builders import VOCAB

BOS, EOS, PAD, UNK = 1, 2, 0, 3
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
"""Tiny, but as the builder needs: GroupQueryAttention's CPU kernel wants a head size that is a multiple of 16, and
the builder takes *any* nn.Linear with ``out_features == vocab_size`` for the lm_head (so no projection may be
VOCAB wide: with vocab 96 and Phi-3's gate_up_proj 2 x 48 rows, the logits would read layer 0's MLP input)."""
FAMILIES = {  # config class, model class, extra config
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=4)),
}


def build(family: str, seed: int = 0, **sizes) -> torch.nn.Module:
    """A tiny ``family`` causal LM with random weights (biases randomised too); ``sizes`` override SIZES."""
    import transformers as tf

    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(tf, model_cls)(getattr(tf, config_cls)(**(SIZES | extra | sizes))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


def tokenizer():
    """A WordLevel tokenizer over ``VOCAB`` words ``t0 .. t{VOCAB-1}`` (word ``tN`` is token id N)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token=f"t{UNK}"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=f"t{BOS}", eos_token=f"t{EOS}",
                                   pad_token=f"t{PAD}", unk_token=f"t{UNK}")


def hf_folder(model: torch.nn.Module, folder: Path) -> Path:
    """Save ``model`` (a transformers causal LM) and the test tokenizer as a local HF model folder."""
    config = model.config
    config.bos_token_id, config.eos_token_id, config.pad_token_id = BOS, EOS, PAD
    if config.model_type == "phi3":  # the builder's Phi-3 needs one rotary cache (no "multi_cache")
        config.original_max_position_embeddings = config.max_position_embeddings
    model.save_pretrained(str(folder))
    tokenizer().save_pretrained(str(folder))
    return folder


_GENAI_MODULES: dict[str, object] = {}


@contextlib.contextmanager
def _builder_modules():
    """The builder module, importable in a process that has the tests' own ``builders`` module.

    The builder imports its siblings as top-level modules (``builders``, ``quantization``, ... from its folder
    on sys.path), which this test suite's ``builders`` shadows; its modules are swapped into sys.modules for
    the duration of a build and swapped out after."""
    import onnxruntime_genai.models as models

    folder = os.path.dirname(models.__file__)
    tops = {p.stem for p in Path(folder).iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    ours = {n: m for n, m in sys.modules.items() if n.split(".")[0] in tops}
    for name in ours:
        del sys.modules[name]
    sys.modules.update(_GENAI_MODULES)
    sys.path.insert(0, folder)
    try:
        import builder

        yield builder
    finally:
        sys.path.remove(folder)
        for name in [n for n in sys.modules if n.split(".")[0] in tops]:
            _GENAI_MODULES[name] = sys.modules.pop(name)
        sys.modules.update(ours)


def run_builder(hf_dir: Path, out: Path, precision: str = "fp32", extra: dict[str, str] | None = None) -> Path:
    """``python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p PRECISION -e cpu --extra_options ...``,
    run in this process (a fresh interpreter per build costs seconds); its console output is swallowed
    and shown only if it fails. Returns ``out`` (model.onnx, model.onnx.data, genai_config.json, tokenizer)."""
    options = [f"{k}={v}" for k, v in (extra or {}).items()]
    cache = out.parent / f"{out.name}.cache"
    log = io.StringIO()
    logging.disable(logging.INFO)  # the int4 quantizer logs every node
    try:
        with _builder_modules() as builder, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            kwargs = builder.parse_extra_options(None, str(hf_dir), str(out), precision, "cpu", str(cache), options)
            builder.create_model(None, str(hf_dir), str(out), precision, "cpu", str(cache), **kwargs)
    except Exception as exc:
        raise RuntimeError(f"genai builder failed on {hf_dir} ({precision}, {options}):\n{log.getvalue()[-4000:]}") from exc
    finally:
        logging.disable(logging.NOTSET)
    return out


class GenaiBuilds:
    """Session cache of tiny HF folders and their builder outputs (see ``genai`` in conftest.py)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models: dict[str, tuple[torch.nn.Module, Path]] = {}
        self.outputs: dict[tuple, Path] = {}

    def model(self, family: str, seed: int = 0) -> tuple[torch.nn.Module, Path]:
        """(the torch model, its HF folder) of a tiny ``family`` model, made once."""
        key = f"{family}_{seed}"
        if key not in self.models:
            model = build(family, seed)
            self.models[key] = (model, hf_folder(model, self.root / key / "hf"))
        return self.models[key]

    def build(self, family: str, precision: str = "fp32", seed: int = 0, **extra: str) -> Path:
        """The builder's output folder for ``family`` at ``precision`` with ``extra`` options, built once.

        ``adapter_path=DIR`` (a PEFT adapter) makes the builder's own LoRA build of that adapter."""
        key = (family, seed, precision, tuple(sorted(extra.items())))
        if key not in self.outputs:
            _, hf_dir = self.model(family, seed)
            tag = "_".join([precision] + [f"{k}-{os.path.basename(str(v))}" for k, v in sorted(extra.items())])
            tag += f"_{len(self.outputs)}"  # two adapter_path values may share a folder name
            self.outputs[key] = run_builder(hf_dir, hf_dir.parent / tag, precision, extra)
        return self.outputs[key]


def feeds(model: Path, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs for a builder graph's first step: ``ids`` [batch, seq], all-ones mask, positions, an empty cache."""
    import onnx

    decoder = json.loads((model.parent / "genai_config.json").read_text())["model"]["decoder"]
    out = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, np.int64)}
    for value in onnx.load(str(model), load_external_data=False).graph.input:
        t = value.type.tensor_type
        if value.name == "position_ids":
            out[value.name] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        elif value.name.startswith("past_key_values."):
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
            out[value.name] = np.zeros((ids.shape[0], t.shape.dim[1].dim_value, 0, decoder["head_size"]), dtype)
    return out


def first_logits(model: Path, ids: np.ndarray, adapter: Path | None = None) -> np.ndarray:
    """The builder graph's logits for the prompt ``ids`` in ONNX Runtime (float32), with an adapter file active."""
    from lorapass.ort_adapter import Session

    session = Session(model)
    if adapter is not None:
        session.add_adapter("a", adapter)
    return session.run(feeds(model, ids), adapter="a" if adapter else None, outputs=["logits"])[0].astype(np.float32)
