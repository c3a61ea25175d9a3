"""Files are never destroyed or left behind: outputs never name an input, commits are all or nothing, OS
failures (EXDEV, ENOSPC, EACCES) are handled, SIGTERM/SIGHUP clean up, stale temporaries are removed, and
concurrent writers never mix their files."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from reliability_case import cli, fails, hashes, leftovers, ort_output, peft_output, tiny, tiny_template  # noqa: F401
from lorapass import atomic
from lorapass.cli import main

REPO = Path(__file__).resolve().parents[1]

# A real lorapass process whose merge pauses (after the data temporary exists) until a signal arrives, and whose
# commit can be held at a barrier, slowed down or killed after a given rename, to place signals and races exactly.
DRIVER = r"""
import os, sys, time
import lorapass.atomic as atomic
import lorapass.onnx.save as save

place = save._place_tensor
def paused_place(*args):
    if os.environ.get("PAUSE_FOLD"):
        print("FOLDING", flush=True)
        time.sleep(60)
    return place(*args)
save._place_tensor = paused_place  # the writer about to fold the merged tensors, on the main thread

replace, commit = os.replace, atomic.Transaction.commit
def slow_replace(src, dst):
    replace(src, dst)
    if os.path.basename(dst) == os.environ.get("KILL_AFTER"):  # SIGKILL right after this rename
        os.kill(os.getpid(), 9)
    time.sleep(float(os.environ.get("RENAME_PAUSE", "0")))
def barrier_commit(self):
    barrier = os.environ.get("BARRIER")
    if barrier:
        open(os.path.join(barrier, str(os.getpid())), "w").close()
        while len(os.listdir(barrier)) < 2:
            time.sleep(0.01)
    os.replace = slow_replace
    return commit(self)
atomic.Transaction.commit = barrier_commit

from lorapass.cli import main
sys.exit(main(sys.argv[1:]))
"""


def driver(args: list, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env})


def merge_args(case, out: Path, adapter: Path | None = None) -> list:
    return ["rewrite", case.model, "--adapter", adapter or case.a, "-o", out]


# ------------------------------------------------------------------ the output never names an input

def _hard_link(case):
    os.link(case.model.with_name("model.onnx.data"), case.out / "linked.data")
    return case.out / "linked.data"


def _symlink(case):
    (case.out / "sym.onnx").symlink_to(case.model)
    return case.out / "sym.onnx"


def _data_of_other_name(case):
    """Input x.onnx whose data file is y.onnx.data: -o y.onnx would write its data over the input's."""
    import onnx

    proto = onnx.load(case.model, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "y.onnx.data"
    case.model.with_name("model.onnx.data").rename(case.model.with_name("y.onnx.data"))
    onnx.save(proto, case.model)
    return case.model.with_name("y.onnx")


@pytest.mark.parametrize("target", [
    lambda c: c.model, lambda c: c.model.with_name("model.onnx.data"), lambda c: c.a / "adapter_model.safetensors",
    lambda c: c.a / "adapter_config.json", lambda c: c.root / "rules.yaml", _symlink, _hard_link, _data_of_other_name],
    ids=["model", "model-data", "adapter-weights", "adapter-config", "rules", "symlink-to-model",
         "hard-link-to-data", "data-name-of-output"])
def test_output_never_overwrites_an_input(tiny, capsys, target):
    (tiny.root / "rules.yaml").write_text("target_modules: [k, q]\nr: 4\nlora_alpha: 8\n")
    out = target(tiny)
    err = fails(capsys, tiny, [*merge_args(tiny, out), "--rules", tiny.root / "rules.yaml"], 2, "must not overwrite")
    assert str(out.parent) in err


@pytest.mark.parametrize("directory", ["o.onnx", "o.onnx.data"])
def test_output_or_its_data_file_is_a_directory(tiny, capsys, directory):
    (tiny.out / directory).mkdir()
    (tiny.out / directory / "keep").write_text("mine")
    fails(capsys, tiny, merge_args(tiny, tiny.out / "o.onnx"), 2, "is a directory", directory)


def test_a_file_in_the_way_of_the_output_folder(tiny, capsys):
    fails(capsys, tiny, merge_args(tiny, tiny.model.with_name("model.onnx.data") / "o.onnx"), 2, "a file is in the way")


# ------------------------------------------------------------------ all or nothing

def _fail_model_rename(monkeypatch, model_name: str):
    replace = os.replace

    def failing(src, dst):
        if Path(dst).name == model_name and Path(src).suffix == ".tmp":
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)


