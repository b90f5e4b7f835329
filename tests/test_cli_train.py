"""`netslim train / finetune / eval` end to end on tiny Fashion-MNIST IDX files in a temp folder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from netslim import cli
from netslim.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from netslim.fileio import read_jsonl
from netslim.models import build_model
from netslim.profile import count

MODEL = ["--arch", "vgg", "--depth", "11", "--width", "0.125"]
FAST = ["--train-subset", "256", "--batch-size", "64", "--test-batch-size", "128", "--seed", "0", "--device", "cpu"]


def train_args(data_dir: Path, save: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), *MODEL, *FAST,
            "--save", str(save), *extra]


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory) -> Path:
    """One finished 2-epoch sparsity run shared by the tests that only read it."""
    save = tmp_path_factory.mktemp("runs") / "sparsity"
    assert cli.main(train_args(data_dir, save, "--epochs", "2", "-sr", "--s", "1e-4")) == 0
    return save


def run_main(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:
        return int(e.code)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("netslim: error: "), err
    return lines[0]


def test_train_writes_loadable_files(run_dir, data_dir, capsys):
    assert {p.name for p in run_dir.iterdir()} == {"checkpoint.pt", "model_best.pt", "metrics.jsonl", "config.toml"}
    for name in ("checkpoint.pt", "model_best.pt"):
        obj = torch.load(run_dir / name, weights_only=True)
        assert obj["arch"] == {"name": "vgg", "depth": 11, "num_classes": 10, "in_channels": 1, "width": 0.125}
        assert obj["dataset"]["name"] == "fashion-mnist" and obj["input_size"] == [1, 32, 32]
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ck["train_state"]["epoch"] == 2 and ck["train_state"]["config"]["sr"] is True
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    model, meta = load_checkpoint(run_dir / "model_best.pt")
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)

    assert cli.main(["eval", "--checkpoint", str(run_dir / "model_best.pt"), "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    best = max(r["test_top1"] for r in rows)
    assert f"top-1 {best:.2f}%" in out and "fashion-mnist test, 128 images" in out


def test_loss_falls_and_progress_is_shown(data_dir, tmp_path, capsys):
    assert cli.main(train_args(data_dir, tmp_path / "r", "--epochs", "3", "--lr", "0.05")) == 0
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    out, err = capsys.readouterr()
    assert "epoch 1/3" in out and "epoch 3/3" in out and "done: best top-1" in out
    assert "training" in err and "step" not in err.replace(" steps ", " ")  # not a terminal: the start line, no bar
    assert "augment crop pad 2 + flip" in err  # Fashion-MNIST's default crop (28x28 images)


def test_crop_pad_flag_is_recorded(data_dir, tmp_path, capsys):
    assert cli.main(train_args(data_dir, tmp_path / "r", "--epochs", "1", "--crop-pad", "0")) == 0
    assert "augment flip," in capsys.readouterr().err
    assert read_checkpoint(tmp_path / "r" / "checkpoint.pt")["train_state"]["config"]["crop_pad"] == 0


def test_resuming_a_run_from_before_crop_pad_keeps_its_pad_of_4(data_dir, tmp_path, capsys):
    save = tmp_path / "r"
    assert cli.main(train_args(data_dir, save, "--epochs", "1")) == 0
    ckpt = torch.load(save / "checkpoint.pt", weights_only=True)
    del ckpt["train_state"]["config"]["crop_pad"]  # as an older netslim wrote it
    torch.save(ckpt, save / "checkpoint.pt")
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(save / "checkpoint.pt"), "--epochs", "2"]) == 0
    assert "augment crop pad 4 + flip" in capsys.readouterr().err
    assert read_checkpoint(save / "checkpoint.pt")["train_state"]["config"]["crop_pad"] == 4


def test_default_save_folder_and_finetune(run_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # a dense checkpoint refines like a pruned one (a pruned one carries its plan and rebuilds itself)
    assert cli.main(["finetune", "--checkpoint", str(run_dir / "model_best.pt"), "--data-dir", str(data_dir),
                     "--epochs", "1", *FAST]) == 0
    ck = torch.load(tmp_path / "runs" / "vgg11" / "finetune" / "checkpoint.pt", weights_only=True)
    assert ck["arch"]["width"] == 0.125 and ck["train_state"]["epoch"] == 1


@pytest.mark.parametrize("mode", ["slim", "mask"])
def test_finetune_a_pruned_checkpoint(run_dir, data_dir, tmp_path, mode):
    from netslim.engine.prune import prune

    model, meta = load_checkpoint(run_dir / "model_best.pt")
    pruned, _ = prune(model, 0.5, mode=mode)
    save_checkpoint(tmp_path / "pruned.pt", pruned, dataset=meta["dataset"])
    assert cli.main(["finetune", "--checkpoint", str(tmp_path / "pruned.pt"), "--data-dir", str(data_dir),
                     "--epochs", "1", "-sr", "--s", "0.01", *FAST, "--save", str(tmp_path / "ft")]) == 0
    ck = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)
    assert ck["mode"] == mode and ck["train_state"]["epoch"] == 1
    tuned, _ = load_checkpoint(tmp_path / "ft" / "checkpoint.pt")  # rebuilt from the file alone
    for name, m in tuned.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            kept = (ck["mask"] if mode == "mask" else ck["plan"]).get(name)
            if mode == "slim":
                assert m.num_features == len(kept)
            elif kept is not None:  # masked channels stayed exactly zero through SGD, wd and sparsity
                gone = sorted(set(range(m.num_features)) - set(kept))
                assert torch.all(m.weight[gone] == 0) and torch.all(m.bias[gone] == 0)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_prints_resume_line_and_resume_finishes(data_dir, tmp_path, capsys, monkeypatch, signum):
    show = cli.Progress.__call__

    def kill_in_epoch_2(self, ev):
        show(self, ev)
        if ev["event"] == "step" and ev["epoch"] == 2:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(cli.Progress, "__call__", kill_in_epoch_2)
    save = tmp_path / "r"
    assert run_main(train_args(data_dir, save, "--epochs", "3", "--log-every", "1")) == 128 + signum
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"netslim: interrupted; resume with: netslim train --resume {save / 'checkpoint.pt'}"
    assert [r["epoch"] for r in read_jsonl(save / "metrics.jsonl")] == [1]

    monkeypatch.setattr(cli.Progress, "__call__", show)
    # the checkpoint holds dataset, model, recipe and data options: --resume alone continues the run
    assert cli.main(["train", "--resume", str(save / "checkpoint.pt")]) == 0
    rows = read_jsonl(save / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["lr"] for r in rows] == pytest.approx([0.1, 0.01, 0.001])  # milestones [1, 2] kept


def test_refuses_to_overwrite_a_run(run_dir, data_dir, capsys):
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    assert run_main(train_args(data_dir, run_dir, "--epochs", "1")) == 2
    line = one_error_line(capsys)
    assert "already holds a run" in line and "--resume" in line and "--force" in line
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


@pytest.mark.parametrize("extra, says", [
    (["--epochs", "0"], "--epochs: must be at least 1"),
    (["--batch-size", "0"], "--batch-size: must be at least 1"),
    (["--s", "-0.001"], "--s/--lambda: must be >= 0"),
    (["--lr", "0"], "--lr: must be > 0"),
    (["--lr", "nan"], "--lr: must be > 0"),
    (["--epochs", "two"], "not an integer"),
    (["--amp", "fp8"], "invalid choice"),
    (["--crop-pad", "-1"], "--crop-pad: must be at least 0"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet': use one of"),
    (["--arch", "alexnet"], "unknown arch 'alexnet': use one of vgg, resnet"),
    (["--depth", "12"], "depth 12 is not valid for vgg"),
    (["--resume", "nowhere/checkpoint.pt"], "does not exist"),
])
def test_bad_flags_exit_2_with_one_line_and_write_nothing(data_dir, tmp_path, capsys, extra, says):
    assert run_main(train_args(data_dir, tmp_path / "r", *extra)) == 2
    assert says in one_error_line(capsys)
    assert not (tmp_path / "r").exists()


def test_missing_arch_and_width_on_wrong_family(data_dir, tmp_path, capsys):
    assert run_main(["train", "--dataset", "fashion-mnist", "--save", str(tmp_path / "r")]) == 2
    assert "needs --arch" in one_error_line(capsys)
    assert run_main(["train", "--dataset", "fashion-mnist", "--arch", "resnet", "--depth", "11", "--width", "0.5",
                     "--save", str(tmp_path / "r")]) == 2
    assert "--width does not apply to resnet" in one_error_line(capsys)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("channels, classes, says", [(3, 10, "1 input channel(s)"), (1, 100, "10 classes")])
def test_refine_checkpoint_that_does_not_fit_the_dataset(data_dir, tmp_path, capsys, channels, classes, says):
    ck = tmp_path / "pruned.pt"
    model = build_model("vgg", 11, num_classes=classes, in_channels=channels, width=0.125)
    save_checkpoint(ck, model, arch={"name": "vgg", "depth": 11, "num_classes": classes, "in_channels": channels,
                                     "width": 0.125}, input_size=[channels, 32, 32],
                    dataset={"name": "cifar10", "in_channels": channels, "image_size": 32,
                             "num_classes": classes, "mean": [0.5] * channels, "std": [0.25] * channels})
    assert run_main(["train", "--refine", str(ck), "--dataset", "fashion-mnist", "--data-dir", str(data_dir),
                     "--save", str(tmp_path / "ft")]) == 2
    assert says in one_error_line(capsys)
    assert not (tmp_path / "ft").exists()
    assert run_main(["eval", "--checkpoint", str(ck), "--dataset", "fashion-mnist",
                     "--data-dir", str(data_dir)]) == 2
    assert says in one_error_line(capsys)


def test_python_m_netslim_exit_codes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    bad = subprocess.run([sys.executable, "-m", "netslim", "train", "--dataset", "fashion-mnist", *MODEL,
                          "--epochs", "0", "--save", str(tmp_path / "r")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("netslim: error:")
    assert not (tmp_path / "r").exists()


def test_eval_of_a_missing_checkpoint(tmp_path, capsys):
    assert run_main(["eval", "--checkpoint", str(tmp_path / "x.pt")]) == 2
    assert "does not exist" in one_error_line(capsys)


def test_torchrun_two_processes(data_dir, tmp_path):
    """DDP on CPU (gloo): completes, the loss falls, rank 0 alone writes, the checkpoint loads."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "netslim", "train", *train_args(data_dir, tmp_path / "run", "--epochs", "3", "--lr", "0.05",
                                                 "--batch-size", "32")[1:]]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("done: best top-1") == 1 and "2 processes" in res.stderr
    # --batch-size is global, as in the seed's one-GPU recipe: 2 processes take 16 images each per step
    assert "global batch 32 (16 per process)" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt", "config.toml", "metrics.jsonl",
                                                                     "model_best.pt"]
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["train_state"]["world_size"] == 2 and len(ck["train_state"]["rng_per_rank"]) == 2
    model, _ = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert not any(k.startswith("module.") for k in model.state_dict())


