"""Faults around the run folder: a full disk inside torch.save, a second writer, a stale
temporary file, the permissions of what netslim writes, the one source of --threads.

(The bad-input cases, one line and exit 2 each, are test_reliability.test_bad_input;
docs/errors.md lists them all.)
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from netslim import cli

from test_reliability import ENV, MODEL, netslim, run_main, snapshot, temps


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory) -> Path:
    """A finished 1-epoch run and a pruned model of it: base/run, base/pruned."""
    base = tmp_path_factory.mktemp("finished")
    assert cli.main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), *MODEL,
                     "--train-subset", "64", "--epochs", "1", "--seed", "0", "--device", "cpu",
                     "--save", str(base / "run")]) == 0
    assert cli.main(["prune", "--checkpoint", str(base / "run/model_best.pt"), "--percent", "0.5",
                     "--save", str(base / "pruned"), "--no-eval"]) == 0
    return base


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- a full disk inside torch.save


class _FullDisk:
    """A file object whose writes fail with ENOSPC after `room` bytes, as a full disk's do."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data) -> int:
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("target", ["checkpoint.pt", "pruned.pt"])
def test_disk_full_inside_torch_save_is_one_line_and_keeps_the_previous_file(finished, tmp_path, capsys,
                                                                             monkeypatch, target):
    """The real torch.save writes into a file that fills up: torch wraps the OSError in a
    RuntimeError ("unexpected pos"), which must still be one error line, exit 2."""
    run = copy_tree(finished / "run", tmp_path / "run")
    pruned = copy_tree(finished / "pruned", tmp_path / "pruned")
    folder = run if target == "checkpoint.pt" else pruned
    before = snapshot(folder / target)
    real_fdopen = os.fdopen

    def fdopen(fd, *a, **k):
        f = real_fdopen(fd, *a, **k)
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{target}."):
            return _FullDisk(f, room=1000)
        return f
    monkeypatch.setattr(os, "fdopen", fdopen)
    if target == "checkpoint.pt":
        argv = ["train", "--resume", str(run / "checkpoint.pt"), "--epochs", "2"]
    else:
        argv = ["prune", "--checkpoint", str(run / "model_best.pt"), "--percent", "0.3", "--save", str(pruned),
                "--force", "--no-eval"]
    assert run_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in ln for ln in err), err
    assert err[-1].startswith(f"netslim: error: could not write {folder / target}: No space left on device")
    assert "unchanged" in err[-1] and sum(ln.startswith("netslim: error:") for ln in err) == 1
    assert snapshot(folder / target) == before and temps(folder) == []


# --------------------------------------------------------------------------- one writer per folder


def test_a_second_writer_is_refused_at_once_and_a_killed_run_leaves_no_lock(data_dir, tmp_path, capsys):
    """A real `netslim train` holds its folder: a second train (--force), a --resume of it, a
    prune and a pipeline into it are refused with one line before loading any data (their
    --data-dir is empty: loading would fail differently), and its temporary files are left
    alone. After kill -9 the folder is free again: --resume continues the run."""
    save = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "netslim", "train", "--dataset", "fashion-mnist", "--data-dir",
                             str(data_dir), *MODEL, "--train-subset", "64", "--epochs", "1000", "--seed", "0",
                             "--device", "cpu", "--save", str(save)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.monotonic() + 90
        while not (save / "checkpoint.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        live_temp = save / ".metrics.jsonl.netslim-live.tmp"  # as if the run were mid-write
        live_temp.write_bytes(b"half")
        empty = tmp_path / "no-data"
        empty.mkdir()
        second = {
            "train --force": ["train", "--dataset", "fashion-mnist", "--data-dir", str(empty), *MODEL,
                              "--epochs", "1", "--device", "cpu", "--save", str(save), "--force"],
            "train --resume": ["train", "--resume", str(save / "checkpoint.pt"), "--data-dir", str(empty)],
            "prune": ["prune", "--checkpoint", str(save / "checkpoint.pt"), "--percent", "0.5", "--save",
                      str(save), "--force", "--no-eval"],
            "pipeline": ["pipeline", "--save", str(save), "--data-dir", str(empty), *MODEL, "--epochs", "1",
                         "--device", "cpu", "--force"],
        }
        for what, argv in second.items():
            t0 = time.monotonic()
            assert run_main(argv) == 2, what
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "is in use by another netslim process" in err[0], (what, err)
            assert time.monotonic() - t0 < 10, what
        assert proc.poll() is None, "the first run stopped"
        assert live_temp.exists(), "a live writer's temporary file was removed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    epoch = torch.load(save / "checkpoint.pt", weights_only=True)["train_state"]["epoch"]
    assert run_main(["train", "--resume", str(save / "checkpoint.pt"), "--epochs", str(epoch + 1)]) == 0
    assert not live_temp.exists()  # the next writer in the folder removed the dead write's temporary


def test_folder_lock_is_reentrant_in_one_process_and_exclusive_across_processes(tmp_path):
    from netslim.fileio import FolderLock
    with FolderLock(tmp_path) as outer:
        assert outer.held
        with FolderLock(tmp_path) as inner:  # the CLI holds it, then fit takes it again
            assert inner.held
        probe = ("from netslim.fileio import FolderLock; import sys\n"
                 "try:\n    FolderLock(sys.argv[1]).acquire()\nexcept Exception as e:\n    print(e)\n")
        out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True,
                             env=ENV, timeout=60).stdout
        assert "in use by another netslim process" in out
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True,
                         env=ENV, timeout=60).stdout
    assert out == ""  # released


