"""A Llama-shaped ONNX graph written straight to disk with external data, for benchmarks too big to export.

Weights are stored as the dynamo exporter leaves them after constant folding: [in, out] initializers with
anonymous names (``val_N``) whose ``pkg.onnxscript.optimizer.folded_from`` names the torch parameter. The
graph computes a residual chain of every linear (no attention softmax: the merge pass only sees weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir

LLAMA_1B = dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256)  # Llama-3.2-1B: 1.24B


def linears(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, **_: int) -> list[tuple[str, int, int]]:
    """(module path, in, out) of every decoder linear, in execution order."""
    kv = hidden // heads * kv_heads
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, kv), "self_attn.v_proj": (hidden, kv),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (hidden, intermediate),
              "mlp.up_proj": (hidden, intermediate), "mlp.down_proj": (intermediate, hidden)}
    return [(f"model.layers.{i}.{name}", *shape) for i in range(layers) for name, shape in shapes.items()]


def build(path: Path, dtype: str = "float16", seed: int = 0, **shape: int) -> dict:
    """Write the graph to ``path`` (+ ``path.data``), one tensor at a time; returns sizes."""
    shape = {**LLAMA_1B, **shape}
    np_dtype = np.dtype(dtype)
    ir_dtype = ir.DataType.from_numpy(np_dtype)
    rng = np.random.default_rng(seed)
    block = (rng.standard_normal(1 << 22, dtype=np.float32) * 0.02).astype(np_dtype)  # tiled: fast and non-constant
    data_path = path.with_name(path.name + ".data")
    offset, largest, values = 0, 0, {}

    def tensor(name: str, dims: tuple[int, ...], f, source: str | None = None) -> ir.Value:
        nonlocal offset, largest
        count = int(np.prod(dims))
        array = np.resize(np.roll(block, len(values)), count)
        offset = -(-offset // 4096) * 4096
        f.seek(offset)
        f.write(array.tobytes())
        ext = ir.ExternalTensor(data_path.name, offset, array.nbytes, ir_dtype, shape=ir.Shape(dims), name=name,
                                base_dir=path.parent)
        offset += array.nbytes
        largest = max(largest, array.nbytes)
        value = ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(ir_dtype), const_value=ext)
        if source:
            value.metadata_props["pkg.onnxscript.optimizer.folded_from"] = repr([source])
        values[name] = value
        return value

    ids = ir.Value(name="input_ids", shape=ir.Shape(["batch", "seq"]), type=ir.TensorType(ir.DataType.INT64))
    nodes: list[ir.Node] = []

    def op(op_type: str, *inputs: ir.Value) -> ir.Value:
        node = ir.Node("", op_type, list(inputs), name=f"node_{op_type}_{len(nodes)}")
        nodes.append(node)
        return node.outputs[0]

    with open(data_path, "wb") as f:
        embed = tensor("model.embed_tokens.weight", (shape["vocab"], shape["hidden"]), f)
        x = op("Gather", embed, ids)
        layer_out = {}
        for i, (module, fan_in, fan_out) in enumerate(linears(**shape)):
            w = tensor(f"val_{i}", (fan_in, fan_out), f, f"{module}.weight")
            name = module.rsplit(".", 1)[1]
            src = {"q_proj": x, "k_proj": x, "v_proj": x, "o_proj": layer_out.get("q_proj"), "gate_proj": x,
                   "up_proj": x, "down_proj": layer_out.get("act")}[name]
            y = op("MatMul", src, w)
            layer_out[name] = y
            if name == "o_proj":
                x = op("Add", x, y)
            elif name == "up_proj":
                gate = layer_out["gate_proj"]
                layer_out["act"] = op("Mul", op("Mul", gate, op("Sigmoid", gate)), y)
            elif name == "down_proj":
                x = op("Add", x, y)
        logits = op("MatMul", x, op("Transpose", embed))  # lm_head tied to the embedding, as in Llama-3.2-1B
        nodes[-2].attributes["perm"] = ir.AttrInt64s("perm", [1, 0])
    logits.name = "logits"
    graph = ir.Graph([ids], [logits], nodes=nodes, initializers=list(values.values()), opset_imports={"": 18})
    ir.save(ir.Model(graph, ir_version=10), path)
    return {"params": sum(v.const_value.size for v in values.values()), "bytes": data_path.stat().st_size,
            "largest_tensor_bytes": largest}


def write_adapter(directory: Path, modules: list[tuple[str, int, int]], r: int, alpha: float, seed: int = 0) -> None:
    """A PEFT-format adapter directory (the key layout and config PEFT writes) for ``modules``."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, fan_in, fan_out in modules:
        tensors[f"base_model.model.{module}.lora_A.weight"] = rng.standard_normal((r, fan_in), dtype=np.float32) * 0.01
        tensors[f"base_model.model.{module}.lora_B.weight"] = rng.standard_normal((fan_out, r), dtype=np.float32) * 0.01
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": "all-linear", "bias": "none"}))
