"""Write a rewritten model all or nothing, streaming one tensor at a time.

External data is copied file by file (a kernel copy that never enters this process, a plain copy where the
kernel refuses, e.g. across filesystems), then every tensor the rewrite replaced is computed and written on
its own: into its old slot when it has the same size (merge), else appended, aligned, to the output's data
file. Tensors stay inline when the input kept them inline. Everything goes to temporaries first and is
committed by :class:`lorapass.atomic.Transaction`: outputs never overwrite an input, the model and its data
files are renamed into place together or not at all, and nothing is left behind on failure or SIGTERM.
"""

from __future__ import annotations

import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from lorapass.atomic import Transaction
from lorapass.errors import ModelError

REPLACES = "lorapass.replaces"
"""``Value.meta`` key: the ExternalTensor a rewritten tensor replaces (its slot may be reused)."""

_INLINE_LIMIT = 1024
_ALIGN = 4096
_PROTO_LIMIT = 2**31 - 1


@dataclass
class SaveStats:
    """What the writer did: bytes it wrote (data and model) and how many tensors it computed."""

    bytes_written: int = 0
    tensors_written: int = 0


@dataclass
class _DataFile:
    name: str  # final location, relative to the output folder
    tmp: Path
    size: int


def _data_names(locations: list[str], out: Path) -> dict[str, str]:
    """The output's data file per input location: ``<out>.data`` for one, ``<out>.<location>`` (made unique) for several."""
    if len(locations) == 1:
        return {locations[0]: f"{out.name}.data"}
    names: dict[str, str] = {}
    for loc in locations:
        name = base = f"{out.name}.{loc.replace('/', '_').replace(os.sep, '_')}"
        i = 1
        while name in names.values():
            name, i = f"{base}_{i}", i + 1
        names[loc] = name
    return names


class _Writer:
    """One I/O thread: copies and tensor writes run there in order while the caller computes the next tensor.

    At most ``depth`` writes wait in the queue, so no more than ``depth + 1`` computed tensors are in memory.
    """

    def __init__(self, depth: int = 2) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorapass-io")
        self.queue: deque[Future] = deque()
        self.depth = depth

    def submit(self, fn, *args) -> None:
        self.queue.append(self.pool.submit(fn, *args))
        while len(self.queue) > self.depth + 1:
            self.queue.popleft().result()

    def drain(self) -> None:
        while self.queue:
            self.queue.popleft().result()

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.pool.shutdown(wait=True, cancel_futures=error is not None)  # never leave a write running


def save_model(model: ir.Model, source: str | os.PathLike, out: str | os.PathLike, progress: bool | None = None,
               inputs: Iterable[str | os.PathLike] = (),
               companions: Mapping[Path, Callable[[Path], None]] | None = None) -> SaveStats:
    """Save ``model`` (loaded from ``source``) to ``out``, all or nothing.

    No output file (model, data files, temporaries) may be ``source``, its external data or any of ``inputs``
    (e.g. the adapter's files, the rules file): ModelError before anything is written. ``companions`` are more
    output files committed with the model (path -> a function writing it at the temporary path it is given).
    """
    companions = dict(companions or {})
    source, out = Path(source).resolve(), Path(os.path.abspath(out))
    initializers = list(model.graph.initializers.values())
    external = [v for v in initializers if isinstance(v.const_value, ir.ExternalTensor)]
    replaced = [v for v in initializers if REPLACES in v.meta and isinstance(v.meta[REPLACES], ir.ExternalTensor)]
    locations = list(dict.fromkeys([v.const_value.location for v in external] + [v.meta[REPLACES].location for v in replaced]))
    names = _data_names(locations, out)
    read = [source, *(source.parent / loc for loc in locations), *map(Path, inputs)]
    stats = SaveStats()
    outputs = [out, *(out.parent / name for name in names.values()), *companions]
    with Transaction(outputs, read) as commit, _Writer() as io:
        for path, write in companions.items():
            write(commit.temp(path))
        files: dict[str, _DataFile] = {}
        for loc, name in names.items():
            tmp = commit.temp(out.parent / name)
            slots = [(v.meta[REPLACES].offset or 0, v.meta[REPLACES].nbytes) for v in replaced
                     if v.meta[REPLACES].location == loc and v.meta[REPLACES].nbytes == v.const_value.nbytes]
            files[loc] = _DataFile(name, tmp, (source.parent / loc).stat().st_size)
            stats.bytes_written += files[loc].size - sum(n for _, n in slots)
            io.submit(_copy_except, source.parent / loc, tmp, slots)
        for value in external:
            t = value.const_value
            value.const_value = _external(files[t.location], t.offset or 0, t.length or t.nbytes, t, out.parent)
        pending = [v for v in initializers if not isinstance(v.const_value, ir.ExternalTensor)]
        primary = files[locations[0]] if locations else None
        computed = [v for v in pending if not isinstance(v.const_value, ir.Tensor) or REPLACES in v.meta]
        bar = tqdm(total=len(computed), desc="writing tensors", unit="tensor", disable=None if progress is None else not progress)
        for value in pending:
            _place_tensor(value, files, primary, out.parent, stats, io)
            if value in computed:
                bar.update()
        io.drain()
        bar.close()
        proto = ir.to_proto(model)
        if proto.ByteSize() > _PROTO_LIMIT:
            raise ModelError(f"{out}: the model proto would exceed 2 GB; write the input with external data")
        data = proto.SerializeToString()
        commit.temp(out).write_bytes(data)
        stats.bytes_written += len(data)
        commit.commit()
    return stats