def test_torchrun_pipeline_two_processes(data_dir, tmp_path):
    """The whole pipeline under torchrun (gloo): every stage done once, one report, loadable files."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    save = tmp_path / "pipe"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "netslim", "pipeline", "--save", str(save), "--data-dir", str(data_dir),
           "--arch", "vgg", "--depth", "11", "--width", "0.125", "--epochs", "2", "--batch-size", "32",
           "--lr", "0.05", "--train-subset", "192", "--percent", "0.5", "--seed", "0", "--device", "cpu",
           "--latency-seconds", "0.02"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("Fine-tune (50%)") == 1  # rank 0 alone prints the table
    names = {p.name for p in save.iterdir()}
    assert {"baseline", "sparsity", "prune-50", "finetune-50", "pipeline.json", "results.md",
            "results.json"} <= names and not any(n.endswith(".tmp") for n in names)
    for stage in ("baseline", "sparsity", "finetune-50"):
        ck = torch.load(save / stage / "checkpoint.pt", weights_only=True)
        assert ck["train_state"]["world_size"] == 2
        rows = read_jsonl(save / stage / "metrics.jsonl")
        assert [r["epoch"] for r in rows] == [1, 2]  # written once, by rank 0
    assert read_jsonl(save / "baseline" / "metrics.jsonl")[-1]["train_loss"] < \
        read_jsonl(save / "baseline" / "metrics.jsonl")[0]["train_loss"]
    pruned, meta = load_checkpoint(save / "finetune-50" / "model_best.pt")
    assert count(pruned, (1, 32, 32))["params"] < count(load_checkpoint(save / "baseline" / "model_best.pt")[0],
                                                        (1, 32, 32))["params"]
    results = json.loads((save / "results.json").read_text())
    assert [r["key"] for r in results["stages"]] == ["baseline", "sparsity", "prune-50", "finetune-50"]
    assert results["complete"]
    # re-running resumes nothing: every stage is done
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.count("already done") == 4, res.stderr[-2000:]


def _torchrun(args: list[str], cwd: Path, timeout: int = 120, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **env}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "netslim", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


def test_torchrun_batch_that_does_not_split_is_one_line(data_dir, tmp_path):
    res = _torchrun(train_args(data_dir, tmp_path / "run", "--epochs", "1", "--batch-size", "33"), tmp_path)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.startswith("netslim: error:")]
    assert lines == ["netslim: error: --batch-size 33 does not split evenly over 2 processes: the batch is "
                     "global, use a multiple of 2"], res.stderr[-2000:]
    # torchrun itself reports the failed children with a traceback of its own; netslim's code shows none
    frames = [line for line in res.stderr.splitlines() if line.strip().startswith("File ")]
    assert not [f for f in frames if "netslim" in f], frames
    assert not (tmp_path / "run").exists()


def test_torchrun_downloads_once_per_node(tmp_path):
    """Two ranks on one node, --download into an empty folder: local rank 0 alone fetches while
    the other waits; its error (here: a mirror whose file fails the md5 check) stops both ranks."""
    mirror = tmp_path / "mirror" / "fashion-mnist"
    mirror.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (mirror / name).write_bytes(b"not the official file")
    res = _torchrun(["-v", "train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"), "--download",
                     *MODEL, "--epochs", "1", "--device", "cpu", "--save", str(tmp_path / "run")], tmp_path,
                    NETSLIM_MIRROR=mirror.parent.as_uri())
    assert res.returncode != 0
    fetched = [line for line in res.stderr.splitlines() if "downloading" in line]
    assert len(fetched) == 1, res.stderr[-2000:]  # without the per-node wait both ranks fetch at once
    errors = [line for line in res.stderr.splitlines() if line.startswith("netslim: error:")]
    assert len(errors) == 1 and "checksum mismatch" in errors[0]
    assert not (tmp_path / "run").exists()
