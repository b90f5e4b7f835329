"""The README's library example runs as written: documentation that drifts is a bug."""
from __future__ import annotations

import re
from pathlib import Path

import torch

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
