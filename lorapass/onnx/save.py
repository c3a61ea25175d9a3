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
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue

import numpy as np
import onnx_ir as ir

from lorapass import progress as progress_bar
from lorapass.atomic import Transaction
from lorapass.errors import ModelError
from lorapass.onnx.fold import FoldedTensor, blocks, fold_into, location

REPLACES = "lorapass.replaces"
"""``Value.meta`` key: the ExternalTensor a rewritten tensor replaces (its slot may be reused)."""

_INLINE_LIMIT = 1024
_CHUNK = 8 << 20  # bytes per hand-over from a fold thread to the writer: few wake-ups, even on a busy machine
_PIECE = 256 << 10  # bytes per pwrite (see _write_at)
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
    """An I/O thread that runs the jobs ``submit`` queues (the copies) and every write in order, and fold threads
    (one per core but the writer's) that compute meanwhile.

    A folded tensor is split into chunks of whole blocks (see :func:`blocks`): a fold thread folds a chunk into a
    free buffer, then the I/O thread ``pwrite``s the buffer at the chunk's offset and frees it. Writes to one
    file serialise in the kernel anyway (the inode lock), and they cost as much CPU as the fold, so the writer
    keeps a core of its own and the order (a copy truncates its file when it opens it). Memory is bounded:
    ``2 * workers + 2`` chunk buffers, a block per fold thread, and at most ``depth`` queued writes (a plain
    tensor's holds its array).
    """

    def __init__(self, depth: int = 8, workers: int | None = None) -> None:
        workers = workers or max(1, _cores() - 1)
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorapass-io")
        self.compute = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lorapass-fold")
        self.queue: deque[Future] = deque()
        self.depth = depth
        self.free: SimpleQueue[list[np.ndarray]] = SimpleQueue()  # one-element lists: a buffer may be replaced
        for _ in range(2 * workers + 2):
            self.free.put([np.empty(0, np.uint8)])
        self.fds: dict[Path, int] = {}
        self.staging = threading.local()  # each fold thread's buffer for one block of W read from its file

    def submit(self, fn, *args) -> None:
        self._push(self.io.submit(fn, *args))

    def write(self, path: Path, offset: int, array: np.ndarray) -> None:
        """Queue writing ``array``'s bytes at ``offset`` of ``path``."""
        self._push(self.io.submit(self._write, path, offset, np.ascontiguousarray(array).reshape(-1).view(np.uint8)))

    def fold(self, path: Path, offset: int, w: np.ndarray, left: np.ndarray, right: np.ndarray) -> None:
        """Queue writing W + left @ right (see :func:`fold_into`) at ``offset`` of ``path``, chunk by chunk."""
        row = w.shape[1] * w.dtype.itemsize
        left, right = np.ascontiguousarray(left, np.float32), np.ascontiguousarray(right, np.float32)
        source = location(w)
        for chunk in _chunks(blocks(*w.shape), row):
            buffer = self.free.get()  # waits while every buffer holds a chunk not yet written
            job = self.compute.submit(_fold_chunk, buffer, w, left, right, chunk, source, self.staging)
            self._push(self.io.submit(self._write_chunk, path, offset + chunk[0].start * row, buffer, job))

    def drain(self) -> None:
        while self.queue:
            self.queue.popleft().result()

    def _push(self, job: Future) -> None:
        self.queue.append(job)
        while len(self.queue) > self.depth:
            self.queue.popleft().result()

    def _write(self, path: Path, offset: int, data) -> None:
        if path not in self.fds:  # opened on the I/O thread after the copies, which may (re)create the file
            self.fds[path] = os.open(path, os.O_WRONLY)
        _write_at(self.fds[path], offset, memoryview(data))

    def _write_chunk(self, path: Path, offset: int, buffer: list[np.ndarray], job: Future) -> None:
        try:
            nbytes = job.result()  # first: the fold may have replaced a buffer too small for its chunk
            self._write(path, offset, buffer[0][:nbytes])
        finally:
            self.free.put(buffer)

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, kind, error, trace) -> None:
        for pool in (self.io, self.compute):
            pool.shutdown(wait=True, cancel_futures=error is not None)  # never leave a write running
        for fd in self.fds.values():
            os.close(fd)


