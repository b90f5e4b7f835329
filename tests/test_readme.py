"""The README's library example and torchrun lines run as written: documentation that drifts is a bug."""
from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_fashion_mnist

import netslim
from netslim.sparsity import bn_gammas

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_block_after(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_library_example_runs(tmp_path, monkeypatch, capsys):
    # The checkpoint the example prunes is what `make demo` leaves in runs/quick: a width-0.25
    # vgg-13 for Fashion-MNIST whose BN factors sparsity training has spread out.
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    trained = netslim.build_model("vgg", depth=13, num_classes=10, in_channels=1, width=0.25)
    with torch.no_grad():
        for g in bn_gammas(trained):
            g.copy_(torch.rand_like(g))
    (tmp_path / "runs/quick/sparsity").mkdir(parents=True)
    netslim.save_checkpoint("runs/quick/sparsity/model_best.pt", trained, input_size=[1, 32, 32])

    scope: dict = {}
    exec(compile(_python_block_after("## Library"), "README.md", "exec"), scope)

    slim, slim2, fast, masked = scope["slim"], scope["slim2"], scope["fast"], scope["masked"]
    report = scope["report"]
    assert report["after"]["flops"] < 0.8 * report["before"]["flops"]
    # the seed's rule on distinct factors: the threshold is element int(total * 0.5), and only
    # factors above it stay
    total = report["channels_total"]
    assert report["channels_kept"] == total - int(total * 0.5) - 1
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = slim.eval()(x)
        torch.testing.assert_close(masked.eval()(x), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(slim2.eval()(x), ref)
        torch.testing.assert_close(fast(x), ref, rtol=1e-4, atol=1e-4)
    assert str(report["after"]["params"]) in capsys.readouterr().out


def test_a_built_model_saves_and_reloads_from_its_file_alone(tmp_path):
    model = netslim.build_model("densenet", depth=40, num_classes=100, in_channels=1)
    netslim.save_checkpoint(tmp_path / "m.pt", model)
    again, meta = netslim.load_checkpoint(tmp_path / "m.pt")
    assert meta["arch"] == {"name": "densenet", "depth": 40, "num_classes": 100, "in_channels": 1}
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model.eval()(x))


# --------------------------------------------------------------------------- the torchrun lines

def _torchrun_lines() -> list[list[str]]:
    """The `torchrun ...` lines of the README's Multi-GPU section, split as a shell would."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"```shell\n(.*?)```", text[text.index("## Multi-GPU"):], re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.startswith("torchrun ")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_this_machine(line: list[str], data_dir: Path, save: Path) -> list[str]:
    """A README torchrun line as a 2-core CPU machine runs it, changed only in size and place:
    2 processes, one node at 127.0.0.1 on a free port, the tiny fashion-mnist instead of cifar10
    (the only data set here), 1 epoch on 32 images in batches of 16. Everything else stays as
    written."""
    sizes = {"--nproc-per-node": "2", "--nnodes": "1", "--master-addr": "127.0.0.1",
             "--master-port": str(_free_port()), "--dataset": "fashion-mnist"}
    args = list(line[1:])
    for i in range(len(args) - 1):
        if args[i] in sizes:
            args[i + 1] = sizes[args[i]]
    command = args[args.index("netslim") + 1]
    args += ["--data-dir", str(data_dir), "--save", str(save), "--epochs", "1", "--train-subset", "32",
             "--batch-size", "16"]
    if command == "pipeline":
        # the preset's cifar10 and resnet-164 (4 training stages of it would take minutes here)
        args += ["--dataset", "fashion-mnist", "--depth", "11", "--latency-seconds", "0.01"]
    # `torchrun` is torch.distributed.run's entry point: run it with this interpreter
    return [sys.executable, "-m", "torch.distributed.run", *args]


@pytest.fixture(scope="module")
def torchrun_lines(tmp_path_factory):
    lines = _torchrun_lines()
    assert len(lines) == 3, "the README's Multi-GPU section changed: update this test"
    data = make_fashion_mnist(tmp_path_factory.mktemp("data"), n_train=64, n_test=32)
    return lines, data


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_readme_torchrun_train_line(torchrun_lines, tmp_path):
    """Its --sync-bn needs CUDA: on CPU, one clear line from netslim (rank 0), no traceback from
    netslim's processes (torchrun's launcher then reports the failed children its own way), and
    nothing written."""
    lines, data = torchrun_lines
    line = lines[0]
    assert "train" in line and "--lambda" in line and "--sync-bn" in line
    res = _run(_on_this_machine(line, data, tmp_path / "run"), tmp_path)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("netslim: error:")]
    assert res.returncode != 0 and len(errors) == 1 and "SyncBatchNorm" in errors[0], res.stderr[-3000:]
    assert not re.search(r'File ".*netslim[/\\]', res.stderr), res.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_readme_torchrun_pipeline_line(torchrun_lines, tmp_path):
    lines, data = torchrun_lines
    line = lines[1]
    assert "pipeline" in line and "--preset" in line
    res = _run(_on_this_machine(line, data, tmp_path / "pipe"), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    print(res.stdout)
    results = json.loads((tmp_path / "pipe" / "results.json").read_text())
    assert results["complete"]
    # the preset's percents (40% and 60%), every stage trained by both processes
    assert [r["key"] for r in results["stages"]] == ["baseline", "sparsity", "prune-40", "finetune-40",
                                                     "prune-60", "finetune-60"]
    ck = torch.load(tmp_path / "pipe" / "finetune-60" / "checkpoint.pt", weights_only=True)
    assert ck["train_state"]["world_size"] == 2


def test_readme_torchrun_multi_node_line(torchrun_lines, tmp_path):
    """The two-node line, as node 0 of a one-node group at 127.0.0.1 (all a single machine can be)."""
    lines, data = torchrun_lines
    line = lines[2]
    assert "--nnodes" in line and "--node-rank" in line and "--lambda" in line
    res = _run(_on_this_machine(line, data, tmp_path / "run"), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["train_state"]["world_size"] == 2
    config = ck["train_state"]["config"]
    assert config["sr"] and config["s"] == 1e-5  # --lambda reached the trainer as the strength


def test_registering_your_own_module_type_runs(capsys):
    scope: dict = {}
    exec(compile(_python_block_after("#### Your own module types"), "README.md", "exec"), scope)
    slim, model = scope["slim"], scope["model"]
    assert slim[2].slope.shape == (7,) == (slim[1].num_features,)  # the seed's rule: 16 - int(16 * 0.5) - 1
    assert "torch.Size([7])" in capsys.readouterr().out
    x = torch.randn(2, 3, 32, 32)
    masked, _ = netslim.prune(model, 0.5, mode="mask", example_input=x[:1])
    with torch.no_grad():
        torch.testing.assert_close(slim.eval()(x), masked.eval()(x), rtol=1e-5, atol=1e-5)
