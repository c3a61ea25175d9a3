"""onnxruntime-genai model folders: a rewrite of ``DIR/model.onnx`` into another folder carries the folder's other
files (genai_config.json, tokenizer, other models), so the output folder loads with ``onnxruntime_genai.Model``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx_ir as ir

CONFIG = "genai_config.json"


def external_files(model: ir.Model) -> set[str]:
    """The external data files the model's tensors (in every graph) read, as written in the model."""
    graphs = [model.graph, *model.graph.subgraphs()]
    return {v.const_value.location for g in graphs for v in g.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)}


def _decoder(config: dict) -> dict | None:
    decoder = config.get("model", {}).get("decoder") if isinstance(config.get("model"), dict) else None
    return decoder if isinstance(decoder, dict) else None


def is_genai_model(model: Path) -> bool:
    """Whether ``model`` sits in a genai folder whose genai_config.json names it as the decoder."""
    path = model.parent / CONFIG
    if not path.is_file():
        return False
    try:
        decoder = _decoder(json.loads(path.read_text()))
    except (OSError, ValueError):
        return False
    return decoder is not None and decoder.get("filename") == model.name


def carry_folder(source: Path, output: Path, skip: set[str]) -> list[Path]:
    """Copy the genai folder of ``source`` beside ``output`` (every file but the model and ``skip``, its external
    data), naming ``output`` as the decoder in the copied genai_config.json; returns the files written.
    Nothing is done unless ``source`` is a genai folder's decoder in another folder than ``output``'s."""
    source, output = Path(source), Path(output)
    if not is_genai_model(source) or source.parent.resolve() == output.parent.resolve():
        return []
    written = []
    skip = skip | {source.name, output.name, f"{output.name}.data"}  # never over the output just written
    for item in sorted(source.parent.iterdir()):
        if item.name in skip or item.name.startswith("."):
            continue
        target = output.parent / item.name
        if item.name == CONFIG:
            config = json.loads(item.read_text())
            _decoder(config)["filename"] = output.name
            _write(target, lambda tmp, text=json.dumps(config, indent=4): tmp.write_text(text))
        elif item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            _write(target, lambda tmp, item=item: shutil.copy2(item, tmp))
        written.append(target)
    return written


def _write(target: Path, make) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        make(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
