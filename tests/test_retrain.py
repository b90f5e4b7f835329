"""Recovery after pruning: distillation from a teacher, Scratch-B (random init, FLOPs-scaled epochs)."""
import json

import pytest
import torch
import torch.nn.functional as F

from netslim.checkpoint import load_checkpoint, save_checkpoint
from netslim.distill import distillation_loss
from netslim.models import build_model
from netslim.engine.prune import prune
from netslim.retrain import scratch_b_epochs, scratch_model
from test_cli_commands import MODEL, run, trained  # noqa: F401  (the module's tiny sparsity-trained model)


def test_distillation_loss_is_hinton_kd_plus_ce():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    T, a = 3.0, 0.7
    p_t = F.softmax(t / T, 1)
    kd = (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1).mean() * T * T
    want = a * kd + (1 - a) * F.cross_entropy(s, y)
    torch.testing.assert_close(distillation_loss(s, t, y, alpha=a, temperature=T), want)
    # alpha 0 is plain cross-entropy; a student equal to its teacher has no soft loss
    torch.testing.assert_close(distillation_loss(s, t, y, alpha=0.0, temperature=T), F.cross_entropy(s, y))
    assert float(distillation_loss(t, t, y, alpha=1.0, temperature=T)) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def pruned(trained, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("p") / "p60"
    assert run(["prune", "--checkpoint", str(trained), "--percent", "0.6", "--save", str(out), "--no-eval"]) == 0
    return out / "pruned.pt"


def test_finetune_distill_trains_and_records_the_teacher(pruned, trained, data_dir, tmp_path):  # noqa: F811
    save = tmp_path / "kd"
    assert run(["finetune", "--checkpoint", str(pruned), "--data-dir", str(data_dir), "--epochs", "1",
                "--train-subset", "128", "--seed", "0", "--distill", str(trained), "--distill-alpha", "0.8",
                "--distill-temperature", "2", "--save", str(save)]) == 0
    cfg = torch.load(save / "checkpoint.pt", weights_only=True)["train_state"]["config"]
    assert cfg["distill"] == str(trained.resolve()) and cfg["distill_alpha"] == 0.8
    assert cfg["distill_temperature"] == 2
    # the same run without the teacher trains differently (the loss is not the same)
    plain = tmp_path / "plain"
    assert run(["finetune", "--checkpoint", str(pruned), "--data-dir", str(data_dir), "--epochs", "1",
                "--train-subset", "128", "--seed", "0", "--save", str(plain)]) == 0
    a = torch.load(save / "checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(plain / "checkpoint.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_a_teacher_of_another_task_is_a_one_line_error(pruned, data_dir, tmp_path, capsys):
    other = build_model("vgg", depth=11, num_classes=7, in_channels=1, width=0.125)
    save_checkpoint(tmp_path / "t.pt", other)
    code = run(["finetune", "--checkpoint", str(pruned), "--data-dir", str(data_dir), "--epochs", "1",
                "--train-subset", "128", "--distill", str(tmp_path / "t.pt"), "--save", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "distill from a model of the same task" in err and len(err.splitlines()) == 1


def test_scratch_model_is_the_pruned_architecture_with_fresh_weights(pruned):
    model, meta = load_checkpoint(pruned)
    fresh, fmeta = scratch_model(pruned, seed=0)
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in model.parameters()]
    assert not torch.equal(next(fresh.parameters()), next(model.parameters()))
    again, _ = scratch_model(pruned, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), again.parameters()))  # seeded
    epochs, ratio = scratch_b_epochs(fresh, fmeta, 5)
    assert ratio > 1 and epochs == round(5 * ratio)


def test_finetune_scratch_scales_the_epochs(pruned, data_dir, tmp_path, capsys):
    save = tmp_path / "sb"
    assert run(["finetune", "--checkpoint", str(pruned), "--data-dir", str(data_dir), "--epochs", "1",
                "--train-subset", "64", "--seed", "0", "--scratch", "--save", str(save)]) == 0
    printed = capsys.readouterr().out
    assert "Scratch-B: random init" in printed
    history = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    fresh, meta = scratch_model(pruned, seed=0)
    assert len(history) == scratch_b_epochs(fresh, meta, 1)[0] > 1
    assert "scratch = true" in (save / "config.toml").read_text() and "epochs = 1" in (save / "config.toml").read_text()


def test_scratch_needs_a_pruned_checkpoint(data_dir, tmp_path, capsys):
    code = run(["train", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), *MODEL, "--scratch",
                "--save", str(tmp_path / "x")])
    assert code == 2 and "--scratch retrains a pruned architecture" in capsys.readouterr().err
