"""Adapter file formats: small readers that each yield one :class:`~lorapass.adapter.Adapter`.

``load_adapter`` picks the reader from what ``source`` is: a PEFT directory (``adapter_config.json`` +
``adapter_model.safetensors``), or a single ``.safetensors`` file whose keys say its format: kohya-ss / LyCORIS
(``lora_unet_...``, :mod:`~lorapass.formats.kohya`) or diffusers / PEFT (``unet.<path>.lora_A.weight``,
:mod:`~lorapass.formats.diffusers`). Single files name modules in their own spelling; bind them to a graph's site
paths with :func:`lorapass.formats.names.bind`. A user weight (the SD UIs' multiplier, ``FILE:WEIGHT`` on the
command line) multiplies every module's scale.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from lorapass.errors import AdapterError

if TYPE_CHECKING:
    from lorapass.adapter import Adapter


def parse_spec(spec: str | os.PathLike) -> tuple[Path, float]:
    """``PATH`` or ``PATH:WEIGHT`` -> (path, weight); a path that exists as given is never split."""
    text = os.fspath(spec)
    head, sep, tail = text.rpartition(":")
    if not sep or Path(text).exists():
        return Path(text), 1.0
    try:
        weight = float(tail)
    except ValueError:
        return Path(text), 1.0
    if weight != weight or weight in (float("inf"), float("-inf")):
        raise AdapterError(f"{text}: the adapter weight {tail!r} must be a finite number")
    return Path(head), weight


def load_adapter(source: str | os.PathLike, allow_pickle: bool = False, weight: float = 1.0) -> Adapter:
    """Read the adapter at ``source``; ``allow_pickle`` permits a PEFT ``adapter_model.bin``; ``weight``
    multiplies every module's scale."""
    from lorapass.formats import peft

    path = Path(source)
    if path.is_dir():
        adapter = peft.read(path, allow_pickle=allow_pickle)
    elif not path.exists():
        raise AdapterError(f"{path}: no such adapter directory or file")
    else:
        adapter = _single_file(path)
    if weight != 1.0:
        fixed = [m for m, kind in adapter.modules.items() if kind.replaced or not kind.targeted]
        if fixed:
            raise AdapterError(f"{path}:{weight:g}: a weight scales LoRA deltas, but {len(fixed)} module(s) of this "
                               f"adapter replace tensors outright (modules_to_save, trainable tokens, trained biases), "
                               f"which a weight cannot scale: {', '.join(fixed[:5])}{' ...' if len(fixed) > 5 else ''}")
        adapter.weight = weight
        for kind in adapter.modules.values():
            kind.scale *= weight
    return adapter


def _single_file(path: Path) -> Adapter:
    """A kohya / LyCORIS or diffusers / PEFT ``.safetensors`` file, told apart by its keys."""
    from lorapass.formats import diffusers, kohya
    from lorapass.formats.tensors import TensorFile

    if path.suffix != ".safetensors":
        raise AdapterError(f"{path}: not an adapter lorapass can read (expected a PEFT adapter directory or a "
                           ".safetensors LoRA file)")
    keys = TensorFile(path).keys()
    for reader in (kohya, diffusers):
        if reader.detect(keys):
            return reader.read(path)
    raise AdapterError(f"{path}: its keys (e.g. {sorted(keys)[:3]}) are neither kohya/LyCORIS (lora_unet_..., lora_te_...) "
                       "nor diffusers/PEFT (unet.<path>.lora_A.weight) LoRA keys")