def test_failed_second_rename_commits_nothing(tiny, capsys, monkeypatch):
    _fail_model_rename(monkeypatch, "o.onnx")
    fails(capsys, tiny, merge_args(tiny, tiny.out / "o.onnx"), 1, "Permission denied", "o.onnx")
    assert list(tiny.out.iterdir()) == []


def test_failed_second_rename_restores_the_previous_output(tiny, capsys, monkeypatch):
    assert cli(capsys, merge_args(tiny, tiny.out / "o.onnx", tiny.b))[0] == 0
    before = hashes(tiny.out.iterdir())
    _fail_model_rename(monkeypatch, "o.onnx")
    assert cli(capsys, merge_args(tiny, tiny.out / "o.onnx"))[0] == 1
    assert hashes(tiny.out.iterdir()) == before and len(before) == 2
    assert leftovers(tiny.root) == []


def test_failure_removes_the_folders_it_made(tiny, capsys, monkeypatch):
    from lorapass.onnx import save

    def broken(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(save, "_write_at", broken)
    fails(capsys, tiny, merge_args(tiny, tiny.out / "new" / "deeper" / "o.onnx"), 1, "Input/output error", "o.onnx")


# ------------------------------------------------------------------ OS failures

def test_exdev_falls_back_to_a_plain_copy(tiny, capsys, monkeypatch):
    assert cli(capsys, merge_args(tiny, tiny.out / "kernel.onnx"))[0] == 0
    calls = []

    def exdev(*args):
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", exdev)
    assert cli(capsys, merge_args(tiny, tiny.out / "plain.onnx"))[0] == 0
    assert calls  # the kernel copy was tried and refused
    assert (tiny.out / "plain.onnx.data").read_bytes() == (tiny.out / "kernel.onnx.data").read_bytes()


def test_output_on_another_filesystem(tiny, capsys):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tiny.root).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test folder")
    out = shm / f"lorapass-test-{os.getpid()}" / "o.onnx"
    try:
        assert cli(capsys, merge_args(tiny, out))[0] == 0
        x = torch.randn(3, 16)
        np.testing.assert_allclose(ort_output(out, x), peft_output(tiny, tiny.a, x), rtol=1e-5, atol=1e-5)
    finally:
        for p in sorted(out.parent.glob("*")) + [out.parent]:
            p.rmdir() if p.is_dir() else p.unlink()


def test_disk_full(tiny, capsys, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full)
    monkeypatch.setattr(os, "pwrite", full)  # the plain-copy fallback fails the same way
    fails(capsys, tiny, merge_args(tiny, tiny.out / "o.onnx"), 1, "No space left on device", tiny.out / "o.onnx")


def test_permission_denied_creating_the_output_folder(tiny, capsys, monkeypatch):
    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    fails(capsys, tiny, merge_args(tiny, tiny.out / "sub" / "o.onnx"), 1, "Permission denied", "sub")


# ------------------------------------------------------------------ signals and stale temporaries

def _paused(case, out: Path) -> subprocess.Popen:
    proc = driver(merge_args(case, out), PAUSE_FOLD="1")
    assert proc.stdout.readline().strip() == "FOLDING", proc.communicate()[1]
    for _ in range(500):  # the I/O thread creates the data temporary
        if leftovers(out.parent):
            return proc
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("no temporary appeared while the merge ran")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_remove_temporaries(tiny, signum):
    before = hashes(tiny.inputs)
    proc = _paused(tiny, tiny.out / "o.onnx")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert f"stopped by {signum.name}" in err and "Traceback" not in err
    assert list(tiny.out.iterdir()) == []
    assert hashes(tiny.inputs) == before


