"""onnxruntime-genai model folders: a rewrite of ``DIR/model.onnx`` into another folder carries the folder's other
files (genai_config.json, tokenizer, other models), so the output folder loads with ``onnxruntime_genai.Model``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir

CONFIG = "genai_config.json"


def external_files(model: ir.Model) -> set[str]:
    """The external data files the model's tensors (in every graph) read, as written in the model."""
    graphs = [model.graph, *model.graph.subgraphs()]
    return {v.const_value.location for g in graphs for v in g.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)}


def _decoder(config) -> dict | None:
    model = config.get("model") if isinstance(config, dict) else None
    decoder = model.get("decoder") if isinstance(model, dict) else None
    return decoder if isinstance(decoder, dict) else None


def _config(model: Path) -> dict | None:
    """The genai_config.json beside ``model`` if it names ``model`` as its decoder."""
    path = model.parent / CONFIG
    try:
        config = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError, RecursionError):
        return None
    decoder = _decoder(config)
    return config if decoder is not None and decoder.get("filename") == model.name else None


def companions(source: Path, output: Path, skip: set[str]) -> dict[Path, Callable[[Path], None]]:
    """The files of ``source``'s genai folder to write beside ``output`` (output path -> writer of a temporary):
    every file but the model and ``skip`` (its external data), the genai_config.json naming ``output`` as the
    decoder. Empty unless ``source`` is a genai folder's decoder and ``output`` goes to another folder."""
    config = _config(source)
    if config is None or source.parent.resolve() == output.parent.resolve():
        return {}
    _decoder(config)["filename"] = output.name
    text = json.dumps(config, indent=4)
    skip = skip | {source.name, output.name, f"{output.name}.data"}  # never over the output's own files
    out: dict[Path, Callable[[Path], None]] = {}
    for item in sorted(source.parent.rglob("*")):
        name = item.relative_to(source.parent)
        if not item.is_file() or str(name) in skip or any(part.startswith(".") for part in name.parts):
            continue
        if str(name) == CONFIG:
            out[output.parent / name] = lambda tmp: tmp.write_text(text)
        else:
            out[output.parent / name] = lambda tmp, item=item: shutil.copyfile(item, tmp)
    return out
