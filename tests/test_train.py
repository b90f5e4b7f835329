"""netslim.train: the recipe, the sparsity step, checkpoints, exact resume, signals, errors.

A tiny conv net (with dropout, so resume has to restore the RNG) on 8x8 random images.
"""
from __future__ import annotations

import os
import signal

import pytest
import torch
from torch import nn

from netslim.checkpoint import load_checkpoint, read_checkpoint
from netslim.data import DataBundle, DatasetSpec
from netslim.errors import ConfigError, NetslimError
from netslim.fileio import read_jsonl
from netslim.train import (NonFiniteLoss, TrainConfig, TrainingInterrupted, epoch_milestones, evaluate, fit,
                           resolve_amp, scheduled_lr)

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on cores shared with other jobs, OpenMP's barriers between 2 threads can
    wait a scheduler time slice each and make a 15 ms step take 2 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SPEC = DatasetSpec("tiny", in_channels=1, image_size=8, num_classes=4, mean=(0.3,), std=(0.3,), flip=True,
                   crop_pad=1)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():  # mixed signs, so sign(gamma) matters
            self.bn.weight.copy_(torch.tensor([0.5, -0.4, 0.3, -0.2, 0.6, 0.1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.drop(x))


def tiny_model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def tiny_data(n_train: int = 64, n_test: int = 32) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    n = n_train + n_test
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randint(0, 60, (n, 1, 8, 8), generator=g)
    x[:, :, :, :] += (y * 50).view(-1, 1, 1, 1)  # learnable: brightness encodes the class
    x = x.clamp(0, 255).to(torch.uint8)
    return DataBundle(SPEC, x[:n_train], y[:n_train], x[n_train:], y[n_train:])


META = {"arch": {"name": "tiny"}, "dataset": SPEC.as_dict(), "input_size": [1, 8, 8]}


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=16, lr=0.05, seed=7, test_batch_size=32, log_every=1, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def weights_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_milestones_are_integers_and_fire_for_odd_epochs():
    assert epoch_milestones(99) == [49, 74]
    assert epoch_milestones(160) == [80, 120]
    assert epoch_milestones(1) == []  # a milestone at 0 would decay before the first step
    out = fit(tiny_model(), tiny_data(), cfg(epochs=3, lr=0.1), None, meta=META)
    lrs = [r["lr"] for r in out["history"]]  # milestones [1, 2]
    assert lrs == pytest.approx([0.1, 0.01, 0.001])


def test_per_step_schedules():
    assert scheduled_lr("step", 0.1, 0.3) is None  # per epoch, by MultiStepLR
    assert scheduled_lr("cosine", 0.1, 0.0) == pytest.approx(0.1)
    assert scheduled_lr("cosine", 0.1, 0.5) == pytest.approx(0.05)
    assert scheduled_lr("onecycle", 0.1, 0.0) == pytest.approx(0.01)
    assert scheduled_lr("onecycle", 0.1, 0.25) == pytest.approx(0.1)
    ramp = [scheduled_lr("onecycle", 0.1, t / 100) for t in range(101)]
    assert ramp == sorted(ramp[:26]) + sorted(ramp[26:], reverse=True) and ramp[-1] == pytest.approx(0.0)
    # fit sets it every step: the last step of a 4-step, 1-epoch run starts 3/4 of the way in
    seen = []
    fit(tiny_model(), tiny_data(), cfg(epochs=1, schedule="onecycle"), None, meta=META,
        on_progress=lambda ev: seen.append(ev["lr"]) if ev["event"] == "step" else None)
    assert seen == pytest.approx([scheduled_lr("onecycle", 0.05, k / 4) for k in range(4)])


def test_sparsity_moves_gamma_by_lr_s_sign_beyond_plain_sgd():
    data = tiny_data(n_train=16)  # one step per epoch
    gamma0 = tiny_model().bn.weight.detach().clone()
    lr, s = 0.1, 0.01
    runs = {}
    for sr in (False, True):
        m = tiny_model()
        fit(m, data, cfg(epochs=1, lr=lr, sr=sr, s=s, amp="off"), None, meta=META)
        runs[sr] = m
    plain, sparse = runs[False], runs[True]
    delta = sparse.bn.weight.detach() - plain.bn.weight.detach()
    torch.testing.assert_close(delta, -lr * s * torch.sign(gamma0), rtol=0, atol=1e-6)
    for k, v in plain.state_dict().items():  # nothing else differs after one step
        if k != "bn.weight":
            assert torch.equal(v, sparse.state_dict()[k]), k


def test_sparsity_training_shrinks_gammas():
    data = tiny_data()
    sums = {}
    for sr in (False, True):
        out = fit(tiny_model(), data, cfg(sr=sr, s=0.05), None, meta=META)
        sums[sr] = out["history"][-1]["sum_abs_gamma"]
    assert sums[True] < sums[False] - 0.05


def test_gamma_summary_by_hand():
    from netslim.sparsity import gamma_summary
    m = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6),
                      nn.BatchNorm2d(3, affine=False))  # no factors: not counted
    with torch.no_grad():
        m[1].weight.copy_(torch.tensor([0.005, -0.05, 0.15, -0.25]))
        m[3].weight.copy_(torch.tensor([0.5, 0.6, -0.7, 0.8, 0.9, 1.0]))
    g = gamma_summary(m)
    assert g["count"] == 10 and g["sum"] == pytest.approx(4.955)
    assert g["frac_below_0.01"] == g["frac_below_1e-2"] == pytest.approx(0.1)
    assert (g["frac_below_0.1"], g["frac_below_0.2"], g["frac_below_0.3"]) == pytest.approx((0.2, 0.3, 0.4))
    assert g["median"] == pytest.approx(0.5)  # torch's median: the lower of the two middle values
    assert gamma_summary(nn.Sequential(nn.Conv2d(1, 2, 1))) == {"count": 0}


