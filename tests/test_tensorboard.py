"""--tensorboard / log = ["tensorboard"]: event files read back with tensorboard's own reader."""
from __future__ import annotations

import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from netslim import cli
from netslim.fileio import read_jsonl

from test_cli_train import one_error_line, run_main, train_args


def test_event_files_hold_the_metrics_and_a_gamma_histogram_per_epoch(data_dir, tmp_path):
    conf = tmp_path / "run.toml"
    conf.write_text('log = ["tensorboard"]\n')
    save = tmp_path / "r"
    assert cli.main(train_args(data_dir, save, "--epochs", "2", "-sr", "--s", "1e-3", "--config", str(conf))) == 0
    events = EventAccumulator(str(save / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    rows = read_jsonl(save / "metrics.jsonl")  # metrics.jsonl stays, and the two agree
    for tag, key in (("test/top1", "test_top1"), ("train/loss", "train_loss"), ("lr", "lr"),
                     ("sparsity/sum_abs_gamma", "sum_abs_gamma"),
                     ("sparsity/frac_gamma_below_1e-2", "frac_gamma_below_1e-2")):
        got = events.Scalars(tag)
        assert [e.step for e in got] == [1, 2], tag
        assert [e.value for e in got] == pytest.approx([r[key] for r in rows], rel=1e-6), tag
    assert all(e.value > 0 for e in events.Scalars("speed/step_seconds"))
    hist = events.Histograms("sparsity/abs_gamma")
    assert [h.step for h in hist] == [1, 2]
    n_gammas = hist[0].histogram_value.num
    assert n_gammas > 0 and hist[-1].histogram_value.sum == pytest.approx(rows[-1]["sum_abs_gamma"], rel=1e-4)


def test_without_the_package_it_is_one_line_and_nothing_is_written(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what an install without it raises
    assert run_main(train_args(data_dir, tmp_path / "r", "--epochs", "1", "--tensorboard")) == 2
    assert "pip install 'netslim[tensorboard]'" in one_error_line(capsys)
    assert not (tmp_path / "r").exists()
