"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Everything netslim writes (checkpoints, reports, metrics snapshots, downloads) goes
through here: write to a temporary file in the destination folder, flush, fsync, rename
over the target, fsync the folder. A crash or a full disk leaves the previous file intact.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import NetslimError


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise NetslimError(f"cannot write in {folder}: {e.strerror or e}; choose a writable --save folder") from None
    try:
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
        if isinstance(e, OSError):
            raise NetslimError(f"could not write {path}: {e.strerror or e} (disk full or not writable?); "
                               "the previous file, if any, is unchanged") from None
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


def remove_stale_temps(folder: str | os.PathLike, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files (.NAME.*.tmp) that atomic writes of NAME killed before their
    rename (kill -9, power loss) left in `folder`; returns what was removed. The files NAME
    themselves are untouched: an interrupted write never replaced them."""
    import glob

    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for name in names:
        for p in folder.glob(f".{glob.escape(name)}.*.tmp"):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line. A torn last line (crash mid-write) is skipped by readers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


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