def _chunks(spans: Iterable[slice], row: int) -> Iterator[list[slice]]:
    """Consecutive row blocks grouped into chunks of about ``_CHUNK`` bytes: one hand-over and one write each."""
    chunk: list[slice] = []
    for span in spans:
        if chunk and (span.stop - chunk[0].start) * row > _CHUNK:
            yield chunk
            chunk = []
        chunk.append(span)
    if chunk:
        yield chunk


def _fold_chunk(buffer: list[np.ndarray], w: np.ndarray, left: np.ndarray, right: np.ndarray, spans: list[slice],
                source: tuple[str, int] | None, staging: threading.local) -> int:
    """Fold the chunk's blocks into ``buffer[0]`` (grown if too small); returns the chunk's bytes.

    W mapped from a file (``source``: file and offset) is read block by block into ``staging``, a buffer that
    stays in cache, rather than faulted in through its map."""
    start, stop = spans[0].start, spans[-1].stop
    row = w.shape[1] * w.dtype.itemsize
    nbytes = (stop - start) * row
    if buffer[0].nbytes < nbytes:
        buffer[0] = np.empty(nbytes, np.uint8)
    out = buffer[0][:nbytes].view(w.dtype).reshape(stop - start, w.shape[1])
    fd = os.open(source[0], os.O_RDONLY) if source else None
    try:
        for rows in spans:
            block = w[rows]
            if fd is not None:
                block = _read_rows(fd, source[0], source[1] + rows.start * row, block, staging)
            fold_into(out[rows.start - start:rows.stop - start], block, left[rows], right)
    finally:
        if fd is not None:
            os.close(fd)
    return nbytes


def _read_rows(fd: int, path: str, offset: int, like: np.ndarray, staging: threading.local) -> np.ndarray:
    """``like``'s bytes read from ``fd`` (``path``) at ``offset`` into this thread's staging buffer."""
    if getattr(staging, "buffer", None) is None or staging.buffer.nbytes < like.nbytes:
        staging.buffer = np.empty(like.nbytes, np.uint8)
    data = staging.buffer[:like.nbytes]
    done = 0
    while done < like.nbytes:
        n = os.preadv(fd, [data[done:]], offset + done)
        if n == 0:
            raise ModelError(f"{path}: shorter than its tensors say")
        done += n
    return data.view(like.dtype).reshape(like.shape)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
        bar = progress_bar.bar(total=len(computed), desc="writing tensors", unit="tensor", shown=progress)
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
    _write_at(fout, offset, memoryview(data))
    return len(data)


def _external(file: _DataFile, offset: int, length: int, like: ir.TensorProtocol, folder: Path) -> ir.ExternalTensor:
    return ir.ExternalTensor(file.name, offset, length, like.dtype, shape=like.shape, name=like.name, base_dir=folder)


def _write_at(fd: int, offset: int, data: memoryview) -> None:
    """``pwrite`` all of ``data`` at ``offset``, in pieces of ``_PIECE`` bytes (the kernel copies from the buffer).

    A larger write makes the page cache allocate large folios; on a VM whose free memory goes back to the host
    (virtio-balloon free page reporting) those cost 2-8x the kernel time of 256 KB writes (measured: 2 GB in
    0.4-0.5 s of system time with 64-256 KB writes, 0.7-2.4 s with 1 MB, 1.4-3.4 s with 8 MB).
    """
    while data:
        done = os.pwrite(fd, data[:_PIECE], offset)
        data, offset = data[done:], offset + done


def _place_tensor(value: ir.Value, files: dict[str, _DataFile], primary: _DataFile | None, folder: Path,
                  stats: SaveStats, io: _Writer) -> None:
    """Queue the value's tensor to be computed and written: into its old slot, appended to the data file, or inline."""
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
    if isinstance(tensor, FoldedTensor):
        io.fold(file.tmp, offset, *tensor.operands())
        nbytes = tensor.nbytes
    else:
        array = tensor.numpy() if tensor.dtype.bitwidth >= 8 else np.frombuffer(tensor.tobytes(), np.uint8)  # int4: packed
        io.write(file.tmp, offset, array)
        nbytes = array.nbytes
    file.size = max(file.size, offset + nbytes)
    stats.bytes_written += nbytes
    stats.tensors_written += 1
    value.const_value = _external(file, offset, nbytes, tensor, folder)
