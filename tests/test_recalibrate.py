"""BN recalibration: running statistics re-measured on batches, nothing else changed."""
import json

import torch
from torch import nn

from netslim import cli, recalibrate_bn
from test_cli_commands import run, trained  # noqa: F401  (the module's tiny sparsity-trained model)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)).eval()


def test_running_stats_become_the_cumulative_average_of_the_batches():
    model = _net()
    model[1].momentum = 0.3
    batches = [torch.randn(5, 3, 6, 6) + i for i in range(3)]
    params = [p.detach().clone() for p in model.parameters()]
    assert recalibrate_bn(model, iter(batches)) == 3
    with torch.no_grad():
        feats = [model[0](x) for x in batches]
    means = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats])
    variances = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats])
    torch.testing.assert_close(model[1].running_mean, means.mean(0))
    torch.testing.assert_close(model[1].running_var, variances.mean(0))
    assert model[1].momentum == 0.3 and not model.training and not model[3].training
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))  # no gradient step


def test_no_batches_keeps_the_old_statistics_and_limit_counts():
    model = _net()
    before = model[1].running_mean.clone()
    assert recalibrate_bn(model, iter([])) == 0
    assert torch.equal(model[1].running_mean, before)
    assert recalibrate_bn(model, (torch.randn(2, 3, 6, 6) for _ in range(10)), limit=4) == 4


def test_prune_recalibrate_reports_top1_before_and_after(trained, data_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "p50"
    assert run(["prune", "--checkpoint", str(trained), "--percent", "0.5", "--save", str(out),
                "--data-dir", str(data_dir), "--recalibrate", "2"]) == 0
    printed = capsys.readouterr().out
    assert "after BN recalibration on 2 batches" in printed
    report = json.loads((out / "prune.json").read_text())
    recal = report["recalibration"]
    assert recal["batches"] == 2 and report["top1"] == recal["top1_after"]
    assert recal["top1_before"] is not None


def test_prune_recalibrate_without_data_is_one_line_error(trained, tmp_path, capsys):  # noqa: F811
    code = run(["prune", "--checkpoint", str(trained), "--percent", "0.5", "--save", str(tmp_path / "x"),
                "--data-dir", str(tmp_path / "nowhere"), "--recalibrate", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("netslim: error:") and len(err.splitlines()) == 1
