"""Which code made a file: netslim's version and, when netslim runs from a git checkout, the
commit and whether the package's files differ from it.

Every checkpoint (save_checkpoint) and a pipeline's results.json record `provenance()`, so a
figure can always be tied to the code that made it. git is asked once per process; without
git, or when netslim is not a checkout (an installed wheel), the git fields are None.
"""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Optional

from ._version import __version__

PACKAGE_DIR = Path(__file__).resolve().parent


def provenance() -> dict:
    """{"version", "git_commit", "git_dirty"} of the running netslim (a fresh dict each call)."""
    commit, dirty = git_state(PACKAGE_DIR)
    return {"version": __version__, "git_commit": commit, "git_dirty": dirty}


@functools.lru_cache(maxsize=None)
def git_state(package_dir: Path) -> tuple[Optional[str], Optional[bool]]:
    """(commit, dirty) of the git checkout holding `package_dir`, or (None, None).

    Dirty means a file under `package_dir` (the code) is modified or new; the rest of the
    checkout (README, tests) does not count. A folder that is inside some repository but not
    tracked by it (a virtual environment in a user's project) is not a checkout of this code.
    """
    if _git(package_dir, "ls-files", "--error-unmatch", "__init__.py") is None:
        return None, None
    commit = _git(package_dir, "rev-parse", "HEAD")
    status = _git(package_dir, "status", "--porcelain", "--", ".")
    return commit, (None if status is None else bool(status))


def _git(cwd: Path, *args: str) -> Optional[str]:
    """git's stdout, or None when git is missing, fails or hangs."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()
