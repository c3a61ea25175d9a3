"""Progress bars (tqdm) for the steps that can take a while: shown on a terminal, never when stderr is piped
or inside :func:`hidden` (the command line's ``--json``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

_hidden = False


def bar(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it",
        shown: bool | None = None) -> Any:
    """A tqdm bar over ``iterable`` (or updated by hand). ``shown``: force it on or off; None: on a terminal."""
    from tqdm import tqdm

    disable = (not shown) if shown is not None else (True if _hidden else None)  # None: tqdm asks stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, leave=False, dynamic_ncols=True)


@contextmanager
def hidden(hide: bool = True) -> Iterator[None]:
    """No bar (unless forced with ``shown=True``) while inside, when ``hide``."""
    global _hidden
    before, _hidden = _hidden, _hidden or hide
    try:
        yield
    finally:
        _hidden = before
