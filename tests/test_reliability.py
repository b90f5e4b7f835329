"""Reliability of the `netslim` command line: kill -9 and resume, SIGTERM, bad input,
weights-only files, non-finite loss.

Kill and resume (real `python -m netslim train` subprocesses, single-threaded; the seeds of
the random kill points are fixed; the external kill's exact step still depends on timing):
an external SIGKILL a random fraction of an epoch after a random epoch ended, a SIGKILL
just before a random optimizer step, and a SIGKILL half way through writing checkpoint.pt.
Each killed run is resumed with `netslim train --resume DIR/checkpoint.pt` and must end bit
for bit where an uninterrupted run of the same command ends (every tensor of checkpoint.pt,
model_best.pt and the optimizer state; every metrics line but the timings). A kill during a
write leaves that write's temporary file (.checkpoint.pt.XXXX.tmp) beside an intact
checkpoint.pt; the resumed run deletes it. A real SIGTERM exits 143 with one resume line.

Bad input: 67 cases, one test id each: 65 in test_bad_input (each: exit status 2, exactly
one `netslim: error: ...` line on stderr, no traceback, and nothing written, replaced or
touched -- kind, size, content hash and mtime of every file and folder in the shared runs,
the data and the case's own folder, the save folder included, are compared before and
after) and 2 in test_full_disk_keeps_the_previous_checkpoint. docs/errors.md lists each
case, the line the user sees and the test id (test_faults.py and others add the faults
that need a live process: a second writer, a kill -9 mid-write, a full disk inside
torch.save). The groups of the 65:
    checkpoints (26): missing (eval in a subprocess; --resume), a folder, a FIFO (eval in a
        subprocess; --resume), truncated, a text file, a pickled list, a newer format
        (netslim-checkpoint/99), an unsafe pickle (whose __reduce__ runs os.system:
        refused, never run) via eval in a subprocess and via train --resume, a checkpoint
        whose weights do not fit the architecture it names, damaged metadata (a width of
        1e4, a depth that is a string, a negative input size, an input size that is a
        string, an input size too small for its model), model_best.pt given to --resume,
        --resume with an --arch / a --depth the run does not have, --resume and --refine
        together, eval --dataset cifar10 of a 1-channel fashion-mnist checkpoint, train
        --refine with --dataset cifar100, prune of a seed-format checkpoint with the wrong
        --depth, a pipeline.json without a seed or with a seed that is no integer;
    flags (21): prune --percent 1 / nan / abc / -0.1, prune --min-channels 0, pipeline
        --percent 0, --s=-1e-4, epochs 0 (train, pipeline), batch size 0, a batch bigger than
        the training set, unknown dataset (train, eval), unknown architecture, unknown preset
        (each message lists the valid names), depths not of the family's form: resnet 21
        (resnet takes 9n+2: 20 is valid) in train and in profile, densenet 41, vgg 12
        (pipeline), an --image-size too small for the model (vgg 16, resnet-20 8);
    data (8): data folder empty (train in a subprocess, eval, pipeline), gzip stream
        truncated, IDX data shorter than its header says, labels not matching the images,
        --download from a file:// mirror serving a file that fails its md5, an image folder
        whose class count does not fit the checkpoint (a dataset whose channels do not fit
        is the eval/refine cifar cases above);
    the save folder (10): a --save path under a regular file (train, prune, pipeline: as root
        chmod does not stop writes), a folder that already holds a run (train), one holding
        model_best.pt and metrics.jsonl but no checkpoint.pt (train), a pruned.pt (prune), a
        train run's folder (prune, pipeline), a pipeline run of other settings (pipeline),
        an export target that exists.
The 2 more: a full disk (ENOSPC) while writing checkpoint.pt and while renaming it into
place: one error line, the previous checkpoint stays byte for byte (and mtime), no temporary
file is left, and the run resumes once there is room. test_existing_run_force_and_resume
checks the other side: --resume continues, --force replaces (train, prune, pipeline).
"""
from __future__ import annotations

import ast
import errno
import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from netslim import cli
from netslim.fileio import read_jsonl

from conftest import write_idx

SRC = Path(__file__).resolve().parents[1] / "src" / "netslim"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
MODEL = ["--arch", "vgg", "--depth", "11", "--width", "0.125"]
# the kill-and-resume run: 4 epochs x 8 steps of sparsity training
RUN = [*MODEL, "--train-subset", "256", "--epochs", "4", "--seed", "0", "--device", "cpu",
       "--batch-size", "32", "-sr", "--s", "1e-4"]
STEPS_PER_EPOCH, EPOCHS = 256 // 32, 4
TIMING = ("seconds", "images_per_s")


def train_cmd(data_dir: Path, save: Path) -> list[str]:
    return ["train", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), *RUN, "--save", str(save)]


