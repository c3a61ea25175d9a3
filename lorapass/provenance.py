"""What a rewrite applied, recorded in the output model; applying LoRA twice is refused unless forced.

Model metadata ``lorapass.provenance`` is a JSON list with one entry per lorapass rewrite the graph went
through: ``{"lorapass": version, "strategy", "adapters": [{"adapter": absolute path, "format", "weight",
"files": {name: sha256}, "sha256": of those}], "rules": {"path", "sha256"} or null, "targets": n}``.

Refused (ModelError) unless ``force``: any rewrite of a graph that already carries lorapass dynamic slots
(metadata ``lorapass.lora``: its adapter sits in the slots, a merge would add another on top), and any rewrite
with an adapter whose weights (same content hash, wherever the folder is) a previous lorapass merge folded into
this graph. Refused even when forced (UnsupportedError): a dynamic rewrite of a graph with slots, since a
second set of slots at the same module paths could not be addressed. Existing slots are never sites: their
weights are graph inputs, which site discovery skips.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx_ir as ir

from lorapass.adapter import Adapter
from lorapass.errors import ModelError, UnsupportedError
from lorapass.onnx.slots import METADATA_KEY

KEY = "lorapass.provenance"


def version() -> str:
    try:
        return metadata.version("lorapass")
    except metadata.PackageNotFoundError:
        return "unknown"


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def input_files(adapters: list[Adapter], rules: str | os.PathLike | None) -> list[Path]:
    """Every file a rewrite reads besides the model: each adapter's files (its whole folder) and the rules file."""
    files: list[Path] = []
    for adapter in adapters:
        folder = adapter.source if adapter.source.is_dir() else None
        files += [p for p in sorted(folder.iterdir()) if p.is_file()] if folder else list(adapter.files)
    return files + ([Path(rules)] if rules is not None else [])


def adapter_entry(adapter: Adapter) -> dict[str, Any]:
    """What identifies an adapter: its path, format, user weight, and the content hash of every file it was read from."""
    files = {p.name: sha256(p) for p in adapter.files}
    digest = hashlib.sha256("".join(f"{k}:{v};" for k, v in sorted(files.items())).encode()).hexdigest()
    return {"adapter": str(adapter.source.resolve()), "format": adapter.format, "weight": adapter.weight,
            "files": files, "sha256": digest}


def entry(adapters: list[Adapter], strategy: str, rules: str | os.PathLike | None, targets: int) -> dict[str, Any]:
    """The provenance record of one rewrite."""
    record: dict[str, Any] = {"lorapass": version(), "strategy": strategy,
                              "adapters": [adapter_entry(a) for a in adapters], "rules": None, "targets": targets}
    if rules is not None:
        record["rules"] = {"path": str(Path(rules).resolve()), "sha256": sha256(Path(rules))}
    return record


def records(model: ir.Model, source: str | os.PathLike, force: bool = False) -> list[dict[str, Any]]:
    """The model's provenance entries; ModelError if the metadata is unreadable (with ``force``: dropped)."""
    text = model.metadata_props.get(KEY)
    if text is None:
        return []
    try:
        found = json.loads(text)
    except (ValueError, RecursionError):
        found = None
    if isinstance(found, list) and all(isinstance(r, dict) for r in found):
        return found
    if force:
        return []
    raise ModelError(f"{source}: metadata {KEY!r} is not a JSON list of records; --force replaces it")


def stamp(model: ir.Model, source: str | os.PathLike, adapters: list[Adapter], strategy: str, targets: list,
          force: bool = False, rules: str | os.PathLike | None = None) -> dict[str, Any]:
    """Refuse a second application of LoRA (see the module doc), then append this rewrite's record to ``model``."""
    history = records(model, source, force)
    if METADATA_KEY in model.metadata_props:
        if strategy in ("dynamic", "multi"):
            raise UnsupportedError(f"{source}: already has lorapass dynamic LoRA slots (metadata {METADATA_KEY!r}); "
                                   "a second set of slots is not supported: rewrite the base model (one dynamic "
                                   "graph serves any number of adapters through export-adapter)")
        if not force:
            raise ModelError(f"{source}: has lorapass dynamic LoRA slots (metadata {METADATA_KEY!r}), whose weights "
                             "already apply an adapter (or zeros); a merge would add LoRA on top of them: merge into "
                             "the base model, or pass --force")
    record = entry(adapters, strategy, rules, len(targets))
    if not force:
        merged = {a.get("sha256"): a for old in history if old.get("strategy") == "merge"
                  for a in old.get("adapters", []) if isinstance(a, dict)}
        for adapter, new in zip(adapters, record["adapters"]):
            if new["sha256"] in merged:
                raise ModelError(f"{source}: lorapass already merged the adapter {merged[new['sha256']].get('adapter')} "
                                 f"into it (same files, sha256 {new['sha256'][:12]}...): applying {adapter.source} again "
                                 "would apply it twice; pass --force to do it anyway")
    model.metadata_props[KEY] = json.dumps([*history, record])
    return record