# --------------------------------------------------------------------------- stale temporaries

KILL_WHILE_WRITING = r'''
import os, runpy, signal, sys
from pathlib import Path
import netslim.fileio as F
real = F._atomic_write
def torn(path, write):
    if Path(path).name == os.environ["KILL_WRITING"]:
        def half(f):
            f.write(b"half a file")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, half)
    return real(path, write)
F._atomic_write = torn
sys.argv = ["netslim", *sys.argv[1:]]
runpy.run_module("netslim", run_name="__main__", alter_sys=True)
'''


def test_kill_during_prune_write_leaves_a_temporary_the_next_prune_removes(finished, tmp_path):
    script = tmp_path / "kill.py"
    script.write_text(KILL_WHILE_WRITING)
    out = copy_tree(finished / "pruned", tmp_path / "pruned")
    before = snapshot(out / "pruned.pt")
    argv = ["prune", "--checkpoint", str(finished / "run/model_best.pt"), "--percent", "0.3", "--save", str(out),
            "--force", "--no-eval"]
    res = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True,
                         env={**ENV, "KILL_WRITING": "pruned.pt"}, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert snapshot(out / "pruned.pt") == before  # the rename never happened
    assert [t.split(".netslim-")[0] for t in temps(out)] == [".pruned.pt"]
    assert run_main(argv) == 0
    assert temps(out) == []
    assert torch.load(out / "pruned.pt", weights_only=True)["metrics"]["prune"]["percent"] == 0.3


# --------------------------------------------------------------------------- file permissions


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_get_the_umask_permissions(finished, tmp_path, umask, mode):
    """Checkpoints, reports and exports: what open(path, "w") would give, not mkstemp's 0600."""
    old = os.umask(umask)
    try:
        assert cli.main(["prune", "--checkpoint", str(finished / "run/model_best.pt"), "--percent", "0.5",
                         "--save", str(tmp_path / "p"), "--no-eval"]) == 0
        assert cli.main(["export", "--checkpoint", str(tmp_path / "p/pruned.pt"),
                         "--torchscript", str(tmp_path / "m.ts")]) == 0
        assert cli.main(["train", "--resume", str(copy_tree(finished / "run", tmp_path / "run")),
                         "--epochs", "2"]) == 0
    finally:
        os.umask(old)
    files = [tmp_path / "p/pruned.pt", tmp_path / "p/prune.json", tmp_path / "m.ts",
             tmp_path / "run/checkpoint.pt", tmp_path / "run/metrics.jsonl"]
    assert {str(f): oct(f.stat().st_mode & 0o777) for f in files} == {str(f): oct(mode) for f in files}


# --------------------------------------------------------------------------- one source of --threads


@pytest.mark.parametrize("where", ["global", "subcommand"])
def test_profile_measures_with_the_threads_asked_for(finished, capsys, where):
    """`netslim --threads 1 profile` used to measure with all of torch's threads: the
    subcommand's own default overwrote the global flag."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # what torch would use on its own here
    try:
        tail = ["--checkpoint", str(finished / "pruned/pruned.pt"), "--batch-sizes", "1", "--json"]
        argv = ["--threads", "1", "profile", *tail] if where == "global" else ["profile", "--threads", "1", *tail]
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(before)
    assert json.loads(capsys.readouterr().out)["threads"] == 1


def test_every_written_tmp_name_is_netslims(finished):
    """remove_stale_temps removes only .NAME.netslim-*.tmp: never a user's .tmp file."""
    from netslim.fileio import remove_stale_temps
    folder = finished / "pruned"
    mine = folder / ".notes.tmp"
    mine.write_text("the user's")
    try:
        assert remove_stale_temps(folder) == [] and mine.exists()
    finally:
        mine.unlink()


def test_netslim_subprocess_refuses_a_fifo_quickly(tmp_path):
    """The same through `python -m netslim` for --refine (any checkpoint input goes through one check)."""
    os.mkfifo(tmp_path / "pipe.pt")
    res = netslim("train", "--refine", str(tmp_path / "pipe.pt"), "--save", str(tmp_path / "out"), timeout=60)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "is a FIFO (named pipe), not a regular file" in res.stderr