def test_files_written_and_loadable(tmp_path):
    out = fit(tiny_model(), tiny_data(), cfg(), tmp_path, meta=META)
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint.pt", "model_best.pt", "metrics.jsonl"}
    for name in ("checkpoint.pt", "model_best.pt"):
        obj = torch.load(tmp_path / name, weights_only=True)
        assert obj["arch"] == META["arch"] and obj["dataset"]["name"] == "tiny"
    ts = read_checkpoint(tmp_path / "checkpoint.pt")["train_state"]
    assert ts["epoch"] == 3 and len(ts["history"]) == 3 and ts["best_top1"] == out["best_top1"]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) >= {"epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "images_per_s",
                            "seconds", "sum_abs_gamma", "frac_gamma_below_1e-2"}
    best = max(r["test_top1"] for r in rows)
    assert read_checkpoint(tmp_path / "model_best.pt")["metrics"]["test_top1"] == best == out["best_top1"]
    # the latest weights evaluate to the logged final figures
    m = tiny_model(1)
    m, _ = load_checkpoint(tmp_path / "checkpoint.pt", model=m)
    data = tiny_data()
    loss, top1 = evaluate(m, data.test_x, data.test_y, SPEC, batch_size=32, amp="auto")
    assert top1 == pytest.approx(rows[-1]["test_top1"]) and loss == pytest.approx(rows[-1]["test_loss"], rel=1e-4)


def _interrupt_at(epoch: int, signum: int = signal.SIGINT):
    def on_progress(ev: dict) -> None:
        if ev["event"] == "step" and ev["epoch"] == epoch and ev["step"] == 1:
            os.kill(os.getpid(), signum)
    return on_progress


