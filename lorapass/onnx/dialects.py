"""Exporter dialects: how an exporter's scope names map onto PEFT module paths, and how it packs modules.

A :class:`Dialect` is data: component aliases (the genai builder's ``attn`` is PEFT's ``self_attn``), op
components it leaves in parameter names (``model.layers.0.attn.q_proj.MatMul.weight``), the projections it packs
into one node (``qkv_proj`` holds q_proj, k_proj and v_proj rows, in that order) and, per model type, the
modules the HF model packs itself and an exporter may split (Phi-3's ``qkv_proj``, ``gate_up_proj``). The
dialect of a graph is detected (:func:`detect`) from a ``genai_config.json`` beside it or from the naming its
nodes and initializers follow; user aliases (``--alias attn=self_attn``, a rules file's ``aliases``) go on top.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx_ir as ir

from lorapass.errors import ModelError, RuleError

SOURCE = "lorapass.source"
"""``graph.meta`` key: the file the model was loaded from (set by :func:`lorapass.onnx.load.load_model`)."""

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


@dataclass(frozen=True)
class Dialect:
    """One exporter's naming, as data.

    ``aliases``: path components (or dotted runs of them) -> PEFT's; ``drop``: op components removed from the
    end of a path; ``packed``: a node component -> the modules whose rows it holds, in row order;
    ``hf_packed``: per model type, the modules the HF model itself packs (the same table read the other way:
    a graph that splits them has one node per part)."""

    name: str
    aliases: Mapping[str, str] = field(default_factory=dict)
    drop: frozenset[str] = frozenset()
    packed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    hf_packed: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)
    model_type: str | None = None
    config: Mapping[str, int] = field(default_factory=dict)  # q_rows / kv_rows from the model's config
    config_file: str | None = None

    def module_path(self, path: str) -> str:
        """The PEFT module path of a path as the exporter wrote it."""
        parts = path.split(".")
        while parts and parts[-1] in self.drop:
            parts.pop()
        text = "." + ".".join(parts) + "."
        for old, new in sorted(self.aliases.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(f".{old}.", f".{new}.")
        return text.strip(".")

    def packs(self, component: str) -> tuple[str, ...]:
        """The modules a node named ``component`` packs (empty if it is one module of the HF model)."""
        if component in self.native():
            return ()
        return tuple(self.packed.get(component, ()))

    def native(self) -> Mapping[str, tuple[str, ...]]:
        """Modules this model type packs itself (HF module -> the parts an exporter may split it into)."""
        return self.hf_packed.get(self.model_type or "", {})

    def part_rows(self, packed: str, parts: tuple[str, ...], total: int) -> list[int] | None:
        """Row counts of ``parts`` in a packed weight of ``total`` rows, from the model config (None: unknown)."""
        if parts == GATE_UP and total % 2 == 0:  # gate and up are both intermediate_size wide
            return [total // 2] * 2
        if parts == QKV and {"q_rows", "kv_rows"} <= set(self.config):
            rows = [self.config["q_rows"], self.config["kv_rows"], self.config["kv_rows"]]
            if sum(rows) != total:
                raise ModelError(
                    f"{self.config_file}: q/k/v rows {rows} (num_attention_heads x head_size, num_key_value_heads x "
                    f"head_size) do not add up to the {total} rows of the packed node {packed!r}")
            return rows
        return None

    def with_aliases(self, aliases: Mapping[str, str]) -> Dialect:
        if not aliases:
            return self
        return replace(self, name=f"{self.name}+alias", aliases={**self.aliases, **aliases})


PACKED = {"qkv_proj": QKV, "gate_up_proj": GATE_UP}
HF_PACKED = {"phi3": {"qkv_proj": QKV, "gate_up_proj": GATE_UP}}

TORCH = Dialect("torch", hf_packed=HF_PACKED)
"""torch's exporters (dynamo, TorchScript) and optimum: module paths as torch wrote them."""

GENAI = Dialect("genai", aliases={"attn": "self_attn"}, drop=frozenset({"MatMul", "Add"}), packed=PACKED, hf_packed=HF_PACKED)
"""onnxruntime-genai's model builder: ``/model/layers.N/attn/qkv_proj/MatMul``, ``lm_head.MatMul.weight``, biases
``...qkv_proj.Add.bias`` (the names left where MatMulNBits renamed the weight ``...MatMul.weight_Q4``)."""