def test_leftovers_of_a_killed_process_are_removed_by_the_next_run(tiny, capsys):
    proc = _paused(tiny, tiny.out / "o.onnx")
    proc.kill()
    proc.communicate(timeout=60)
    stale = leftovers(tiny.out)
    assert stale and all(re.fullmatch(rf"\.o\.onnx\.data\.lorapass-{proc.pid}-[0-9a-f]+\.tmp", p.name) for p in stale)
    alive = tiny.out / f".o.onnx.data.lorapass-{os.getpid()}-0123abcd.tmp"  # a live writer's: kept
    other = tiny.out / f".p.onnx.data.lorapass-{proc.pid}-0123abcd.tmp"  # another output's: not ours to judge
    alive.write_text("")
    other.write_text("")
    assert cli(capsys, merge_args(tiny, tiny.out / "o.onnx"))[0] == 0
    assert sorted(p.name for p in tiny.out.iterdir()) == sorted(["o.onnx", "o.onnx.data", alive.name, other.name])


def _killed_after(case, rename: str) -> subprocess.Popen:
    """A merge of adapter A to o.onnx SIGKILLed right after its commit renamed ``rename`` into place."""
    proc = driver(merge_args(case, case.out / "o.onnx"), KILL_AFTER=rename)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    return proc


def _merged(case, adapter) -> dict[str, bytes]:
    out = case.root / f"solo_{adapter.name}"
    out.mkdir(exist_ok=True)
    if not (out / "o.onnx").exists():
        assert main([str(a) for a in merge_args(case, out / "o.onnx", adapter)]) == 0
    return {p.name: p.read_bytes() for p in out.iterdir()}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("previous", [True, False], ids=["over-a-previous-output", "new-output"])
def test_a_commit_killed_between_its_renames_is_refused_then_rolled_back(tiny, capsys, previous):
    """Killed after the data file's rename, before the model's: the new data sits beside the old model (or no
    model). Readers refuse it by name; the next write to it first puts every previous file back."""
    new, old = _merged(tiny, tiny.a), _merged(tiny, tiny.b)
    assert new["o.onnx.data"] != old["o.onnx.data"]
    if previous:
        assert cli(capsys, merge_args(tiny, tiny.out / "o.onnx", tiny.b))[0] == 0
    proc = _killed_after(tiny, "o.onnx.data")
    journal = f".o.onnx.lorapass-{proc.pid}-"
    assert any(p.name.startswith(journal) and p.name.endswith(".journal") for p in leftovers(tiny.out))
    if previous:
        assert (tiny.out / "o.onnx").read_bytes() == old["o.onnx"]  # the half-committed pair
        assert (tiny.out / "o.onnx.data").read_bytes() == new["o.onnx.data"]
        status, err = cli(capsys, ["inspect", tiny.out / "o.onnx"])
        assert status == 2 and "killed midway" in err and journal in err and "Traceback" not in err, err
    assert atomic.recover(tiny.out / "o.onnx") == ([tiny.out / "o.onnx.data"])
    atomic.remove_stale(tiny.out / "o.onnx")
    assert _files(tiny.out) == (old if previous else {})
    assert leftovers(tiny.root) == []
    _killed_after(tiny, "o.onnx.data")  # again, then a plain rewrite recovers and commits
    assert cli(capsys, merge_args(tiny, tiny.out / "o.onnx"))[0] == 0
    assert _files(tiny.out) == new and leftovers(tiny.root) == []