# stop in the last epoch / in the very first one; a per-step schedule mid-run
@pytest.mark.parametrize("stop_epoch,schedule", [(3, "step"), (1, "step"), (2, "onecycle")])
def test_interrupt_then_resume_is_bit_identical(tmp_path, stop_epoch, schedule):
    data = tiny_data()
    straight = tiny_model()
    fit(straight, data, cfg(schedule=schedule), tmp_path / "a", meta=META)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        fit(tiny_model(), data, cfg(schedule=schedule), tmp_path / "b", meta=META,
            on_progress=_interrupt_at(stop_epoch))
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    e = info.value
    assert e.signum == signal.SIGINT and e.epoch == stop_epoch - 1
    assert e.checkpoint == tmp_path / "b" / "checkpoint.pt"
    assert read_checkpoint(e.checkpoint)["train_state"]["epoch"] == stop_epoch - 1

    resumed = tiny_model(seed=123)  # other initial weights: the checkpoint must replace them all
    out = fit(resumed, data, cfg(seed=None, schedule=schedule), tmp_path / "b", meta=META, resume=tmp_path / "b")
    assert weights_equal(straight, resumed)
    a = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["epoch"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k in ("lr", "train_loss", "test_loss", "test_top1", "sum_abs_gamma"):
            assert ra[k] == rb[k], k
    assert [r["epoch"] for r in out["history"]] == [1, 2, 3]
    tsa = read_checkpoint(tmp_path / "a" / "checkpoint.pt")["train_state"]
    tsb = read_checkpoint(tmp_path / "b" / "checkpoint.pt")["train_state"]
    assert tsa["scheduler"] == tsb["scheduler"] and tsa["seed"] == tsb["seed"] == 7


def test_sigterm_stops_with_its_signal(tmp_path):
    with pytest.raises(TrainingInterrupted) as info:
        fit(tiny_model(), tiny_data(), cfg(), tmp_path, meta=META, on_progress=_interrupt_at(2, signal.SIGTERM))
    assert info.value.signum == signal.SIGTERM and info.value.epoch == 1
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 1


def test_refuses_to_overwrite_a_run(tmp_path):
    fit(tiny_model(), tiny_data(), cfg(epochs=1), tmp_path, meta=META)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(NetslimError, match="already holds a run.*--resume.*--force"):
        fit(tiny_model(), tiny_data(), cfg(epochs=1), tmp_path, meta=META)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    fit(tiny_model(), tiny_data(), cfg(epochs=2, force=True), tmp_path, meta=META)
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 2  # replaced, not appended to


class NaNAfter(nn.Module):
    """Tiny, whose output turns NaN from the `after`-th forward in training mode."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.net, self.after, self.calls = tiny_model(), after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.after:
                out = out * float("nan")
        return out


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # 4 steps per epoch: the 6th forward is epoch 2, step 2
    with pytest.raises(NonFiniteLoss, match=r"epoch 2, step 2/4 with lr 0\.05") as info:
        fit(NaNAfter(6), tiny_data(), cfg(epochs=4), tmp_path, meta=META)
    assert "checkpoint.pt" in str(info.value)
    ts = read_checkpoint(tmp_path / "checkpoint.pt")["train_state"]
    assert ts["epoch"] == 1
    state = read_checkpoint(tmp_path / "checkpoint.pt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_huge_lr_is_reported_not_silently_nan(tmp_path):
    with pytest.raises(NonFiniteLoss, match="lr 1e\\+30"):
        fit(tiny_model(), tiny_data(), cfg(lr=1e30, amp="off"), tmp_path, meta=META)


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(batch_size=0), dict(s=-1e-4), dict(lr=0.0),
                                 dict(lr=-0.1), dict(amp="fp8"), dict(momentum=1.0), dict(schedule="linear"),
                                 dict(crop_pad=-1), dict(crop_pad=8)])  # SPEC's images are 8x8
def test_bad_config_raises_config_error_and_writes_nothing(tmp_path, bad):
    with pytest.raises(ConfigError):
        fit(tiny_model(), tiny_data(), cfg(**bad), tmp_path / "run", meta=META)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("crop_pad,want", [(None, SPEC.crop_pad), (0, 0), (3, 3)])
def test_crop_pad_reaches_the_training_batches(tmp_path, monkeypatch, crop_pad, want):
    """--crop-pad overrides the dataset's pad for the training batches only (None: the dataset's)."""
    import netslim.data as data_mod
    pads = []
    real_augment = data_mod.augment

    def spy(x, spec, gen):
        pads.append(spec.crop_pad)
        return real_augment(x, spec, gen)

    monkeypatch.setattr(data_mod, "augment", spy)
    fit(tiny_model(), tiny_data(), cfg(epochs=1, crop_pad=crop_pad), tmp_path, meta=META)
    assert pads and set(pads) == {want}
    assert read_checkpoint(tmp_path / "checkpoint.pt")["train_state"]["config"]["crop_pad"] == crop_pad


def test_resolve_amp():
    cpu = torch.device("cpu")
    assert resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    assert resolve_amp("fp16", cpu) is torch.float16
    assert resolve_amp("auto", cpu) in (None, torch.bfloat16)
    if torch.cpu._is_avx512_bf16_supported():
        assert resolve_amp("auto", cpu) is torch.bfloat16
    with pytest.raises(ConfigError):
        resolve_amp("int8", cpu)


def test_fp16_gradscaler_path_trains():
    out = fit(tiny_model(), tiny_data(), cfg(amp="fp16", sr=True), None, meta=META)
    assert all(r["train_loss"] == r["train_loss"] for r in out["history"])  # finite, not NaN


def test_second_sigint_aborts_at_once():
    def twice(ev: dict) -> None:
        if ev["event"] == "step" and ev["epoch"] == 1 and ev["step"] == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # the default handler: KeyboardInterrupt right here

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), tiny_data(), cfg(), None, meta=META, on_progress=twice)
    assert signal.getsignal(signal.SIGINT) is before


def test_under_torchrun_every_cuda_device_is_the_local_rank(monkeypatch):
    """One GPU per process: 'cuda:0' in a command every rank shares must not put them all on GPU 0.
    (No multi-GPU machine here: torch.cuda's answers are patched to describe a 4-GPU node.)"""
    from netslim.train import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda:0") == resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 3)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("cuda:2") == torch.device("cuda", 2)  # without torchrun the index is the user's