DIALECTS = {d.name: d for d in (TORCH, GENAI)}

_ALIAS = re.compile(r"^[^=.\s][^=\s]*$")


def parse_aliases(items: Iterable[str] | Mapping[str, str] | None) -> dict[str, str]:
    """``["attn=self_attn", ...]`` (or a mapping) as {graph components: PEFT components}; RuleError on a bad one."""
    if not items:
        return {}
    pairs = items.items() if isinstance(items, Mapping) else [_split_alias(text) for text in items]
    out = {}
    for old, new in pairs:
        if not (isinstance(old, str) and isinstance(new, str) and _ALIAS.match(old) and _ALIAS.match(new)) \
                or old.endswith(".") or new.endswith(".") or ".." in old + new:
            raise RuleError(f"alias {old!r}={new!r}: both sides must be module path components such as attn=self_attn")
        out[old] = new
    return out


def _split_alias(text: str) -> tuple[str, str]:
    old, sep, new = str(text).partition("=")
    if not sep:
        raise RuleError(f"alias {text!r}: expected GRAPH=PEFT, e.g. attn=self_attn")
    return old.strip(), new.strip()


_QUANTIZED = re.compile(r"_Q\d+$")  # ORT's quantizer suffix: node /a/MatMul_Q4 over a.MatMul.weight_Q4


def _builder_named(node: ir.Node, weight: ir.Value) -> bool:
    """The genai builder's convention: initializer = node name without its leading '/', '/' -> '.', + '.weight'
    (both with the same ``_Q<bits>`` suffix when quantized to MatMulNBits)."""
    name, suffix = node.name or "", ""
    if (found := _QUANTIZED.search(name)) is not None:
        name, suffix = name[:found.start()], found.group()
    return name.startswith("/") and weight.name == name[1:].replace("/", ".") + ".weight" + suffix


def _read_config(folder: Path, model_file: str) -> tuple[str | None, str | None, dict]:
    """(file, model type, {q_rows, kv_rows}) from genai_config.json (when it names this model) or config.json."""
    genai = folder / "genai_config.json"
    if genai.is_file():
        data = _json(genai)
        model = data.get("model", {}) if isinstance(data, dict) else {}
        model = model if isinstance(model, dict) else {}
        decoder = model.get("decoder", {})
        if isinstance(decoder, dict) and decoder.get("filename", model_file) == model_file:
            return str(genai), model.get("type"), _rows(decoder, decoder.get("head_size"))
    hf = folder / "config.json"
    if hf.is_file():
        data = _json(hf)
        if isinstance(data, dict):
            heads, hidden = data.get("num_attention_heads"), data.get("hidden_size")
            head = data.get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None)
            return str(hf), data.get("model_type"), _rows(data, head)
    return None, None, {}


def _rows(config: dict, head_size) -> dict:
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads", config.get("num_attention_heads"))
    if not all(isinstance(v, int) and v > 0 for v in (heads, kv, head_size)):
        return {}
    return {"q_rows": heads * head_size, "kv_rows": kv * head_size}


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise ModelError(f"{path}: not a readable JSON file ({exc})") from None


def detect(model: ir.Model, linears: Iterable[tuple[ir.Node, ir.Value]], aliases: Mapping[str, str] | None = None) -> Dialect:
    """The dialect that named ``model``: genai when a genai_config.json beside it names it, or when its linear
    (node, weight) pairs follow the builder's naming; else torch. Model type and q/k/v rows come from
    genai_config.json or config.json beside the model. ``aliases`` go on top."""
    source = model.graph.meta.get(SOURCE)
    config_file, model_type, rows = _read_config(Path(source).parent, Path(source).name) if source else (None, None, {})
    pairs = list(linears)
    builder = bool(pairs) and sum(_builder_named(n, w) for n, w in pairs) * 2 > len(pairs)
    genai_config = config_file is not None and config_file.endswith("genai_config.json")
    base = GENAI if genai_config or builder else TORCH
    dialect = replace(base, model_type=model_type, config=rows, config_file=config_file)
    return dialect.with_aliases(dict(aliases or {}))