def _copy_except(src: Path, dst: Path, slots: list[tuple[int, int]]) -> int:
    """Copy ``src`` to ``dst`` in the kernel, skipping the byte ranges that will be rewritten anyway."""
    if not slots:
        shutil.copyfile(src, dst)
        return dst.stat().st_size
    size, copied, pos = src.stat().st_size, 0, 0
    kernel = hasattr(os, "copy_file_range")
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.truncate(size)
        for start, stop in sorted((o, o + n) for o, n in slots) + [(size, size)]:
            while pos < start:
                if not kernel:
                    n = _copy_range(fin.fileno(), fout.fileno(), pos, start - pos)
                else:
                    try:
                        n = os.copy_file_range(fin.fileno(), fout.fileno(), start - pos, pos, pos)
                    except OSError:  # EXDEV (another filesystem), EINVAL, ENOSYS...: copy in user space
                        kernel = False
                        continue
                if n == 0:
                    raise ModelError(f"{src}: shorter than its tensors say")
                pos, copied = pos + n, copied + n
            pos = max(pos, stop)
    return copied


def _copy_range(fin: int, fout: int, offset: int, count: int, chunk: int = 1 << 24) -> int:
    """Copy up to ``count`` bytes at ``offset`` with plain reads and writes; returns how many (0 at end of file)."""
    data = os.pread(fin, min(count, chunk), offset)
    view, done = memoryview(data), 0
    while done < len(data):
        done += os.pwrite(fout, view[done:], offset + done)
    return len(data)


def _external(file: _DataFile, offset: int, length: int, like: ir.TensorProtocol, folder: Path) -> ir.ExternalTensor:
    return ir.ExternalTensor(file.name, offset, length, like.dtype, shape=like.shape, name=like.name, base_dir=folder)


def _write_at(path: Path, offset: int, array: np.ndarray) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))


def _place_tensor(value: ir.Value, files: dict[str, _DataFile], primary: _DataFile | None, folder: Path,
                  stats: SaveStats, io: _Writer) -> None:
    """Compute the value's tensor and queue its write: into its old slot, appended to the data file, or inline."""
    tensor = value.const_value
    old = value.meta.pop(REPLACES, None)
    if isinstance(old, ir.ExternalTensor) and old.nbytes == tensor.nbytes:
        file, offset = files[old.location], old.offset or 0
    elif primary is not None and tensor.nbytes >= _INLINE_LIMIT:
        file = primary
        offset = -(-file.size // _ALIGN) * _ALIGN
    else:
        if not isinstance(tensor, ir.Tensor):  # materialise a lazy tensor into an inline one
            value.const_value = ir.Tensor(tensor.numpy(), name=value.name)
        return
    array = tensor.numpy() if tensor.dtype.bitwidth >= 8 else np.frombuffer(tensor.tobytes(), np.uint8)  # int4: packed
    io.submit(_write_at, file.tmp, offset, array)
    file.size = max(file.size, offset + array.nbytes)
    stats.bytes_written += array.nbytes
    stats.tensors_written += 1
    value.const_value = _external(file, offset, array.nbytes, tensor, folder)
