"""Packaging and provenance: one version everywhere, a wheel that ships what it declares,
and every checkpoint naming the code that wrote it."""
import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import netslim
from netslim import cli
from netslim.provenance import PACKAGE_DIR, git_state, provenance

ROOT = Path(__file__).resolve().parent.parent


def test_one_version_everywhere(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"netslim {netslim.__version__}"
    # the installed metadata: pyproject reads the version from src/netslim/_version.py
    assert importlib.metadata.version("netslim") == netslim.__version__


def test_wheel_ships_types_license_and_the_version(tmp_path):
    """The wheel a user installs: py.typed (PEP 561), the MIT LICENSE, every module, and the
    version from _version.py. Built offline from a copy of the tree (no build isolation)."""
    src = tmp_path / "tree"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("netslim-*.whl")
    assert wheel.name.startswith(f"netslim-{netslim.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    info = f"netslim-{netslim.__version__}.dist-info"
    assert {"netslim/py.typed", "netslim/_version.py", "netslim/provenance.py", f"{info}/licenses/LICENSE"} <= names
    shipped = {n for n in names if n.endswith(".py")}
    assert shipped == {str(p.relative_to(ROOT / "src")) for p in (ROOT / "src/netslim").rglob("*.py")}
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert f"\nVersion: {netslim.__version__}\n" in metadata and "\nLicense-Expression: MIT\n" in metadata


def _git_out(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_every_checkpoint_names_the_code_that_wrote_it(tmp_path):
    model = netslim.build_model("vgg", depth=11, num_classes=10, in_channels=1, width=0.125)
    netslim.save_checkpoint(tmp_path / "m.pt", model)
    recorded = torch.load(tmp_path / "m.pt", weights_only=True)["netslim"]
    assert recorded == provenance() and recorded["version"] == netslim.__version__
    # run from a checkout of netslim (a clone, as CI does): its HEAD is recorded; else nothing
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "__init__.py"], cwd=PACKAGE_DIR,
                             capture_output=True).returncode == 0
    assert recorded["git_commit"] == (_git_out(PACKAGE_DIR, "rev-parse", "HEAD") if tracked else None)
    # a reloaded and re-saved model records the code that saved it, not what the file carried
    reloaded, meta = netslim.load_checkpoint(tmp_path / "m.pt")
    reloaded.netslim_meta = {**meta, "netslim": {"version": "0.0.1", "git_commit": "x", "git_dirty": False}}
    netslim.save_checkpoint(tmp_path / "again.pt", reloaded)
    assert torch.load(tmp_path / "again.pt", weights_only=True)["netslim"] == provenance()


def test_git_state_of_a_checkout_a_stranger_and_no_git(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    pkg = repo / "src" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    _git_out(repo, "init", "-q")
    _git_out(repo, "add", ".")
    _git_out(repo, "commit", "-q", "-m", "one")
    head = _git_out(repo, "rev-parse", "HEAD")
    git_state.cache_clear()
    assert git_state(pkg) == (head, False)
    (repo / "notes.txt").write_text("outside the package: the code is still clean\n")
    git_state.cache_clear()
    assert git_state(pkg) == (head, False)
    (pkg / "__init__.py").write_text("x = 2\n")
    git_state.cache_clear()
    assert git_state(pkg) == (head, True)
    # a package folder the repository does not track (an installed copy inside a user's project)
    stranger = repo / "venv" / "netslim"
    stranger.mkdir(parents=True)
    (stranger / "__init__.py").write_text("")
    assert git_state(stranger) == (None, None)
    # no git at all: no failure, just no commit
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    git_state.cache_clear()
    assert git_state(pkg) == (None, None)
    git_state.cache_clear()
