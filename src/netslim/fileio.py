"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Everything netslim writes (checkpoints, reports, metrics snapshots, downloads) goes
through here: write to a temporary file in the destination folder, flush, fsync, rename
over the target, fsync the folder. A crash or a full disk leaves the previous file intact.
The file gets the permissions an ordinary `open(path, "w")` would give it (0666 less the
umask), not the 0600 of the temporary file it starts as.
"""
from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .errors import FolderBusyError, NetslimError

log = logging.getLogger(__name__)

# Temporary files are named .<target name>.netslim-<random>.tmp: distinctive enough that
# remove_stale_temps never touches a file netslim did not create.
TEMP_INFIX = ".netslim-"
TEMP_SUFFIX = ".tmp"


def _os_error_in(e: BaseException) -> Optional[OSError]:
    """The OSError behind `e`: torch.save reports a failed write (ENOSPC, EIO) as a
    RuntimeError ("unexpected pos ...") whose __context__ is the OSError."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _umask() -> int:
    """The process umask (reading it means setting it; set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error(path: Path, e: OSError) -> NetslimError:
    """The one-line error for a write that failed with `e` (a full disk, a read-only folder)."""
    return NetslimError(f"could not write {path}: {e.strerror or e} (disk full or not writable?); "
                        "the previous file, if any, is unchanged")


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_INFIX}", suffix=TEMP_SUFFIX, dir=folder)
    except OSError as e:
        raise NetslimError(f"cannot write in {folder}: {e.strerror or e}; choose a writable --save folder") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600: give what open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        os_error = _os_error_in(e) if isinstance(e, Exception) else None
        if os_error is not None:
            raise write_error(path, os_error) from None
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` atomically."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_writable_folder(folder: str | os.PathLike, flag: str = "--save") -> None:
    """NetslimError (one line) unless `folder` is, or can be created as, a writable folder.

    Creates nothing: a cheap check before slow work (a data load, a training run)."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:  # the nearest part of the path that exists
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise NetslimError(f"cannot write in {folder}: {probe} is a file, not a folder; choose another {flag}")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise NetslimError(f"cannot write in {folder}: {probe} is not writable; choose another {flag}")


def remove_files(*paths: str | os.PathLike) -> None:
    """Delete files that may not exist; NetslimError (one line) when one cannot be deleted."""
    for p in paths:
        try:
            Path(p).unlink(missing_ok=True)
        except OSError as e:
            raise NetslimError(f"cannot write in {Path(p).parent}: {e.strerror or e}; "
                               "choose a writable --save folder") from None


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (.NAME.netslim-*.tmp) that atomic writes killed before their
    rename (kill -9, power loss) left in `folder`; returns what was removed. The files NAME
    themselves are untouched: an interrupted write never replaced them.

    Only safe while no other process writes in `folder`: FolderLock calls it once it holds
    the folder's lock."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.glob(f".*{TEMP_INFIX}*{TEMP_SUFFIX}"):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


# What netslim writes into a folder as results: a folder holding any of them holds a run,
# which a new command must not overwrite without --force (train, prune and pipeline ask).
RESULT_NAMES = ("checkpoint.pt", "model_best.pt", "metrics.jsonl", "pruned.pt", "prune.json",
                "pipeline.json", "results.json", "results.md", "done.json")


def results_in(folder: str | os.PathLike) -> list[str]:
    """The names of RESULT_NAMES present in `folder` (none when it does not exist)."""
    folder = Path(folder)
    return [n for n in RESULT_NAMES if (folder / n).exists()]


def check_regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` if it is a regular file (or a link to one); NetslimError (one line) otherwise.

    Reading a FIFO blocks until something writes to it, a device can be endless: refuse
    anything but a plain file before opening it."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise NetslimError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise NetslimError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise NetslimError(f"{what} {path} is a folder; give the file inside it")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise NetslimError(f"{what} {path} is {kind}, not a regular file: give a file")
    return path


# Run-folder locks. One netslim process writes in a folder at a time: a second train, prune,
# --resume or pipeline on the same folder is refused at once instead of mixing its files
# with the first's. The lock is flock(2) on the folder itself (no lock file to clean up,
# nothing written), which the kernel drops when the process dies, kill -9 included, so a
# crashed run never leaves its folder stuck. Locks held by this process are counted, so the
# CLI and fit() may both take the lock of the same folder.
_held: dict[tuple[int, int], list] = {}   # (st_dev, st_ino) -> [fd, holders]


class FolderLock:
    """An exclusive lock on a run folder for as long as the `with` block (or until release()).

    `with FolderLock(dir) as lock:` locks dir if it exists; acquire() locks the folder if it exists (creating it with create=True); acquiring
    again is a no-op. FolderBusyError when another process holds it. On acquiring, the
    temporary files of writes a kill left in the folder are removed (no live writer can
    own them now)."""

    def __init__(self, folder: str | os.PathLike, flag: str = "--save"):
        self.folder = Path(folder)
        self.flag = flag
        self._key: Optional[tuple[int, int]] = None

    @property
    def held(self) -> bool:
        return self._key is not None

    def acquire(self, *, create: bool = False) -> "FolderLock":
        if self._key is not None:
            return self
        if create:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise NetslimError(f"cannot create {self.folder}: {e.strerror or e}; "
                                   f"choose a writable {self.flag} folder") from None
        try:
            fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            # nothing to lock yet: acquire(create=True) once there is something to write (a path
            # under a file is check_writable_folder's to report)
            return self
        except OSError as e:
            raise NetslimError(f"cannot open {self.folder}: {e.strerror or e}; choose another {self.flag}") from None
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key in _held:  # this process holds it already (the CLI, then fit)
            os.close(fd)
            _held[key][1] += 1
            self._key = key
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise FolderBusyError(
                    f"{self.folder} is in use by another netslim process (a run, prune or pipeline writing "
                    f"there); wait for it to end, or choose another {self.flag}") from None
            # a file system without flock (some network mounts): run unlocked rather than not at all
            log.warning("cannot lock %s (%s): not guarded against a second writer", self.folder, e.strerror or e)
            return self
        _held[key] = [fd, 1]
        self._key = key
        for p in remove_stale_temps(self.folder):
            log.info("removed %s, left by an interrupted write", p)
        return self

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None or key not in _held:
            return
        entry = _held[key]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            os.close(entry[0])  # closing the last descriptor drops the flock

    def __enter__(self) -> "FolderLock":
        return self.acquire()  # locks a folder that exists now; acquire(create=True) later for a new one

    def __exit__(self, *exc: Any) -> None:
        self.release()


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line. A torn last line (crash mid-write) is skipped by readers."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
    except OSError as e:
        raise write_error(path, e) from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read the records of a JSON-lines file, skipping a torn trailing line."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return out
