"""Strategy multi on an onnxruntime-genai builder graph (packed q/k/v, GroupQueryAttention, KV cache): every row
keeps its adapter across decode steps, in an ONNX Runtime loop and in onnxruntime-genai's own generator, against
PEFT's mixed-batch logits and greedy tokens."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from builders import make_adapter, rel_err
from genai import feeds
from lorapass.onnx.rewrite import rewrite
from lorapass.ort_adapter import Session

TOL = 1e-4
PROMPTS = np.array([[5, 17, 33, 8, 61], [7, 7, 40, 12, 3], [90, 2, 45, 30, 11]], np.int64)
NEXT = np.array([[21, 9, 60], [14, 80, 5], [33, 1, 70]], np.int64)  # tokens fed at the decode steps
ROWS = ["qv", None, "all"]  # each row's adapter, kept for every step
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def multi(genai, tmp_path_factory):
    """(torch model, the multi builder folder, PEFT model holding both adapters)."""
    from peft import PeftModel

    model, _ = genai.model("llama")
    folder = genai.build("llama", "fp32")  # q/k/v packed into one MatMul per layer
    tmp = tmp_path_factory.mktemp("multi_genai")
    make_adapter(model, tmp / "qv", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    make_adapter(model, tmp / "all", seed=2, r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear")
    rewrite(folder / "model.onnx", tmp / "multi" / "model.onnx", adapter=[tmp / "qv", tmp / "all"], strategy="multi")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp / "qv"), adapter_name="qv")
    peft_model.load_adapter(str(tmp / "all"), adapter_name="all")
    return model, tmp / "multi", peft_model.eval()


def test_kv_cache_decode_keeps_each_rows_adapter(multi):
    model, folder, peft_model = multi
    out = folder / "model.onnx"
    records = json.loads(Session(out).session.get_modelmeta().custom_metadata_map["lorapass.lora"])
    qkv = {r["path"]: r for r in records}["model.layers.0.self_attn.qkv_proj"]
    assert (qkv["inner"]["slot"], qkv["ranks"], qkv["r"]) == ("packed", [8, 24], 24)  # q+v of rank 4; q+k+v of rank 8
    full = np.concatenate([PROMPTS, NEXT], axis=1)
    with torch.no_grad():
        rows = [r or "__base__" for r in ROWS]
        expected = peft_model(input_ids=torch.tensor(full), adapter_names=rows).logits.numpy()
        base = model(input_ids=torch.tensor(full)).logits.numpy()

    session = Session(out)
    step = feeds(out, PROMPTS)
    names = [o.name for o in session.session.get_outputs()]
    for t in range(NEXT.shape[1] + 1):
        result = dict(zip(names, session.run(step, adapters=ROWS)))
        seen = PROMPTS.shape[1] + t  # tokens in the cache after this step
        got = result["logits"][:, -1]
        assert rel_err(got, expected[:, seen - 1]) <= TOL, t
        assert rel_err(got[1], base[1, seen - 1]) <= TOL and rel_err(got[0], base[0, seen - 1]) > 1e-3
        if t == NEXT.shape[1]:
            break
        step = {"input_ids": NEXT[:, t:t + 1], "attention_mask": np.ones((3, seen + 1), np.int64)}
        if "position_ids" in {i.name for i in session.session.get_inputs()}:
            step["position_ids"] = np.full((3, 1), seen, np.int64)
        for name in names:
            if name.startswith("present."):
                step[name.replace("present.", "past_key_values.")] = result[name]


def test_onnxruntime_genai_generates_each_rows_adapter(multi):
    import onnxruntime_genai as og

    model, folder, peft_model = multi
    params = og.GeneratorParams(og_model := og.Model(str(folder)))
    params.set_search_options(max_length=PROMPTS.shape[1] + NEW_TOKENS, do_sample=False, batch_size=len(ROWS))
    generator = og.Generator(og_model, params)
    generator.set_model_input("lora_ids", np.array([0 if r is None else ["qv", "all"].index(r) + 1 for r in ROWS]))
    generator.append_tokens(PROMPTS.astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    got = [[int(t) for t in generator.get_sequence(i)] for i in range(len(ROWS))]
    kwargs = dict(attention_mask=torch.ones_like(torch.tensor(PROMPTS)), max_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad():
        expected = peft_model.generate(input_ids=torch.tensor(PROMPTS), adapter_names=[r or "__base__" for r in ROWS],
                                       **kwargs).tolist()
        base = model.generate(input_ids=torch.tensor(PROMPTS), **kwargs).tolist()
    assert got == expected
    assert got[0] != base[0] and got[2] != base[2] and got[1] == base[1]
