"""Users who keep their own loop: the guide's example (one process and DDP), fit() with the
user's optimizer / loss / loaders, SparsityCallback, and the library covering every command."""
from __future__ import annotations

import argparse
import inspect
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import netslim
from netslim import cli
from netslim.data import normalize
from netslim.fileio import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "own_loop.py"


def _example_output(out: str) -> dict:
    fine = next(line for line in out.splitlines() if line.startswith("fine-tuned:"))
    return {"tuned": float(fine.split("top-1 ")[1].split("%")[0]),
            "reloaded": float(fine.rsplit("top-1 ", 1)[1].split("%")[0])}


def test_own_loop_example_one_process(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["own_loop.py", "--epochs", "1", "--train-subset", "256",
                                      "--data-dir", str(data_dir), "--save", str(tmp_path / "out")])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    got = _example_output(out)
    assert "sparsity training: top-1" in out and "before fine-tuning" in out
    assert got["tuned"] == got["reloaded"]  # the saved file rebuilds the fine-tuned slim model
    assert (tmp_path / "out" / "slim.pt").exists()
    before, after = (int(v.replace(",", "")) for v in out.split("params ")[1].split(", FLOPs")[0].split(" -> "))
    assert after < before


def test_own_loop_example_under_torchrun_ddp(data_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(EXAMPLE), "--epochs", "1", "--train-subset", "256", "--data-dir", str(data_dir),
                          "--save", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("fine-tuned: top-1") == 1  # rank 0 reports and saves
    got = _example_output(res.stdout)
    assert got["tuned"] == got["reloaded"]


def _float_batches(bundle, batch_size: int, train: bool) -> DataLoader:
    x, y = (bundle.train_x, bundle.train_y) if train else (bundle.test_x, bundle.test_y)
    return DataLoader(TensorDataset(normalize(x, bundle.spec), y), batch_size=batch_size, shuffle=train)


def test_fit_takes_the_users_optimizer_loss_and_loaders(data_dir, tmp_path):
    bundle = netslim.load_dataset("fashion-mnist", data_dir=data_dir, train_subset=256)
    torch.manual_seed(0)
    model = netslim.build_model("vgg", depth=11, width=0.125, num_classes=10, in_channels=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    calls = []

    def smoothed(out, y):
        calls.append(len(y))
        return F.cross_entropy(out, y, label_smoothing=0.1)

    cfg = netslim.TrainConfig(epochs=3, sr=True, s=1e-3, schedule="cosine", device="cpu", amp="off", seed=0)
    summary = netslim.fit(model, None, cfg, tmp_path / "run", optimizer=optimizer, loss_fn=smoothed,
                          train_loader=_float_batches(bundle, 64, True),
                          test_loader=_float_batches(bundle, 128, False))
    assert len(calls) == 3 * 4 and sum(calls) == 3 * 256  # every batch of every epoch, through the user's loss
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and summary["epochs"] == 3
    # the cosine schedule ran on the user's optimizer, from its own lr (3e-3, not cfg.lr 0.1)
    assert rows[0]["lr"] == pytest.approx(3e-3 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 3 / 12)).item()))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["train_state"]["optimizer"]
    assert "exp_avg" in state["state"][0]  # Adam's, saved for --resume
    with pytest.raises(netslim.ConfigError, match="needs a length"):
        netslim.fit(model, None, cfg, None, train_loader=(b for b in _float_batches(bundle, 64, True)),
                    test_loader=_float_batches(bundle, 128, False))


def test_sparsity_callback_unscales_fp16_gradients_first():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    x = torch.randn(8, 1, 6, 6)
    model(x)
    reference = [p.detach().clone() for p in model.parameters()]

    def grads_after(scaler) -> torch.Tensor:
        with torch.no_grad():
            for p, r in zip(model.parameters(), reference):
                p.copy_(r)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.zero_grad()
        loss = model(x).square().mean()
        (scaler.scale(loss) if scaler else loss).backward()
        sparsity = netslim.SparsityCallback(model, 0.01, scaler=scaler)
        sparsity(opt)
        return model[1].weight.grad.clone()

    plain = grads_after(None)
    scaled = grads_after(torch.amp.GradScaler("cpu", init_scale=1024.0))
    torch.testing.assert_close(scaled, plain)  # the L1 term was added to true-unit gradients
    with pytest.raises(ValueError, match="call sparsity\\(optimizer\\)"):
        netslim.SparsityCallback(model, 0.01, scaler=torch.amp.GradScaler("cpu"))()


# The library function behind each command: same names, same defaults.
COUNTERPARTS = {
    "train": (netslim.fit, netslim.TrainConfig), "finetune": (netslim.fit, netslim.TrainConfig),
    "eval": (netslim.evaluate,), "prune": (netslim.prune,), "profile": (netslim.profile,),
    "export": (netslim.export_onnx, netslim.export_torchscript),
    "pipeline": (netslim.run_pipeline, netslim.preset_config, netslim.PipelineConfig),
}


# Where a default differs on purpose: the library leaves the device to the caller's model and
# tensors (evaluate: the model's device; profile: the CPU unless told), while the command line
# has no model in hand yet and picks the GPU when there is one.
DIFFERENT_ON_PURPOSE = {("eval", "device"), ("profile", "device")}


def _library_defaults(fn) -> dict:
    if inspect.isclass(fn):  # a config dataclass: its fields
        return {f.name: f.default for f in fn.__dataclass_fields__.values()}
    return {n: p.default for n, p in inspect.signature(fn).parameters.items()}


def test_every_command_has_a_library_counterpart_with_the_same_defaults():
    parser = cli.build_parser()
    assert set(parser.commands) == set(COUNTERPARTS)
    for command, fns in COUNTERPARTS.items():
        for fn in fns:
            assert getattr(netslim, fn.__name__) is fn and fn.__name__ in netslim.__all__
        library = {}
        for fn in fns:
            library.update(_library_defaults(fn))
        shared = 0
        for action in parser.commands[command]._actions:
            no_default = action.default is None or action.default == argparse.SUPPRESS  # (--threads: the global's)
            if (action.dest not in library or no_default or action.dest in ("help", "config")
                    or (command, action.dest) in DIFFERENT_ON_PURPOSE):
                continue
            want = library[action.dest]
            got = action.default
            if isinstance(want, tuple):
                got = tuple(got) if isinstance(got, list) else got
            if want is inspect.Parameter.empty:
                continue
            assert got == want, f"netslim {command} --{action.dest}: CLI default {got!r}, library {want!r}"
            shared += 1
        assert command in ("train", "finetune", "export") or shared, command


def test_train_flags_are_train_config_fields():
    """train's recipe flags default to None ("not given") and resolve to TrainConfig's defaults:
    each must name a TrainConfig field, or the flag would be dropped on the way."""
    fields = set(netslim.TrainConfig.__dataclass_fields__)
    assert set(cli._RECIPE_FLAGS) <= fields
    dests = {a.dest for a in cli.build_parser().commands["train"]._actions}
    assert set(cli._RECIPE_FLAGS) <= dests
