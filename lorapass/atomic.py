"""Output files written all or nothing: never over an input, cleaned up on Ctrl-C, SIGTERM and SIGHUP.

A :class:`Transaction` names its outputs up front (a model first, then its data files). It refuses an output
that is an input (same resolved path or same inode: a symlink or hard link to it) or a directory, then hands
out temporaries beside the outputs, ``.<output name>.lorapass-<pid>-<token>.tmp``, and commits them together
under the lock file ``.<model name>.lorapass-lock``: an existing output is moved aside before its new version
takes its name and put back if a later rename fails, so one commit changes every output or none, and two
writers of one output commit one after the other (a model is never paired with another writer's data).

On any failure the temporaries, and the folders the transaction made, are removed. SIGTERM and SIGHUP, whose
default action would kill the process on the spot, raise :class:`Terminated` while a transaction is open (in
the main thread), so they clean up as Ctrl-C does; signals that arrive during the commit's renames wait until
it is done. A process killed outright (SIGKILL) leaves its temporaries under their recognisable names: the next
transaction for the same output removes those whose owner pid no longer runs. Before its first rename a commit
writes a journal, ``.<model name>.lorapass-<pid>-<token>.journal``, of the renames it will make; killed midway
(a new data file beside the old model), the next transaction for that model first finishes the commit if the
model was renamed, else puts every previous file back (:func:`recover`), and :func:`interrupted` lets readers
refuse the half-committed files meanwhile. Power loss is not covered: nothing is fsynced (on ext4 an fsync
may flush every dirty page of a multi-GB merge).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import signal
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from lorapass.errors import ModelError

TAG = ".lorapass-"
_TEMP = re.compile(r"^\.(?P<name>.+)\.lorapass-(?P<pid>\d+)-[0-9a-f]+\.(?:tmp|old)$")
_JOURNAL = re.compile(r"^\.(?P<name>.+)\.lorapass-(?P<pid>\d+)-[0-9a-f]+\.journal$")
_CAUGHT = ("SIGINT", "SIGTERM", "SIGHUP")


class Terminated(SystemExit):
    """SIGTERM or SIGHUP arrived while outputs were being written; the exit status is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


def check_distinct(outputs: Iterable[Path], inputs: Iterable[Path]) -> None:
    """ModelError if an output is one of the inputs (by resolved path or by inode) or an existing directory."""
    by_path: dict[Path, Path] = {}
    by_inode: dict[tuple[int, int], Path] = {}
    for path in inputs:
        by_path[Path(path).resolve()] = Path(path)
        if (ident := _identity(Path(path))) is not None:
            by_inode[ident] = Path(path)
    for out in outputs:
        if "\0" in str(out):
            raise ModelError(f"{str(out)!r}: a file name cannot hold a NUL byte")
        same = by_path.get(out.resolve()) or by_inode.get(_identity(out) or (-1, -1))
        if same is not None:
            raise ModelError(f"{out}: the output must not overwrite the input file {same}")
        if out.is_dir():
            raise ModelError(f"{out}: is a directory; give the path of the file to write")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(output: Path) -> list[Path]:
    """Remove temporaries of ``output`` (and of files named after it) whose writing process is dead."""
    removed = []
    try:
        entries = list(os.scandir(output.parent))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None or not (match["name"] == output.name or match["name"].startswith(output.name + ".")):
            continue
        if not _alive(int(match["pid"])):
            try:
                Path(entry.path).unlink(missing_ok=True)
            except OSError:  # not ours to remove after all (permissions): leave it
                continue
            removed.append(Path(entry.path))
    return removed


def interrupted(model: Path) -> list[Path]:
    """The journals of commits to ``model`` whose process died midway (its files may not belong together)."""
    try:
        entries = list(os.scandir(model.parent))
    except OSError:
        return []
    found = []
    for entry in entries:
        match = _JOURNAL.match(entry.name)
        if match is not None and match["name"] == model.name and not _alive(int(match["pid"])):
            found.append(Path(entry.path))
    return sorted(found)


def recover(model: Path) -> list[Path]:
    """Settle every commit to ``model`` that a killed process left midway; returns the outputs it restored.

    The journal lists the renames in order, the model last. If the model's temporary is gone, the model took
    its new name and the commit is complete: the moved-aside previous files are removed. Otherwise every output
    gets its previous file back (or none, if it had none) and the temporaries are removed.
    """
    restored: list[Path] = []
    if not interrupted(model):
        return restored
    with _locked(_lock(model)):  # the killed process's lock file goes too
        for journal in interrupted(model):
            restored += _settle(journal)
    return restored


def _lock(model: Path) -> Path:
    return model.with_name(f".{model.name}{TAG}lock")


