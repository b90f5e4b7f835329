"""Sparsity autopilot: per-epoch pruning forecast, --s auto controller, s schedules, warnings."""
import json

import pytest
import torch

from netslim.autopilot import SparsityController, s_for_epoch, sparsity_warnings
from netslim.checkpoint import load_checkpoint
from netslim.engine.prune import prune
from test_cli_commands import MODEL, run


def test_s_schedules():
    assert [s_for_epoch(1.0, "constant", e, 4, [2, 3]) for e in range(4)] == [1.0] * 4
    assert [s_for_epoch(1.0, "linear-decay", e, 4, [2, 3]) for e in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [s_for_epoch(1.0, "step-decay", e, 4, [2, 3]) for e in range(4)] == pytest.approx([1, 1, 0.1, 0.01])


def test_controller_raises_s_when_behind_lowers_it_when_ahead_and_caps_it():
    c = SparsityController(target=0.5, epoch_lrs=[0.1] * 4, s=1e-4)
    assert c.update(1, 0.0) == pytest.approx(2e-4)            # planned 0.125, none yet: doubled
    assert c.update(2, 0.25) == pytest.approx(2e-4)           # on plan: unchanged
    assert c.update(3, 0.6) == pytest.approx(1e-4)            # ahead: halved
    fast = SparsityController(target=0.5, epoch_lrs=[0.1, 0.1], s=5e-3)
    assert fast.update(1, 0.0) == fast.max_s(1) == pytest.approx(1e-2)   # lr * s stays under 1e-3
    # the plan follows the L1 budget (sum of lr): with the step schedule it is almost spent by the decay
    step = SparsityController(target=0.5, epoch_lrs=[0.1, 0.1, 0.01, 0.001], s=1e-4)
    assert step.planned[1] == pytest.approx(0.5 * 0.2 / 0.211)
    assert step.max_s(2) == pytest.approx(0.1)                # a smaller lr allows a larger s


def test_warnings_name_what_defeats_the_penalty():
    assert sparsity_warnings(1e-4, 1e-4) == []
    assert "weight decay" in sparsity_warnings(1e-5, 5e-4)[0]
    adam = torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    assert "Adam" in sparsity_warnings(1e-4, 0, adam)[0]
    assert "clip" in sparsity_warnings(1e-4, 0, clips_gradients=True)[0]


def test_auto_s_logs_its_trajectory_and_a_forecast_that_prune_agrees_with(data_dir, tmp_path, capsys):
    save = tmp_path / "auto"
    assert run(["train", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), *MODEL, "--epochs", "2",
                "--train-subset", "256", "-sr", "--s", "auto", "--target-sparsity", "0.5", "--seed", "0",
                "--save", str(save)]) == 0
    out = capsys.readouterr().out
    assert "sparsity: s" in out and "pruning 50% now: threshold" in out
    history = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert history[1]["s"] == history[0]["s_next"]                      # the controller's s is the one used
    assert all(isinstance(r["s_within_epoch"], list) for r in history)   # and its updates inside each epoch
    last = history[-1]["forecast"]
    model, meta = load_checkpoint(save / "checkpoint.pt")
    _, report = prune(model, 0.5, compensate=False)
    assert last["threshold"] == report["threshold"]
    assert last["flops_left"] == pytest.approx(report["after"]["flops"] / report["before"]["flops"])
    state = torch.load(save / "checkpoint.pt", weights_only=True)["train_state"]
    assert state["s_current"] == history[-1]["s_next"]                   # a resume continues the controller


@pytest.mark.parametrize("argv, says", [
    (["-sr", "--s", "auto"], "--s auto needs --target-sparsity"),
    (["-sr", "--s", "1e-4", "--target-sparsity", "0.5"], "goes with --s auto"),
    (["-sr", "--s", "auto", "--target-sparsity", "0.5", "--s-schedule", "linear-decay"], "does not apply"),
])
def test_autopilot_flag_errors_are_one_line(data_dir, tmp_path, capsys, argv, says):
    code = run(["train", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), *MODEL, "--epochs", "1",
                *argv, "--save", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and says in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x" / "checkpoint.pt").exists()


def test_forecast_counts_the_blocks_prune_will_remove():
    from netslim.autopilot import SparsityForecast
    from test_blocks import CASES, with_dead_branches

    factory, dead = CASES["post-activation bottleneck"]
    model = with_dead_branches(factory, dead)
    x = torch.zeros(1, 3, 32, 32)
    forecast = SparsityForecast(model, x, 0.5)(model)
    _, report = prune(model, 0.5, example_input=x, compensate=False)
    assert forecast["removed_blocks"] == [b["block"] for b in report["removed_blocks"]] == ["layers.1"]
    assert forecast["flops_left"] == pytest.approx(report["after"]["flops"] / report["before"]["flops"])
    assert forecast["params_left"] == pytest.approx(report["after"]["params"] / report["before"]["params"])
    import copy
    assert SparsityForecast(model, x, 0.5)(copy.deepcopy(model))["removed_blocks"] == ["layers.1"]  # any model given
    kept = SparsityForecast(model, x, 0.5, remove_blocks=False)(model)
    assert kept["removed_blocks"] == [] and kept["flops_left"] > forecast["flops_left"]


def test_controller_follows_its_plan_inside_an_epoch():
    c = SparsityController(target=0.5, epoch_lrs=[0.1, 0.1, 0.01, 0.001], s=1e-4, updates_per_epoch=4)
    assert c.update_points(100) == {25, 50, 75}
    assert c.planned_at(1.5) == pytest.approx(0.5 * 0.15 / 0.211)
    assert c.planned_at(2) == pytest.approx(c.planned[1])
    s = [c.update(0.25 * k, 0.0) for k in range(1, 5)]   # no factor small yet: s rises at every update
    assert s == sorted(s) and s[-1] > 4e-4
    assert c.update(1.25, 0.5) < s[-1]                     # ahead of the plan: lowered at once