def test_a_commit_killed_after_its_model_rename_is_completed(tiny, capsys):
    """Killed after the last rename, before the previous files were removed: the new pair is whole; recovery
    removes the moved-aside files and the journal."""
    new = _merged(tiny, tiny.a)
    assert cli(capsys, merge_args(tiny, tiny.out / "o.onnx", tiny.b))[0] == 0
    _killed_after(tiny, "o.onnx")
    assert {p.name.rsplit(".", 1)[1] for p in leftovers(tiny.out)} == {"old", "journal", "lorapass-lock"}
    assert atomic.recover(tiny.out / "o.onnx") == []
    assert _files(tiny.out) == new and leftovers(tiny.root) == []
    x = torch.randn(2, 16)
    np.testing.assert_allclose(ort_output(tiny.out / "o.onnx", x), peft_output(tiny, tiny.a, x), rtol=1e-5, atol=1e-5)


def test_concurrent_writers_never_pair_a_model_with_the_other_writers_data(tiny, capsys, tmp_path):
    """Both writers reach the commit together; A's renames are slow, so without the lock B's model and data
    would land between A's data and A's model."""
    solo = {}
    for name, adapter in (("a", tiny.a), ("b", tiny.b)):
        assert cli(capsys, merge_args(tiny, tmp_path / name / "o.onnx", adapter))[0] == 0
        solo[name] = ((tmp_path / name / "o.onnx").read_bytes(), (tmp_path / name / "o.onnx.data").read_bytes())
    assert solo["a"][1] != solo["b"][1]
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    out = tiny.out / "o.onnx"
    procs = [driver(merge_args(tiny, out, tiny.a), BARRIER=str(barrier), RENAME_PAUSE="0.4"),
             driver(merge_args(tiny, out, tiny.b), BARRIER=str(barrier), RENAME_PAUSE="0.05")]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert (out.read_bytes(), out.with_name("o.onnx.data").read_bytes()) in solo.values()
    assert sorted(p.name for p in tiny.out.iterdir()) == ["o.onnx", "o.onnx.data"]


def test_signals_during_the_commit_wait_for_it(tiny, capsys, monkeypatch):
    """A SIGTERM between the data and the model rename is handled after both: the output is whole."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("the test runner handles SIGTERM itself")
    replace = os.replace

    def replace_then_signal(src, dst):
        replace(src, dst)
        if Path(dst).name == "o.onnx.data":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # let the handler run now if it were not deferred

    monkeypatch.setattr(os, "replace", replace_then_signal)
    assert cli(capsys, merge_args(tiny, tiny.out / "o.onnx"))[0] == 128 + signal.SIGTERM
    monkeypatch.setattr(os, "replace", replace)
    assert sorted(p.name for p in tiny.out.iterdir()) == ["o.onnx", "o.onnx.data"]
    x = torch.randn(2, 16)
    np.testing.assert_allclose(ort_output(tiny.out / "o.onnx", x), peft_output(tiny, tiny.a, x), rtol=1e-5, atol=1e-5)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_export_adapter_output_paths(tiny, capsys):
    dynamic = tiny.out / "dyn.onnx"
    assert cli(capsys, ["rewrite", tiny.model, "--strategy", "dynamic", "--target", "k", "q", "-o", dynamic])[0] == 0
    fails(capsys, tiny, ["export-adapter", tiny.a, "--model", dynamic, "-o", dynamic], 2, "must not overwrite")
    fails(capsys, tiny, ["export-adapter", tiny.a, "--model", dynamic, "-o", tiny.a / "adapter_model.safetensors"], 2,
          "must not overwrite")
    assert cli(capsys, ["export-adapter", tiny.a, "--model", dynamic, "-o", tiny.out / "new" / "a.onnx_adapter"])[0] == 0
    assert (tiny.out / "new" / "a.onnx_adapter").stat().st_size > 0 and leftovers(tiny.out) == []


def test_transaction_refuses_a_file_not_declared():
    with pytest.raises(ValueError, match="not an output"):
        atomic.Transaction([Path("/tmp/x.onnx")]).temp("/tmp/y.onnx")