def run_main(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:
        return int(e.code)


def netslim(*argv: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netslim", *argv], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


def snapshot(*roots: Path) -> dict:
    """Every file and folder under `roots`: kind, size, mtime (ns) and content hash."""
    out: dict = {}
    for root in roots:
        if not root.exists():
            out[str(root)] = None
            continue
        for p in [root, *sorted(root.rglob("*"))]:
            st = p.lstat()
            if p.is_dir():
                out[str(p)] = ("dir", st.st_mtime_ns)
            elif not p.is_file():  # a FIFO: reading it would block
                out[str(p)] = ("special", stat.S_IFMT(st.st_mode), st.st_mtime_ns)
            else:
                out[str(p)] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
    return out


def assert_same_run(got: Path, want: Path) -> None:
    """Bit for bit: every tensor of checkpoint.pt / model_best.pt and the optimizer; the metrics."""
    for name in ("checkpoint.pt", "model_best.pt"):
        a = torch.load(got / name, weights_only=True)
        b = torch.load(want / name, weights_only=True)
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for k, v in b["state_dict"].items():
            assert torch.equal(a["state_dict"][k], v), f"{name}: {k} differs"
    ta = torch.load(got / "checkpoint.pt", weights_only=True)["train_state"]
    tb = torch.load(want / "checkpoint.pt", weights_only=True)["train_state"]
    assert ta["epoch"] == tb["epoch"] == EPOCHS
    for i, state in tb["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(ta["optimizer"]["state"][i][k], v), f"optimizer state {i}.{k} differs"

    def plain(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    assert plain(read_jsonl(got / "metrics.jsonl")) == plain(read_jsonl(want / "metrics.jsonl"))
    assert len(read_jsonl(got / "metrics.jsonl")) == EPOCHS


def intact_after_kill(save: Path) -> int:
    """The checkpoint a SIGKILL left: loads weights_only, has finite weights; its epoch."""
    obj = torch.load(save / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in obj["state_dict"].values() if v.is_floating_point())
    if (save / "model_best.pt").exists():
        torch.load(save / "model_best.pt", weights_only=True)
    return int(obj["train_state"]["epoch"])


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    """The uninterrupted run every killed-and-resumed run must equal."""
    save = tmp_path_factory.mktemp("reference") / "run"
    assert cli.main(train_cmd(data_dir, save)) == 0
    return save


# --------------------------------------------------------------------------- 1. kill -9 and resume

# Runs `python -m netslim ...` with a SIGKILL planted at a chosen point:
#   KILL_STEP=K   kill -9 itself just before optimizer step K (counting from 1 over the run)
#   KILL_WRITE=N  kill -9 itself half way through writing the N-th checkpoint.pt (the
#                 temporary file holds half the bytes, fsynced; the rename never happens)
LAUNCHER = r'''
import io, os, runpy, signal, sys
from pathlib import Path

if os.environ.get("KILL_STEP"):
    import torch.optim.optimizer as O
    calls = [0]
    def pre_hook(opt, args, kwargs):
        calls[0] += 1
        if calls[0] == int(os.environ["KILL_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
    O.register_optimizer_step_pre_hook(pre_hook)
if os.environ.get("KILL_WRITE"):
    import torch
    import netslim.checkpoint as C
    import netslim.fileio as F
    real, writes = C.atomic_torch_save, [0]
    def save(obj, path):
        if Path(path).name == "checkpoint.pt":
            writes[0] += 1
            if writes[0] == int(os.environ["KILL_WRITE"]):
                buf = io.BytesIO()
                torch.save(obj, buf)
                data = buf.getvalue()
                def torn(f):
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)
                F._atomic_write(Path(path), torn)
        return real(obj, path)
    C.atomic_torch_save = save
sys.argv = ["netslim", *sys.argv[1:]]
runpy.run_module("netslim", run_name="__main__", alter_sys=True)
'''


def launch(tmp_path: Path, argv: list[str], **kill: int) -> subprocess.CompletedProcess:
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER)
    env = {**ENV, **{k: str(v) for k, v in kill.items()}}
    return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=env,
                          timeout=120)


def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(data_dir, reference, tmp_path):
    """An external kill -9 a seeded-random fraction of an epoch's time after a seeded-random
    epoch (1 or 2 of 4) ended: it lands in the next epoch's steps, evaluation or writes."""
    rng = random.Random(1)
    after_epochs, fraction = rng.choice([1, 2]), rng.random()
    save = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "netslim", *train_cmd(data_dir, save)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + 90

    def wait_for(ready) -> float:
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.002)
        return time.monotonic()
    # epoch k's duration: from epoch k-1's line (or the epoch-0 checkpoint) to epoch k's line
    start = wait_for(lambda: len(read_jsonl(save / "metrics.jsonl")) >= after_epochs - 1
                     and (save / "checkpoint.pt").exists())
    end = wait_for(lambda: len(read_jsonl(save / "metrics.jsonl")) >= after_epochs)
    delay = fraction * (end - start)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill landed"
    epoch = intact_after_kill(save)
    assert after_epochs <= epoch < EPOCHS
    print(f"killed {delay:.3f} s after epoch {after_epochs} ended; checkpoint.pt held epoch {epoch}; "
          f"temporary files: {temps(save) or 'none'}")  # shown with -s
    assert cli.main(["train", "--resume", str(save / "checkpoint.pt")]) == 0
    assert_same_run(save, reference)
    assert temps(save) == []


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(data_dir, reference, tmp_path):
    step = random.Random(2).randrange(2, STEPS_PER_EPOCH * EPOCHS)  # never the first or the last
    save = tmp_path / "run"
    res = launch(tmp_path, train_cmd(data_dir, save), KILL_STEP=step)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert intact_after_kill(save) == (step - 1) // STEPS_PER_EPOCH  # the last completed epoch
    assert temps(save) == []
    print(f"killed before step {step} of {STEPS_PER_EPOCH * EPOCHS} "
          f"(epoch {(step - 1) // STEPS_PER_EPOCH + 1}, step {(step - 1) % STEPS_PER_EPOCH + 1})")
    assert cli.main(["train", "--resume", str(save / "checkpoint.pt")]) == 0
    assert_same_run(save, reference)


def test_sigkill_while_writing_the_checkpoint_then_resume_is_bit_identical(data_dir, reference, tmp_path):
    # checkpoint.pt is written at epochs 0 (before the first step), 1, 2, 3 and 4: die writing epoch n
    n = random.Random(3).randrange(1, EPOCHS + 1)
    save = tmp_path / "run"
    res = launch(tmp_path, train_cmd(data_dir, save), KILL_WRITE=n + 1)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    # the rename never happened: the previous checkpoint is whole, the half-written temporary beside it
    assert intact_after_kill(save) == n - 1
    left = temps(save)
    assert len(left) == 1 and left[0].startswith(".checkpoint.pt.")
    print(f"killed half way through writing epoch {n}'s checkpoint.pt; left: {left}")
    assert cli.main(["train", "--resume", str(save / "checkpoint.pt")]) == 0
    assert_same_run(save, reference)
    assert temps(save) == []  # the resumed run removed the dead write's temporary


# --------------------------------------------------------------------------- 2. SIGTERM


def test_sigterm_stops_with_143_and_one_resume_line(data_dir, reference, tmp_path):
    """A real process and a real SIGTERM (test_cli_train sends SIGINT and SIGTERM in-process)."""
    signum = signal.SIGTERM
    save = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "netslim", *train_cmd(data_dir, save)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 90
    while not read_jsonl(save / "metrics.jsonl"):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("netslim: interrupted")]
    assert lines == [f"netslim: interrupted; resume with: netslim train --resume {save / 'checkpoint.pt'}"]
    assert err.strip().splitlines()[-1] == lines[0]
    assert 1 <= intact_after_kill(save) < EPOCHS and temps(save) == []
    assert cli.main(["train", "--resume", str(save / "checkpoint.pt")]) == 0
    assert_same_run(save, reference)


