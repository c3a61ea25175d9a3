"""Adapter file formats: small readers that each yield one :class:`~lorapass.adapter.Adapter`.

``load_adapter`` picks the reader from what ``source`` is: a PEFT directory (``adapter_config.json`` +
``adapter_model.safetensors``) today.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from lorapass.errors import AdapterError

if TYPE_CHECKING:
    from lorapass.adapter import Adapter


def load_adapter(source: str | os.PathLike, allow_pickle: bool = False) -> Adapter:
    """Read the adapter at ``source``; ``allow_pickle`` permits a PEFT ``adapter_model.bin``."""
    from lorapass.formats import peft

    path = Path(source)
    if path.is_dir():
        return peft.read(path, allow_pickle=allow_pickle)
    if not path.exists():
        raise AdapterError(f"{path}: no such adapter directory or file")
    raise AdapterError(f"{path}: not an adapter lorapass can read (expected a PEFT adapter directory)")
