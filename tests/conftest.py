"""Shared fixtures: tiny real models, exported once per session, and real PEFT adapters."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from builders import build, export  # noqa: E402


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """``exported(family, dynamo=True)`` -> (model, onnx path); each export made once per session."""
    cache: dict[tuple[str, bool], tuple[object, Path]] = {}

    def get(family: str, dynamo: bool = True):
        key = (family, dynamo)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{family}_{'dynamo' if dynamo else 'torchscript'}")
            model = build(family)
            cache[key] = (model, export(model, folder / "model.onnx", dynamo=dynamo))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def genai(tmp_path_factory):
    """onnxruntime-genai builder outputs, each built once per session: ``genai.model(family)`` -> (torch model,
    HF folder); ``genai.build(family, precision="fp32", **extra_options)`` -> the output folder (see genai.py)."""
    from genai import GenaiBuilds

    return GenaiBuilds(tmp_path_factory.mktemp("genai"))