# --------------------------------------------------------------------------- 3. bad input


class Evil:
    """Unpickling this runs a shell command: a checkpoint loader must never do it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def world(data_dir, tmp_path_factory):
    """Shared inputs for the bad-input cases: a finished run, a pruned model, a pipeline run,
    damaged checkpoints and data folders. Every case checks none of it changed."""
    base = tmp_path_factory.mktemp("world")
    w = type("World", (), {})()
    w.base, w.data = base, data_dir
    w.run = base / "run"
    assert cli.main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), *MODEL,
                     "--train-subset", "256", "--epochs", "1", "--seed", "0", "--device", "cpu", "-sr",
                     "--save", str(w.run)]) == 0
    w.ckpt, w.best = w.run / "checkpoint.pt", w.run / "model_best.pt"
    w.pruned = base / "pruned"
    assert cli.main(["prune", "--checkpoint", str(w.best), "--percent", "0.5", "--save", str(w.pruned),
                     "--no-eval", "--device", "cpu"]) == 0
    w.masked = base / "masked"
    assert cli.main(["prune", "--checkpoint", str(w.best), "--percent", "0.5", "--mode", "mask",
                     "--save", str(w.masked), "--no-eval", "--device", "cpu"]) == 0
    w.pipe = base / "pipe"
    w.pipe_args = ["pipeline", "--save", str(w.pipe), "--data-dir", str(data_dir), *MODEL, "--epochs", "1",
                   "--train-subset", "128", "--percent", "0.5", "--seed", "0", "--device", "cpu",
                   "--latency-seconds", "0.01"]
    assert cli.main(w.pipe_args) == 0
    w.onnx = base / "exported.onnx"
    w.onnx.write_bytes(b"an earlier export")

    bad = base / "bad"  # files that are not checkpoints netslim wrote (test_every_pt_file skips them)
    bad.mkdir()
    raw = w.best.read_bytes()
    (bad / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    (bad / "text.pt").write_text("not a checkpoint\n")
    torch.save([1, 2, 3], bad / "list.pt")
    obj = torch.load(w.best, weights_only=True)
    torch.save({**obj, "format": "netslim-checkpoint/99"}, bad / "newer.pt")
    torch.save({**obj, "arch": {**obj["arch"], "depth": 13}}, bad / "other-arch.pt")
    w.marker = base / "pwned"
    torch.save({"format": "netslim-checkpoint/1", "state_dict": {}, "x": Evil(w.marker)}, bad / "evil.pt")
    from netslim.models import build_model
    seed_model = build_model("resnet", depth=11, num_classes=10)  # the seed's layout: dict with 'epoch'
    torch.save({"epoch": 3, "best_prec1": 50.0, "state_dict": seed_model.state_dict()}, bad / "seed.pth.tar")
    rgb = build_model("vgg", depth=11, num_classes=10, in_channels=3, width=0.125)
    from netslim.checkpoint import save_checkpoint
    save_checkpoint(bad / "rgb10.pt", rgb, arch={"name": "vgg", "depth": 11, "num_classes": 10,
                                                 "in_channels": 3, "width": 0.125}, input_size=[3, 32, 32])
    # damaged metadata: the model it names, or the input it says the model takes
    arch = obj["arch"]
    torch.save({**obj, "arch": {**arch, "width": 1e4}}, bad / "huge-width.pt")
    torch.save({**obj, "arch": {**arch, "depth": "eleven"}}, bad / "depth-a-string.pt")
    torch.save({**obj, "input_size": [1, -28, 28]}, bad / "negative-input.pt")
    torch.save({**obj, "input_size": [1, 2, 2]}, bad / "tiny-input.pt")
    torch.save({**obj, "input_size": "1x28x28"}, bad / "input-a-string.pt")
    os.mkfifo(bad / "fifo.pt")  # reading it would wait for a writer forever
    w.bad = bad
    # a folder holding results but no checkpoint.pt (a run whose checkpoint was deleted)
    w.partial = base / "partial"
    w.partial.mkdir()
    for name in ("model_best.pt", "metrics.jsonl"):
        shutil.copy2(w.run / name, w.partial / name)
    # pipeline runs whose pipeline.json is damaged: no seed, a seed that is no integer
    for name, change in (("pipe-no-seed", lambda d: d.pop("seed")), ("pipe-seed-text", lambda d: d.update(seed="7"))):
        shutil.copytree(w.pipe, base / name)
        doc = json.loads((base / name / "pipeline.json").read_text())
        change(doc)
        (base / name / "pipeline.json").write_text(json.dumps(doc))

    w.empty = base / "empty"
    w.empty.mkdir()
    w.afile = base / "afile.txt"
    w.afile.write_text("a file, not a folder\n")
    # damaged copies of the data
    src = data_dir / "fashion-mnist"
    for name in ("trunc-gz", "short-idx", "labels"):
        shutil.copytree(src, base / name / "fashion-mnist")
    blob = (src / "train-images-idx3-ubyte.gz").read_bytes()
    (base / "trunc-gz" / "fashion-mnist" / "train-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    body = gzip.decompress(blob)
    (base / "short-idx" / "fashion-mnist" / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(body[: len(body) - 28 * 28 * 3]))
    import numpy as np
    write_idx(base / "labels" / "fashion-mnist" / "train-labels-idx1-ubyte.gz", np.zeros(100, dtype=np.uint8))
    # a mirror serving a file that is not the official one: its md5 fails
    (base / "mirror" / "fashion-mnist").mkdir(parents=True)
    (base / "mirror" / "fashion-mnist" / "train-images-idx3-ubyte.gz").write_bytes(blob)
    (base / "download-here").mkdir()
    # an image folder with 2 classes (the rgb10 checkpoint predicts 10)
    from PIL import Image
    for c in ("cat", "dog"):
        (base / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 100, 200 if c == "dog" else 0)).save(base / "imgs" / c / f"{i}.png")
    return w


def _cases() -> dict:
    """id -> (subprocess?, argv(w, tmp), words the error line must hold)."""
    B = lambda name: lambda w, t: w.bad / name  # noqa: E731
    tr = lambda w, t, *x: ["train", "--dataset", "fashion-mnist", "--data-dir", str(w.data), *MODEL,  # noqa: E731
                           "--train-subset", "256", "--epochs", "1", "--device", "cpu", "--save", str(t / "out"), *x]
    ev = lambda path, *x: lambda w, t: ["eval", "--checkpoint", str(path(w, t)), "--data-dir", str(w.data),  # noqa: E731
                                        "--device", "cpu", *x]
    pipe = lambda w, t, *x: ["pipeline", "--save", str(t / "out"), "--data-dir", str(w.data), *MODEL,  # noqa: E731
                             "--epochs", "1", "--train-subset", "64", "--device", "cpu", *x]
    c = {
        # ---- checkpoints
        "ckpt-missing-eval": (True, ev(lambda w, t: t / "none.pt"), ["does not exist"]),
        "ckpt-missing-resume": (False, lambda w, t: ["train", "--resume", str(t / "none" / "checkpoint.pt")],
                                ["does not exist"]),
        "ckpt-is-a-folder": (False, ev(lambda w, t: w.run), ["is a folder"]),
        "ckpt-truncated": (False, lambda w, t: ["prune", "--checkpoint", str(w.bad / "trunc.pt"), "--percent", "0.5",
                                                "--save", str(t / "out")], ["not a readable checkpoint"]),
        "ckpt-text-file": (False, ev(B("text.pt")), ["not a readable checkpoint (truncated or not a torch file)"]),
        "ckpt-pickled-list": (False, lambda w, t: ["train", "--resume", str(w.bad / "list.pt")],
                              ["not a checkpoint", "list"]),
        "ckpt-newer-format": (False, ev(B("newer.pt")), ["newer netslim", "format 99"]),
        "ckpt-unsafe-pickle-eval": (True, ev(B("evil.pt")), ["carry code", "weights-only"]),
        "ckpt-unsafe-pickle-resume": (False, lambda w, t: ["train", "--resume", str(w.bad / "evil.pt")],
                                      ["carry code"]),
        "ckpt-other-architecture": (False, ev(B("other-arch.pt")), ["does not fit the architecture"]),
        "ckpt-resume-model-best": (False, lambda w, t: ["train", "--resume", str(w.best), "--save", str(t / "out")],
                                   ["no training state"]),
        "ckpt-resume-other-arch": (False, lambda w, t: ["train", "--resume", str(w.ckpt), "--arch", "resnet"],
                                   ["--arch resnet does not match", "vgg"]),
        "ckpt-resume-other-depth": (False, lambda w, t: ["train", "--resume", str(w.ckpt), "--depth", "13"],
                                    ["--depth 13 does not match"]),
        "ckpt-resume-and-refine": (False, lambda w, t: ["train", "--resume", str(w.ckpt), "--refine", str(w.best)],
                                   ["not both"]),
        "ckpt-eval-other-dataset": (False, ev(lambda w, t: w.best, "--dataset", "cifar10"),
                                    ["cifar10 has 3 input channel(s)", "takes 1"]),
        "ckpt-refine-other-dataset": (False, lambda w, t: ["train", "--refine", str(w.pruned / "pruned.pt"),
                                                           "--dataset", "cifar100", "--save", str(t / "out")],
                                      ["cifar100 has 3 input channel(s)"]),
        "ckpt-fifo-eval": (True, ev(B("fifo.pt")), ["is a FIFO (named pipe), not a regular file"]),
        "ckpt-fifo-resume": (False, lambda w, t: ["train", "--resume", str(w.bad / "fifo.pt")], ["is a FIFO"]),
        "ckpt-huge-width": (False, ev(B("huge-width.pt")), ["names a model of", "parameters", "damaged"]),
        "ckpt-depth-not-an-integer": (False, ev(B("depth-a-string.pt")), ["cannot build", "damaged"]),
        "ckpt-negative-input-size": (False, ev(B("negative-input.pt")), ["invalid input_size [1, -28, 28]"]),
        "ckpt-input-size-not-a-list": (False, ev(B("input-a-string.pt")), ["invalid input_size '1x28x28'"]),
        "ckpt-input-too-small-for-its-model": (False, lambda w, t: [
            "prune", "--checkpoint", str(w.bad / "tiny-input.pt"), "--percent", "0.5", "--save", str(t / "out")],
            ["cannot take its input_size [1, 2, 2]", "damaged"]),
        "pipeline-json-without-seed": (False, lambda w, t: _pipe_in(w, "pipe-no-seed"),
                                       ["not a readable pipeline file", "seed None", "--force"]),
        "pipeline-json-seed-not-an-integer": (False, lambda w, t: _pipe_in(w, "pipe-seed-text"),
                                              ["not a readable pipeline file", "seed '7'"]),
        "ckpt-seed-format-wrong-depth": (False, lambda w, t: [
            "prune", "--checkpoint", str(w.bad / "seed.pth.tar"), "--arch", "resnet", "--depth", "20",
            "--dataset", "cifar10", "--percent", "0.5", "--save", str(t / "out")], ["not a resnet-20", "--depth"]),
        # ---- flags
        "prune-percent-1": (False, lambda w, t: ["prune", "--checkpoint", str(w.best), "--percent", "1",
                                                 "--save", str(t / "out")], ["--percent", "in [0, 1)"]),
        "prune-percent-nan": (False, lambda w, t: ["prune", "--checkpoint", str(w.best), "--percent", "nan",
                                                   "--save", str(t / "out")], ["in [0, 1)"]),
        "prune-percent-abc": (False, lambda w, t: ["prune", "--checkpoint", str(w.best), "--percent", "abc",
                                                   "--save", str(t / "out")], ["'abc' is not a number"]),
        "prune-percent-negative": (False, lambda w, t: ["prune", "--checkpoint", str(w.best), "--percent=-0.1",
                                                        "--save", str(t / "out")], ["in [0, 1)"]),
        "prune-min-channels-0": (False, lambda w, t: ["prune", "--checkpoint", str(w.best), "--percent", "0.5",
                                                      "--min-channels", "0", "--save", str(t / "out")],
                                 ["at least 1"]),
        "pipeline-percent-0": (False, lambda w, t: pipe(w, t, "--percent", "0"), ["percent 0.0 is not valid"]),
        "train-s-negative": (False, lambda w, t: tr(w, t, "--s=-1e-4"), ["--s/--lambda: must be >= 0"]),
        "train-epochs-0": (False, lambda w, t: tr(w, t, "--epochs", "0"), ["--epochs: must be at least 1"]),
        "pipeline-epochs-0": (False, lambda w, t: pipe(w, t, "--epochs", "0"), ["--epochs: must be at least 1"]),
        "train-batch-size-0": (False, lambda w, t: tr(w, t, "--batch-size", "0"), ["--batch-size: must be at least 1"]),
        "train-batch-bigger-than-data": (False, lambda w, t: tr(w, t, "--batch-size", "512"),
                                         ["batch size 512", "exceeds the 256 training images"]),
        "train-unknown-dataset": (False, lambda w, t: tr(w, t, "--dataset", "imagenet"),
                                  ["unknown dataset 'imagenet'", "fashion-mnist", "cifar100"]),
        "eval-unknown-dataset": (False, ev(lambda w, t: w.best, "--dataset", "imagenet"),
                                 ["unknown dataset 'imagenet'", "cifar10"]),
        "train-unknown-arch": (False, lambda w, t: tr(w, t, "--arch", "alexnet"),
                               ["unknown arch 'alexnet'", "vgg", "resnet", "densenet"]),
        "pipeline-unknown-preset": (False, lambda w, t: ["pipeline", "--preset", "nope", "--save", str(t / "out")],
                                    ["invalid choice: 'nope'", "quick"]),
        "train-resnet-depth-21": (False, lambda w, t: tr(w, t, "--arch", "resnet", "--depth", "21"),
                                  ["depth 21 is not valid for resnet", "9n+2"]),
        "train-densenet-depth-41": (False, lambda w, t: ["train", "--dataset", "fashion-mnist", "--arch", "densenet",
                                                         "--depth", "41", "--save", str(t / "out")],
                                    ["depth 41 is not valid for densenet"]),
        "pipeline-vgg-depth-12": (False, lambda w, t: pipe(w, t, "--depth", "12"), ["depth 12 is not valid for vgg"]),
        "profile-resnet-depth-21": (False, lambda w, t: ["profile", "--arch", "resnet", "--depth", "21",
                                                         "--dataset", "cifar10", "--no-latency"],
                                    ["depth 21 is not valid for resnet"]),
        # ---- data
        "data-missing-train": (True, lambda w, t: tr(w, t, "--data-dir", str(w.empty)),
                               ["dataset 'fashion-mnist' not found", "--download"]),
        "data-missing-eval": (False, lambda w, t: ["eval", "--checkpoint", str(w.best), "--data-dir", str(w.empty)],
                              ["dataset 'fashion-mnist' not found"]),
        "data-missing-pipeline": (False, lambda w, t: pipe(w, t, "--data-dir", str(w.empty), "--percent", "0.5"),
                                  ["not found"]),
        "data-gzip-truncated": (False, lambda w, t: tr(w, t, "--data-dir", str(w.base / "trunc-gz")),
                                ["cannot read", "truncated or corrupt"]),
        "data-idx-short": (False, lambda w, t: tr(w, t, "--data-dir", str(w.base / "short-idx")),
                           ["its header [320, 28, 28] needs"]),
        "data-labels-mismatch": (False, lambda w, t: tr(w, t, "--data-dir", str(w.base / "labels")),
                                 ["100 labels for 320 images"]),
        "data-download-bad-md5": (False, lambda w, t: tr(w, t, "--data-dir", str(w.base / "download-here"),
                                                         "--download"), ["checksum mismatch", "nothing was saved"]),
        "data-classes-do-not-fit": (False, lambda w, t: ["eval", "--checkpoint", str(w.bad / "rgb10.pt"),
                                                         "--dataset", "imagefolder", "--data-dir", str(w.base / "imgs")],
                                    ["2 classes", "predicts 10"]),
        # ---- the save folder
        "save-under-a-file-train": (False, lambda w, t: tr(w, t, "--save", str(w.afile / "sub")),
                                    ["cannot write in", "is a file"]),
        "save-under-a-file-prune": (False, lambda w, t: ["prune", "--checkpoint", str(w.best), "--percent", "0.5",
                                                         "--save", str(w.afile / "sub")], ["cannot write in"]),
        "save-under-a-file-pipeline": (False, lambda w, t: pipe(w, t, "--save", str(w.afile / "sub")),
                                       ["cannot write in"]),
        "existing-run-train": (False, lambda w, t: tr(w, t, "--save", str(w.run)),
                               ["already holds a run", "--resume", "--force"]),
        "existing-run-prune": (False, lambda w, t: ["prune", "--checkpoint", str(w.best), "--percent", "0.5",
                                                    "--save", str(w.pruned)], ["already exists", "--force"]),
        "existing-run-pipeline-other-settings": (False, lambda w, t: [*w.pipe_args, "--percent", "0.7"],
                                                 ["holds a pipeline run with different settings", "--force"]),
        "existing-results-without-checkpoint-train": (False, lambda w, t: tr(w, t, "--save", str(w.partial)),
                                                      ["already holds a run", "model_best.pt", "--force"]),
        "existing-run-prune-into-a-train-folder": (False, lambda w, t: [
            "prune", "--checkpoint", str(w.best), "--percent", "0.5", "--save", str(w.run)],
            ["already holds results", "checkpoint.pt", "--force"]),
        "existing-run-pipeline-into-a-train-folder": (False, lambda w, t: pipe(w, t, "--save", str(w.run)),
                                                      ["holds results", "checkpoint.pt", "--force"]),
        "image-size-too-small-vgg": (False, lambda w, t: [
            "train", "--dataset", "imagefolder", "--data-dir", str(w.base / "imgs"), *MODEL, "--image-size", "16",
            "--batch-size", "2", "--epochs", "1", "--device", "cpu", "--save", str(t / "out")],
            ["cannot take 3x16x16 inputs", "--image-size"]),
        "image-size-too-small-resnet": (False, lambda w, t: [
            "train", "--dataset", "imagefolder", "--data-dir", str(w.base / "imgs"), "--arch", "resnet",
            "--depth", "20", "--image-size", "8", "--batch-size", "2", "--epochs", "1", "--device", "cpu",
            "--save", str(t / "out")], ["cannot take 3x8x8 inputs"]),
        "existing-export-target": (False, lambda w, t: ["export", "--checkpoint", str(w.best), "--onnx", str(w.onnx)],
                                   ["already exists", "--force"]),
    }
    return c


def _pipe_in(w, folder: str) -> list[str]:
    """world's pipeline command, pointed at a copy of its run in base/folder."""
    return [str(w.base / folder) if a == str(w.pipe) else a for a in w.pipe_args]


