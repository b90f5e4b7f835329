"""Budgets (target_flops / target_params), the coupled-group scoring rules, and the note
when what was removed differs from what was asked by more than 10 points."""
from __future__ import annotations

import json

import pytest
import torch

import netslim
from netslim import cli
from netslim.errors import ConfigError, PruneError
from netslim.engine.prune import prune
from test_zoo import build, skew_bn

X = torch.randn(1, 3, 32, 32)


@pytest.mark.parametrize("name, key, fraction", [
    ("resnet18-basic", "flops", 0.5), ("mobilenet-v2", "params", 0.3), ("vgg11", "flops", 0.25)])
def test_budget_lands_within_2_percent_below(name, key, fraction):
    model = build(name)
    slim, report = prune(model, **{f"target_{key}": fraction}, example_input=X)
    reached = report["after"][key] / report["before"][key]
    assert fraction - 0.02 <= reached <= fraction
    assert report["budget"]["reached"] == reached and report["budget"]["within_tolerance"]
    # the percent it reports is the one that gets there
    _, again = prune(model, report["percent"], example_input=X)
    assert again["after"] == report["after"]


def test_budget_errors():
    model = build("resnet18-basic")
    with pytest.raises(PruneError, match="ask for at least"):  # min_channels keeps more than that
        prune(model, target_params=0.001, example_input=X)
    with pytest.raises(ConfigError, match="needs percent"):
        prune(model, example_input=X)
    with pytest.raises(ConfigError, match="not both"):
        prune(model, 0.5, target_flops=0.5, example_input=X)
    with pytest.raises(ConfigError, match="not both"):
        prune(model, target_params=0.5, target_flops=0.5, example_input=X)
    with pytest.raises(ConfigError, match="fraction in"):
        prune(model, target_flops=1.5, example_input=X)
    _, report = prune(model, target_flops=1.0, example_input=X)  # the dense model fits
    assert report["percent"] == 0 and report["channels_kept"] == report["channels_total"]


@pytest.mark.parametrize("name", ["deep-residual-stack", "mobilenet-v2", "resnext29"])
def test_default_group_score_honours_the_percent_on_coupled_models(name):
    model = build(name)
    for percent in (0.3, 0.5, 0.7):
        _, report = prune(model, percent, example_input=X)
        assert report["group_score"] == "mean"
        assert abs(report["removed_share"] - percent) <= 0.1, (percent, report["removed_share"])
        assert report["shortfall"] is None
    _, strict = prune(model, 0.7, group_score="strict", example_input=X)
    assert strict["removed_share"] < 0.6
    assert "group_score 'strict'" in strict["shortfall"]


def test_every_rule_is_the_seeds_rule_without_coupled_groups():
    """VGG has no coupled groups: every scoring rule keeps exactly the channels above the
    seed's threshold (|gamma| sorted, element int(n * percent))."""
    model = build("vgg11")
    gammas = torch.cat([m.weight.detach().abs() for m in model.modules()
                        if isinstance(m, torch.nn.BatchNorm2d)])
    threshold = gammas.sort().values[int(gammas.numel() * 0.6)]
    seed_kept = int((gammas > threshold).sum())
    plans = set()
    for rule in ("mean", "max", "sum", "strict"):
        slim, report = prune(model, 0.6, group_score=rule, example_input=X)
        assert report["channels_kept"] == seed_kept
        plans.add(json.dumps(slim.netslim_meta["plan"], sort_keys=True))
    assert len(plans) == 1


def test_cli_budget_and_shortfall_note(tmp_path, capsys):
    model = skew_bn(netslim.build_model("resnet-cifar", depth=8, num_classes=10))
    ckpt = tmp_path / "dense.pt"
    netslim.save_checkpoint(ckpt, model, arch={"name": "resnet-cifar", "depth": 8, "num_classes": 10},
                            input_size=[3, 32, 32])
    assert cli.main(["prune", "--checkpoint", str(ckpt), "--target-flops", "0.5", "--no-eval",
                     "--save", str(tmp_path / "f50")]) == 0
    out = capsys.readouterr().out
    assert "target flops 50.0% of the dense model: reached" in out
    report = json.loads((tmp_path / "f50" / "prune.json").read_text())
    assert 0.48 <= report["effective"]["flops"] / report["before"]["flops"] <= 0.5
    assert cli.main(["prune", "--checkpoint", str(ckpt), "--percent", "0.7", "--group-score", "strict",
                     "--no-eval", "--save", str(tmp_path / "strict")]) == 0
    assert "note: removed" in capsys.readouterr().out
    # --percent and a target together: one line, exit 2
    with pytest.raises(SystemExit) as e:
        cli.main(["prune", "--checkpoint", str(ckpt), "--percent", "0.5", "--target-flops", "0.5"])
    assert e.value.code == 2
    assert "give --percent" in capsys.readouterr().err


def test_shortfall_names_the_same_reason_whatever_the_hash_seed():
    """Of reasons given equally often, the note names the first one seen (it took a set's
    order, which changed with PYTHONHASHSEED: the same prune gave two different reports)."""
    from netslim.engine.plan import explain_shortfall

    reasons = {f"bn{k}": f"reason {k}" for k in range(20)}  # each reason once: a 20-way tie
    report = {"percent": 0.5, "removed_share": 0.0, "unprunable": reasons, "group_score": "mean"}
    assert "(0 channels, e.g. bn0: reason 0)" in explain_shortfall(report, [], {})