def _settle(journal: Path) -> list[Path]:
    """Finish or undo the renames ``journal`` lists (see :func:`recover`)."""
    restored: list[Path] = []
    try:
        steps = json.loads(journal.read_text())["renames"]
        steps = [(Path(s["output"]), Path(s["temp"]), s["backup"] and Path(s["backup"])) for s in steps]
    except (OSError, ValueError, KeyError, TypeError):  # killed while writing it: nothing was renamed yet
        steps = []
    complete = bool(steps) and not os.path.lexists(steps[-1][1])
    for output, temp, backup in reversed(steps):
        if complete:
            if backup is not None:
                backup.unlink(missing_ok=True)
            continue
        renamed = not os.path.lexists(temp)
        if backup is not None and os.path.lexists(backup) and (renamed or not os.path.lexists(output)):
            os.replace(backup, output)
            restored.append(output)
        elif renamed and backup is None:
            output.unlink(missing_ok=True)
            restored.append(output)
        temp.unlink(missing_ok=True)
    journal.unlink(missing_ok=True)
    return restored


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path``, which is removed afterwards (waiters then retry on the new file)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held = os.fstat(fd)
        if _identity(path) == (held.st_dev, held.st_ino):
            break
        os.close(fd)  # the holder removed the file while we waited: lock the new one
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


class Transaction:
    """Temporaries for ``outputs`` (the first is committed last), committed together by :meth:`commit`."""

    def __init__(self, outputs: Sequence[str | os.PathLike], inputs: Iterable[str | os.PathLike] = ()) -> None:
        self.outputs = [Path(os.path.abspath(o)) for o in outputs]
        self.inputs = [Path(p) for p in inputs]
        self.lock = _lock(self.outputs[0])
        self.token = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.temps: dict[Path, Path] = {}
        self.made_dirs: list[Path] = []
        self.committed = False
        self._pending: int | None = None
        self._deferring = False
        self._previous: dict[int, object] = {}

    def _name(self, output: Path, kind: str) -> Path:
        return output.with_name(f".{output.name}{TAG}{self.token}.{kind}")

    def temp(self, output: str | os.PathLike) -> Path:
        """The temporary to write for ``output`` (one of the outputs)."""
        output = Path(os.path.abspath(output))
        if output not in self.outputs:
            raise ValueError(f"{output} is not an output of this transaction")
        self.temps[output] = self._name(output, "tmp")
        return self.temps[output]

    def __enter__(self) -> Transaction:
        names = [*self.outputs, self.lock, self._name(self.outputs[0], "journal"),
                 *(self._name(o, k) for o in self.outputs for k in ("tmp", "old"))]
        check_distinct(names, self.inputs)
        for folder in sorted({o.parent for o in self.outputs}):
            self._make_dirs(folder)
        recover(self.outputs[0])
        remove_stale(self.outputs[0])
        self._catch_signals()
        return self

    def _make_dirs(self, folder: Path) -> None:
        missing = [p for p in [folder, *folder.parents] if not p.exists()]
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ModelError(f"{folder}: cannot hold the output, a file is in the way") from None
        self.made_dirs += [p for p in missing if p not in self.made_dirs]

    def commit(self) -> None:
        """Rename every temporary onto its output (the first output last); all or nothing."""
        order = [o for o in [*self.outputs[1:], self.outputs[0]] if o in self.temps]
        self._deferring = True
        try:
            with _locked(self.lock):
                self._rename(order)
            self.committed = True
        finally:
            self._deferring = False
        if self._pending is not None:
            signum, self._pending = self._pending, None
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)

    def _rename(self, order: list[Path]) -> None:
        journal = self._name(self.outputs[0], "journal")  # for recover() if this process is killed midway
        backups = {o: self._name(o, "old") if os.path.lexists(o) else None for o in order}
        done: list[tuple[Path, Path | None]] = []
        try:
            journal.write_text(json.dumps({"renames": [
                {"output": str(o), "temp": str(self.temps[o]), "backup": backups[o] and str(backups[o])}
                for o in order]}))
            for output in order:
                backup = backups[output]
                if backup is not None:
                    os.replace(output, backup)
                done.append((output, backup))
                os.replace(self.temps[output], output)
        except BaseException:
            for output, backup in reversed(done):  # best effort: one failed step does not stop the others
                try:
                    if backup is None:
                        output.unlink(missing_ok=True)
                    else:
                        os.replace(backup, output)
                except OSError:
                    pass
            journal.unlink(missing_ok=True)
            raise
        for _, backup in done:
            if backup is not None:
                backup.unlink(missing_ok=True)
        journal.unlink(missing_ok=True)

    def __exit__(self, kind, error, trace) -> None:
        self._restore_signals()
        if error is None:
            return
        for temp in self.temps.values():
            temp.unlink(missing_ok=True)
        if not self.committed:
            for folder in sorted(self.made_dirs, key=lambda p: len(p.parts), reverse=True):  # deepest first
                try:
                    folder.rmdir()
                except OSError:
                    pass
        if isinstance(error, OSError) and error.filename is None:  # e.g. ENOSPC from a write: say where
            raise OSError(error.errno, error.strerror or str(error), str(self.outputs[0])) from error

    def _handler(self, signum: int, frame) -> None:
        if self._deferring:
            self._pending = signum
            return
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)

    def _catch_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in _CAUGHT:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            current = signal.getsignal(signum)
            if current in (signal.SIG_DFL, signal.default_int_handler):  # respect handlers the application set
                self._previous[signum] = signal.signal(signum, self._handler)

    def _restore_signals(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