CASES = _cases()


def test_case_count_in_the_docstring():
    assert len(CASES) == 65 and "67 cases" in __doc__


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, world, tmp_path, capsys, monkeypatch):
    sub, argv_of, says = CASES[case]
    argv = [str(a) for a in argv_of(world, tmp_path)]
    monkeypatch.setenv("NETSLIM_MIRROR", (world.base / "mirror").as_uri())
    watched = (world.base, world.data, tmp_path)
    before = snapshot(*watched)
    if sub:
        res = netslim(*argv, env={**ENV, "NETSLIM_MIRROR": (world.base / "mirror").as_uri()})
        code, err = res.returncode, res.stderr
    else:
        code = run_main(argv)
        err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("netslim: error: "), err
    assert "Traceback" not in err
    for word in says:
        assert word in lines[0]
    assert snapshot(*watched) == before, "something was written"
    assert not (tmp_path / "out").exists()
    assert not world.marker.exists(), "the unsafe pickle ran"


@pytest.mark.parametrize("where", ["write", "replace"])
def test_full_disk_keeps_the_previous_checkpoint(world, tmp_path, capsys, monkeypatch, where):
    """ENOSPC while writing checkpoint.pt (after half the bytes) or renaming it into place."""
    import netslim.checkpoint as C
    import netslim.fileio as F

    save = tmp_path / "run"
    shutil.copytree(world.run, save)
    (save / "checkpoint.pt").touch()  # an mtime of its own, so that a rewrite shows
    before = snapshot(save / "checkpoint.pt")
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "write":
        real_save = C.atomic_torch_save

        def save_ckpt(obj, path):
            if Path(path).name != "checkpoint.pt":
                return real_save(obj, path)

            def half_then_full(f):
                f.write(b"\0" * 4096)
                raise full
            F._atomic_write(Path(path), half_then_full)
        monkeypatch.setattr(C, "atomic_torch_save", save_ckpt)
    else:
        real_replace = os.replace

        def replace(src, dst, *a, **k):
            if Path(dst).name == "checkpoint.pt":
                raise full
            return real_replace(src, dst, *a, **k)
        monkeypatch.setattr(os, "replace", replace)
    assert run_main(["train", "--resume", str(save / "checkpoint.pt"), "--epochs", "2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("netslim: error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "unchanged" in errors[0], lines
    assert lines[-1] == errors[0] and not any("Traceback" in ln for ln in lines)
    assert snapshot(save / "checkpoint.pt") == before
    assert temps(save) == []
    monkeypatch.undo()
    assert run_main(["train", "--resume", str(save / "checkpoint.pt"), "--epochs", "2"]) == 0  # room again
    assert torch.load(save / "checkpoint.pt", weights_only=True)["train_state"]["epoch"] == 2


def test_existing_run_force_and_resume(world, tmp_path, capsys):
    """train / prune / pipeline: --resume (or a re-run) continues, --force replaces."""
    # train: --resume continues the run in its folder, --force starts it over
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    assert cli.main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    assert cli.main(["train", "--dataset", "fashion-mnist", "--data-dir", str(world.data), *MODEL,
                     "--train-subset", "64", "--epochs", "1", "--device", "cpu", "--seed", "5",
                     "--save", str(run), "--force"]) == 0
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["train_state"]["epoch"] == 1 and ck["train_state"]["seed"] == 5
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
    # prune --force replaces pruned.pt and prune.json
    pruned = tmp_path / "pruned"
    shutil.copytree(world.pruned, pruned)
    assert cli.main(["prune", "--checkpoint", str(world.best), "--percent", "0.3", "--save", str(pruned),
                     "--force", "--no-eval"]) == 0
    assert json.loads((pruned / "prune.json").read_text())["percent"] == 0.3
    assert torch.load(pruned / "pruned.pt", weights_only=True)["metrics"]["prune"]["percent"] == 0.3
    # pipeline: the same command again finds every stage done; --force with other settings starts over
    pipe = tmp_path / "pipe"
    shutil.copytree(world.pipe, pipe)
    args = [str(pipe) if a == str(world.pipe) else a for a in world.pipe_args]
    capsys.readouterr()
    assert cli.main(args) == 0
    assert capsys.readouterr().out.count("already done") == 4
    assert cli.main([*args, "--percent", "0.7", "--force"]) == 0
    assert {p.name for p in pipe.iterdir() if p.is_dir()} - {"plots"} == {"baseline", "sparsity", "prune-70",
                                                                      "finetune-70"}
    assert json.loads((pipe / "pipeline.json").read_text())["config"]["percents"] == [0.7]


# --------------------------------------------------------------------------- 4. weights-only files


def test_every_pt_file_netslim_writes_loads_weights_only(world):
    files = [p for p in world.base.rglob("*.pt") if world.bad not in p.parents]
    names = {str(p.relative_to(world.base)) for p in files}
    assert {"run/checkpoint.pt", "run/model_best.pt", "pruned/pruned.pt", "masked/pruned.pt",
            "pipe/baseline/checkpoint.pt", "pipe/sparsity/model_best.pt", "pipe/prune-50/pruned.pt",
            "pipe/finetune-50/checkpoint.pt", "pipe/finetune-50/model_best.pt"} <= names
    for p in files:
        obj = torch.load(p, weights_only=True)
        assert obj["format"] == "netslim-checkpoint/1", p


def test_source_never_loads_with_weights_only_false():
    checked = 0
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        assert "weights_only=False" not in text.replace(" ", ""), path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and ast.unparse(node.func.value) == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                    f"{path}:{node.lineno}: torch.load without weights_only=True"
                checked += 1
    assert checked >= 1


# --------------------------------------------------------------------------- 5. non-finite loss


def test_non_finite_loss_in_the_first_epoch_leaves_nothing_that_blocks_the_corrected_run(data_dir, tmp_path,
                                                                                           capsys):
    """--lr 1e30 fails in epoch 1: one line naming epoch, step and lr; the epoch-0 checkpoint
    it wrote is removed, so the advised re-run with a lower lr needs neither --force nor --resume."""
    save = tmp_path / "run"
    argv = ["train", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), *MODEL, "--train-subset", "256",
            "--epochs", "1", "--seed", "0", "--device", "cpu", "--save", str(save)]
    assert run_main([*argv, "--lr", "1e30"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in ln for ln in err)
    line = err[-1]
    assert line.startswith("netslim: error: loss is not finite") and "at epoch 1, step " in line, line
    assert "with lr 1e+30" in line and "nothing was kept" in line and "lower --lr" in line, line
    assert not save.exists(), sorted(p.name for p in save.iterdir())
    assert run_main([*argv, "--lr", "0.05"]) == 0  # the corrected command, as advised
    assert torch.load(save / "checkpoint.pt", weights_only=True)["train_state"]["epoch"] == 1


def test_resume_refuses_a_changed_recipe(data_dir, tmp_path, capsys):
    """--lr on --resume would be overridden by the restored optimizer state: refused, nothing written."""
    from netslim import cli
    save = tmp_path / "run"
    base = ["train", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--arch", "vgg", "--depth", "11",
            "--width", "0.125", "--train-subset", "64", "--epochs", "1", "--seed", "0", "--save", str(save)]
    assert cli.main(base) == 0
    before = (save / "checkpoint.pt").stat().st_mtime_ns
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--resume", str(save / "checkpoint.pt"), "--lr", "0.01"])
    assert e.value.code == 2
    assert "--lr 0.01 differs from the resumed run's 0.1" in capsys.readouterr().err
    assert (save / "checkpoint.pt").stat().st_mtime_ns == before
