"""The examples run end to end (on the tiny Fashion-MNIST files) and say what they claim."""
import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_slim_your_own_cnn(data_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["slim_your_own_cnn.py", "--epochs", "1", "--train-subset", "256",
                                      "--data-dir", str(data_dir), "--percent", "0.6"])
    runpy.run_path(str(EXAMPLES / "slim_your_own_cnn.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "sparsity training: top-1" in out and "fine-tuned: top-1" in out
    gap = float(out.split("max |difference| ")[1].split(";")[0])
    assert gap < 1e-4  # the slim model computes what the masked model computes
    grouped = out.split("grouped convs (in, out, groups): ")[1].splitlines()[0]
    for triple in grouped.split("), ("):
        i, o, g = (int(v) for v in triple.strip("()").split(", "))
        assert i % g == 0 and o % g == 0 and g == 4  # groups kept, every group the same width


def test_detector_own_loop(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["detector_own_loop.py", "--steps", "6", "--percent", "0.5"])
    runpy.run_path(str(EXAMPLES / "detector_own_loop.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "sparsity training: loss" in out and "fine-tuned: loss" in out
    gap = float(out.split("max |difference| ")[1].split()[0])
    assert gap < 1e-4  # the slim detector computes what the masked one computes
    assert "head output channels: [4, 4, 4, 2, 2, 2]" in out or "head output channels: [4, 2, 4, 2, 4, 2]" in out
