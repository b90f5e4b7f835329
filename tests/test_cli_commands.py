"""`netslim prune / profile / export / pipeline` end to end on tiny real-format data."""
import json
import sys

import pytest
import torch

import netslim
from netslim import cli
from netslim.checkpoint import load_checkpoint
from netslim.profile import count
from netslim.provenance import provenance

MODEL = ["--arch", "vgg", "--depth", "11", "--width", "0.125"]


def run(argv):
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    save = tmp_path_factory.mktemp("run") / "sparsity"
    code = run(["train", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), *MODEL, "--epochs", "1",
                "--train-subset", "256", "-sr", "--s", "1e-3", "--seed", "0", "--save", str(save)])
    assert code == 0
    return save / "model_best.pt"


def test_prune_writes_checkpoint_and_report(trained, data_dir, tmp_path, capsys):
    out = tmp_path / "p50"
    assert run(["prune", "--checkpoint", str(trained), "--percent", "0.5", "--save", str(out),
                "--data-dir", str(data_dir)]) == 0
    printed = capsys.readouterr().out
    assert "threshold" in printed and "top-1 right after pruning" in printed
    report = json.loads((out / "prune.json").read_text())
    model, meta = load_checkpoint(out / "pruned.pt")
    assert meta["mode"] == "slim"
    assert report["after"] == count(model, (1, 32, 32))
    assert torch.load(out / "pruned.pt", weights_only=True)["metrics"]["top1"] == report["top1"]
    # refuses to overwrite, then --force replaces
    assert run(["prune", "--checkpoint", str(trained), "--percent", "0.5", "--save", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert run(["prune", "--checkpoint", str(trained), "--percent", "0.6", "--save", str(out), "--force",
                "--no-eval", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["percent"] == 0.6


@pytest.mark.parametrize("argv, says", [
    (["--percent", "1.0"], "in [0, 1)"),
    (["--percent", "abc"], "not a number"),
    (["--percent", "-0.1"], "in [0, 1)"),
    (["--percent", "0.5", "--min-channels", "0"], "at least 1"),
])
def test_prune_bad_flags(trained, tmp_path, capsys, argv, says):
    assert run(["prune", "--checkpoint", str(trained), "--save", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_mask_prune_profile_and_finetune(trained, data_dir, tmp_path, capsys):
    out = tmp_path / "m"
    assert run(["prune", "--checkpoint", str(trained), "--percent", "0.95", "--mode", "mask",
                "--save", str(out), "--no-eval"]) == 0
    assert "effective" in capsys.readouterr().out
    assert run(["profile", "--checkpoint", str(out / "pruned.pt"), "--json", "--batch-sizes", "1,4"]) == 0
    prof = json.loads(capsys.readouterr().out)
    assert prof["mode"] == "mask" and prof["effective"]["params"] < prof["params"]
    assert set(prof["latency_ms"]) == {"1", "4"} or set(prof["latency_ms"]) == {1, 4}
    assert run(["finetune", "--checkpoint", str(out / "pruned.pt"), "--data-dir", str(data_dir),
                "--epochs", "1", "--train-subset", "128", "--save", str(tmp_path / "ft")]) == 0
    model, meta = load_checkpoint(tmp_path / "ft" / "model_best.pt")
    for name, kept in meta["mask"].items():
        bn = model.get_submodule(name)
        gone = torch.ones(bn.num_features, dtype=torch.bool)
        gone[kept] = False
        assert torch.all(bn.weight[gone] == 0) and torch.all(bn.bias[gone] == 0)


def test_profile_an_architecture(capsys):
    assert run(["profile", "--arch", "vgg", "--depth", "13", "--dataset", "cifar10", "--no-latency"]) == 0
    out = capsys.readouterr().out
    assert "9,413,066" in out and "0.46G" in out
    # the seed's initialisation: every BN factor 0.5
    assert "BN |gamma| (2,944 factors): median 0.5 (10%-90% 0.5-0.5); < 0.01 0.0%" in out


def test_profile_optimized(trained, tmp_path, capsys):
    out = tmp_path / "p50"
    assert run(["prune", "--checkpoint", str(trained), "--percent", "0.5", "--save", str(out)]) == 0
    capsys.readouterr()
    assert run(["profile", "--checkpoint", str(out / "pruned.pt"), "--batch-sizes", "1,16", "--optimized",
                "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(result["latency_optimized_ms"]) == sorted(result["latency_ms"]) == ["1", "16"]
    assert all(ms > 0 for ms in result["latency_optimized_ms"].values())
    assert run(["profile", "--checkpoint", str(out / "pruned.pt"), "--batch-sizes", "16", "--optimized"]) == 0
    assert "latency batch 16, optimized for inference" in capsys.readouterr().out


def test_export(trained, tmp_path, capsys):
    onnx_path, ts_path = tmp_path / "m.onnx", tmp_path / "m.ts"
    assert run(["export", "--checkpoint", str(trained), "--onnx", str(onnx_path), "--torchscript", str(ts_path)]) == 0
    assert onnx_path.stat().st_size > 0
    # checked against onnxruntime (a test extra), not merely written
    assert "onnxruntime max |difference|" in capsys.readouterr().out
    model, _ = load_checkpoint(trained)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(ts_path))(x), model(x))


def test_export_without_onnx_writes_nothing(trained, tmp_path, capsys, monkeypatch):
    """A missing onnx is found before anything is written: not even the TorchScript file asked
    for first. (`sys.modules[name] = None` makes `import onnx` fail as an absent package does.)"""
    monkeypatch.setitem(sys.modules, "onnx", None)
    onnx_path, ts_path = tmp_path / "m.onnx", tmp_path / "m.ts"
    assert run(["export", "--checkpoint", str(trained), "--onnx", str(onnx_path), "--torchscript", str(ts_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("netslim: error: ") and "pip install netslim[onnx]" in err
    assert list(tmp_path.iterdir()) == []


def test_pipeline_command(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NETSLIM_CACHE", str(tmp_path / "cache"))
    save = tmp_path / "pipe"
    argv = ["pipeline", "--save", str(save), "--data-dir", str(data_dir), *MODEL, "--epochs", "1",
            "--train-subset", "128", "--percent", "0.5", "--latency-seconds", "0.05",
            "--round-to", "auto", "--runtime", "onnxruntime"]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "Baseline" in out and "Fine-tune (50%)" in out
    assert (save / "results.md").exists() and (save / "results.json").exists()
    # every figure is tied to the code: the report's writer, and each stage's trainer / pruner
    results = json.loads((save / "results.json").read_text())
    assert results["netslim"] == provenance() and results["netslim"]["version"] == netslim.__version__
    assert [r["netslim"] for r in results["stages"]] == [provenance()] * 4
    # --round-to auto measured the widths in the runtime asked for
    assert json.loads((save / "prune-50" / "prune.json").read_text())["round_to"] == "auto"
    assert all("|onnxruntime|" in key for key in json.loads((tmp_path / "cache" / "widths.json").read_text()))
    assert run(argv) == 0  # re-run: everything already done
    assert "already done" in capsys.readouterr().out
    # the written configuration is this run's: repeated from it, every stage is found done
    # (pipeline.json refuses a run_dir whose settings differ)
    assert run(["pipeline", "--config", str(save / "config.toml"), "--save", str(save)]) == 0
    assert capsys.readouterr().out.count("already done") == 4
    assert run(["pipeline", "--preset", "nope"]) == 2


def test_imagefolder_train_prune_finetune_eval(tmp_path, capsys):
    """An image folder at --image-size 40 end to end; later commands find the data themselves."""
    import numpy as np
    from PIL import Image
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(6):
                img = (rng.random((50, 60, 3)) * 255).astype("uint8")
                Image.fromarray(img).save(root / split / f"c{c}" / f"{i}.png")
    arch = ["--arch", "resnet-cifar", "--depth", "8", "--epochs", "1", "--batch-size", "4"]
    assert run(["train", "--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "40", *arch,
                "--save", str(tmp_path / "run")]) == 0
    assert run(["prune", "--checkpoint", str(tmp_path / "run" / "model_best.pt"), "--percent", "0.5",
                "--save", str(tmp_path / "p")]) == 0
    assert "top-1 right after pruning" in capsys.readouterr().out
    assert run(["finetune", "--checkpoint", str(tmp_path / "p" / "pruned.pt"), "--epochs", "1", "--batch-size", "4",
                "--save", str(tmp_path / "ft")]) == 0
    assert run(["eval", "--checkpoint", str(tmp_path / "ft" / "model_best.pt")]) == 0
    assert "on imagefolder test, 12 images" in capsys.readouterr().out
    _, meta = load_checkpoint(tmp_path / "ft" / "model_best.pt")
    assert meta["input_size"] == [3, 40, 40]


def test_imagefolder_val_split(tmp_path, capsys):
    """A flat folder of class sub-folders: --val-split holds out a fraction; eval reuses it."""
    import numpy as np
    from PIL import Image
    root = tmp_path / "flat"
    rng = np.random.default_rng(1)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(10):
            Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(root / f"c{c}" / f"{i}.png")
    assert run(["train", "--dataset", "imagefolder", "--data-dir", str(root), "--val-split", "0.4",
                "--arch", "resnet-cifar", "--depth", "8", "--epochs", "1", "--batch-size", "4",
                "--save", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert run(["eval", "--checkpoint", str(tmp_path / "run" / "model_best.pt")]) == 0
    assert "on imagefolder test, 8 images" in capsys.readouterr().out


@pytest.mark.parametrize("flags, want_s", [
    (["--s", "auto", "--target-sparsity", "0.5"], None),                  # the autopilot's choice
    (["--s", "1e-3", "--s-schedule", "linear-decay"], [1e-3, 5e-4]),       # to 0 at the end
])
def test_pipeline_passes_the_s_settings_to_its_sparsity_stage(data_dir, tmp_path, capsys, flags, want_s):
    save = tmp_path / "pipe"
    argv = ["pipeline", "--save", str(save), "--data-dir", str(data_dir), *MODEL, "--epochs", "1",
            "--sparsity-epochs", "2", "--train-subset", "128", "--percent", "0.5", "--latency-seconds", "0.01",
            "--quiet", *flags]
    assert run(argv) == 0
    sparsity = [json.loads(line) for line in (save / "sparsity" / "metrics.jsonl").read_text().splitlines()]
    cfg = torch.load(save / "sparsity" / "checkpoint.pt", weights_only=True)["train_state"]["config"]
    if want_s is None:
        assert cfg["s"] == "auto" and cfg["target_sparsity"] == 0.5
        assert sparsity[1]["s"] == pytest.approx(sparsity[0]["s_next"])   # the controller set epoch 2's s
        md = (save / "results.md").read_text()
        assert "Sparsity (s auto)" in capsys.readouterr().out
        assert "s auto, target 50% of |gamma| under 1e-2. s at the start of each epoch" in md
    else:
        assert cfg["s_schedule"] == "linear-decay"
        assert [r["s"] for r in sparsity] == pytest.approx(want_s)
    # the written configuration repeats the run: every stage is found done
    assert run(["pipeline", "--config", str(save / "config.toml"), "--save", str(save)]) == 0
    assert capsys.readouterr().out.count("already done") == 4


@pytest.mark.parametrize("flags, says", [
    (["--s", "auto"], "--s auto needs --target-sparsity Q"),
    (["--s", "auto", "--target-sparsity", "0.5", "--s-schedule", "step-decay"], "does not apply to --s auto"),
    (["--target-sparsity", "0.5"], "--target-sparsity goes with --s auto"),
])
def test_pipeline_refuses_s_settings_that_do_not_go_together(tmp_path, capsys, flags, says):
    assert run(["pipeline", "--save", str(tmp_path / "pipe"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err
    assert not (tmp_path / "pipe").exists()
