"""Training: one SGD loop with the Network Slimming sparsity step, evaluation, checkpoints.

The recipe is the seed's (and the paper's): SGD momentum 0.9, weight decay 1e-4, batch 64,
lr 0.1 divided by 10 at 50% and 75% of the epochs, cross-entropy; with `sr` the L1
sub-gradient s * sign(gamma) is added to every BatchNorm gamma's gradient after backward
and before the optimizer step (after unscaling when an fp16 GradScaler is in use).

Fast path: the dataset sits on the device as uint8 and BatchLoader normalises and
augments whole batches there; bf16 autocast where the hardware has it; channels_last
weights and inputs; the loop accumulates loss and accuracy as device tensors and reads
them back only every `log_every` steps (for the progress display and the non-finite check).

Files a run writes into `save_dir` (rank 0 only):
    checkpoint.pt   the state at the end of the last completed epoch, with `train_state`
                    (epoch 0 = the initial weights, written before the first step), so an
                    interrupted run resumes exactly; see `fit(resume=...)`
    model_best.pt   the weights with the best test top-1 so far
    metrics.jsonl   one JSON line per epoch
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import input_error, read_checkpoint, save_checkpoint
from .autopilot import S_SCHEDULES, SparsityController, SparsityForecast, epoch_lrs, s_for_epoch, sparsity_warnings
from .distill import distillation_loss
from .errors import CheckpointError, ConfigError, DatasetError, NetslimError
from .fileio import FolderLock, append_jsonl, atomic_write_text, remove_files, results_in
from .sparsity import BNSparsity, abs_gammas

log = logging.getLogger(__name__)

__all__ = [
    "TrainConfig", "fit", "evaluate", "resolve_amp", "resolve_device", "epoch_milestones", "scheduled_lr",
    "init_distributed", "resolve_seed", "TrainingInterrupted", "NonFiniteLoss", "check_resume_recipe",
    "load_dataset_per_node",
    "CHECKPOINT_NAME", "BEST_NAME", "METRICS_NAME", "check_save_dir_free",
]

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "model_best.pt"
METRICS_NAME = "metrics.jsonl"

AMP_CHOICES = ("auto", "off", "bf16", "fp16")
LOG_KINDS = ("tensorboard",)
TENSORBOARD_DIR = "tensorboard"

ProgressFn = Callable[[dict], None]


@dataclass
class TrainConfig:
    """The training recipe. Defaults are the seed's CIFAR recipe."""
    epochs: int = 160
    batch_size: int = 64                 # global: split evenly over the processes under torchrun, so
                                         # the seed's lr 0.1 stays per 64 images at any process count
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4           # on every parameter, BN included, as in the seed
    nesterov: bool = False               # the paper used Nesterov, the seed does not
    schedule: str = "step"               # step (the seed's) | cosine | onecycle; see scheduled_lr
    milestones: tuple[float, ...] = (0.5, 0.75)   # fractions of `epochs`; see epoch_milestones
    gamma: float = 0.1                   # lr factor at each milestone (schedule "step")
    sr: bool = False                     # sparsity regularisation on BN gammas
    s: float | str = 1e-4                # its strength (1e-4 VGG, 1e-5 ResNet/DenseNet), or "auto":
    target_sparsity: Optional[float] = None  # with s "auto": the share of |gamma| < 1e-2 to reach (autopilot.py)
    s_schedule: str = "constant"         # constant | linear-decay | step-decay (at the lr milestones)
    forecast_percent: float = 0.5        # sparsity epochs log what pruning this share of channels would give
    amp: str = "auto"                    # auto | off | bf16 | fp16
    channels_last: bool = True
    augment: bool = True                 # pad/crop/flip training batches (an MLP wants it off)
    crop_pad: Optional[int] = None       # pixels of zero padding before the random crop; None:
                                         # the dataset's (4 for the 32x32 sets, 2 for the 28x28)
    compile: bool = False
    seed: Optional[int] = None           # None: drawn at random and recorded in the checkpoint
    test_batch_size: int = 256
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    sync_bn: bool = False                # SyncBatchNorm under DDP (CUDA only)
    force: bool = False                  # replace a run already in save_dir
    log_every: int = 20                  # steps between host syncs (progress, non-finite check)
    log: tuple[str, ...] = ()            # extra logs: "tensorboard" (event files in save_dir/tensorboard)
    distill: Optional[str] = None        # teacher checkpoint: loss = KD (Hinton) + CE, see distill.py
    distill_alpha: float = 0.5           # weight of the soft (teacher) term; 1 - alpha on the labels
    distill_temperature: float = 4.0     # softmax temperature of both models' logits in the soft term

    def __post_init__(self) -> None:
        # TOML, JSON and argparse give lists; the config holds tuples (hashable, compare equal)
        self.milestones = tuple(self.milestones)
        self.log = tuple(dict.fromkeys([self.log] if isinstance(self.log, str) else self.log))

    def validate(self) -> None:
        """Raise ConfigError naming the first value that cannot be used."""
        def bad(name: str, value: Any, want: str) -> ConfigError:
            return ConfigError(f"{name} {value!r} is not valid: {want}")
        for name in ("epochs", "batch_size", "test_batch_size", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name.replace("_", "-"), v, "use an integer >= 1")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", self.lr, "use a learning rate > 0 (the seed uses 0.1)")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise bad("momentum", self.momentum, "use a value in [0, 1)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise bad("weight-decay", self.weight_decay, "use a value >= 0")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov needs momentum > 0")
        if self.s == "auto":
            if self.target_sparsity is None or not 0 < self.target_sparsity < 1:
                raise ConfigError("--s auto needs --target-sparsity Q, the share of BN factors to bring under "
                                  "1e-2 by the last epoch (in (0, 1), e.g. 0.5)")
            if self.s_schedule != "constant":
                raise ConfigError("--s-schedule does not apply to --s auto (the controller sets s every epoch)")
        elif isinstance(self.s, bool) or not isinstance(self.s, (int, float)) or not (
                math.isfinite(self.s) and self.s >= 0):
            raise bad("s", self.s, "use a sparsity strength >= 0 (e.g. 1e-4) or auto")
        elif self.target_sparsity is not None:
            raise ConfigError("--target-sparsity goes with --s auto (a fixed s cannot aim at a share)")
        if self.s_schedule not in S_SCHEDULES:
            raise bad("s-schedule", self.s_schedule, f"use one of {', '.join(S_SCHEDULES)}")
        if not (isinstance(self.forecast_percent, (int, float)) and 0 < self.forecast_percent < 1):
            raise bad("forecast-percent", self.forecast_percent, "use a fraction in (0, 1)")
        if not (math.isfinite(self.gamma) and 0 < self.gamma <= 1):
            raise bad("gamma", self.gamma, "use an lr factor in (0, 1]")
        if any(not (0 < f < 1) for f in self.milestones):
            raise bad("milestones", self.milestones, "use fractions of the epochs strictly between 0 and 1")
        if self.crop_pad is not None and (isinstance(self.crop_pad, bool) or not isinstance(self.crop_pad, int)
                                          or self.crop_pad < 0):
            raise bad("crop-pad", self.crop_pad, "use an integer >= 0 (0: no random crop)")
        if not (isinstance(self.distill_alpha, (int, float)) and 0 <= self.distill_alpha <= 1):
            raise bad("distill-alpha", self.distill_alpha, "use a weight in [0, 1]")
        if not (isinstance(self.distill_temperature, (int, float)) and math.isfinite(self.distill_temperature)
                and self.distill_temperature > 0):
            raise bad("distill-temperature", self.distill_temperature, "use a temperature > 0 (e.g. 4)")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", self.schedule, f"use one of {', '.join(SCHEDULES)}")
        if self.amp not in AMP_CHOICES:
            raise bad("amp", self.amp, f"use one of {', '.join(AMP_CHOICES)}")
        unknown_logs = [k for k in self.log if k not in LOG_KINDS]
        if unknown_logs:
            raise bad("log", unknown_logs[0], f"use one of {', '.join(LOG_KINDS)}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise bad("seed", self.seed, "use an integer >= 0")

    def as_dict(self) -> dict:
        """JSON-like and weights_only-safe (tuples become lists)."""
        d = asdict(self)
        d["milestones"] = [float(f) for f in self.milestones]
        d["log"] = list(self.log)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Rebuild from `as_dict()` output, ignoring keys this version does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Recipe values a resumed run cannot change: the restored optimizer, scheduler and RNG states
# would silently override them (the run would record one value and train with another).
# --epochs may grow a run; the others (amp, device, ...) change speed, not the recipe.
RESUME_FROZEN = ("lr", "momentum", "weight_decay", "nesterov", "schedule", "seed")


def check_resume_recipe(stored: dict, given: dict) -> None:
    """ConfigError when a value in `given` (None: not given) differs from the resumed run's `stored` config."""
    for k in RESUME_FROZEN:
        if given.get(k) is not None and k in stored and given[k] != stored[k]:
            raise ConfigError(f"--{k.replace('_', '-')} {given[k]} differs from the resumed run's {stored[k]}; "
                              "a resumed run keeps its recipe (start a new run, or fine-tune it with --refine)")


class TrainingInterrupted(NetslimError):
    """SIGINT/SIGTERM arrived during fit; `checkpoint` holds the last completed epoch."""

    def __init__(self, signum: int, checkpoint: Optional[Path], epoch: int):
        self.signum = signum
        self.checkpoint = checkpoint
        self.epoch = epoch  # completed epochs stored in `checkpoint`
        where = f"; {checkpoint} holds epoch {epoch}" if checkpoint else ""
        super().__init__(f"training interrupted by {signal.Signals(signum).name}{where}")


class NonFiniteLoss(NetslimError):
    """The training loss became NaN or infinite."""


# --------------------------------------------------------------------------- devices


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> this process's CUDA device when there is one, else CPU. Under torchrun every
    process uses cuda:LOCAL_RANK, for 'auto', 'cuda' and 'cuda:N' alike (one GPU per process)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not valid: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but this torch sees no CUDA GPU: use --device cpu")
        if dev.index is None or _under_torchrun():
            # under torchrun each process takes its own GPU, whatever index the shared command names
            local = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
            if dev.index is not None and dev.index != local:
                log.info("device %s under torchrun: this process (LOCAL_RANK %d) uses cuda:%d", device,
                         int(os.environ.get("LOCAL_RANK", 0)), local)
            dev = torch.device("cuda", local)
        elif dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} does not exist: this machine has "
                              f"{torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise ConfigError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    return dev


def _cpu_has_bf16() -> bool:
    """True when the CPU does bf16 matmuls natively (AVX512-BF16 or AMX)."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None:
            try:
                if fn():
                    return True
            except RuntimeError:
                pass
    try:  # older torch: read the flags ourselves (Linux)
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def resolve_amp(amp: str, device: str | torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for `amp` on `device`, or None for full fp32.

    auto: bf16 on CUDA GPUs that support it and on CPUs with AVX512-BF16/AMX; fp16 (with a
    GradScaler) on older GPUs; fp32 elsewhere (bf16 emulated on other CPUs is slower).
    """
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if amp != "auto":
        raise ConfigError(f"amp {amp!r} is not valid: use one of {', '.join(AMP_CHOICES)}")
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return None


SCHEDULES = ("step", "cosine", "onecycle")
ONECYCLE_WARMUP = 0.25  # fraction of the steps spent ramping up


def scheduled_lr(schedule: str, lr: float, done: float) -> Optional[float]:
    """The learning rate of the step that starts when fraction `done` of all steps is done.

    None for "step" (the seed's: lr / 10 at 50% and 75% of the epochs, per epoch, by
    MultiStepLR). The others are per step and a pure function of the position, so a
    resumed run needs no scheduler state:
      cosine    lr * (1 + cos(pi * done)) / 2, from lr down to 0;
      onecycle  linear from lr / 10 up to lr over the first 25% of the steps, then cosine to 0
                (short runs converge much better than with steps: the width-0.25 vgg-13 on
                Fashion-MNIST, 8 epochs, see BENCHMARKS.md).
    """
    if schedule == "step":
        return None
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * done))
    if done < ONECYCLE_WARMUP:
        return lr * (0.1 + 0.9 * done / ONECYCLE_WARMUP)
    return lr * 0.5 * (1.0 + math.cos(math.pi * (done - ONECYCLE_WARMUP) / (1.0 - ONECYCLE_WARMUP)))


def epoch_milestones(epochs: int, fractions: tuple[float, ...] = (0.5, 0.75)) -> list[int]:
    """Integer epochs at which the lr is multiplied by gamma: [int(f * epochs) ...].

    The seed tested `epoch in [epochs * 0.5, epochs * 0.75]`, a float comparison that never
    matches for an odd epoch count (99 -> 49.5, 74.25), so its odd-length runs never decayed
    the lr. Integer milestones fix that: 99 -> [49, 74]. A milestone at epoch 0 would decay
    before the first step and is dropped; equal milestones (tiny runs) each apply.
    """
    return sorted(m for m in (int(f * epochs) for f in fractions) if m >= 1)


# --------------------------------------------------------------------------- distributed


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device: str | torch.device = "auto") -> tuple[int, int, torch.device, bool]:
    """Join the torchrun process group when WORLD_SIZE > 1.

    Returns (rank, world_size, device, created); `created` says this call made the group
    (its caller should destroy it). nccl on CUDA, gloo on CPU. Idempotent.
    """
    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, dev, False
    dist = torch.distributed
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dev, False
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev, True


def resolve_seed(seed: Optional[int]) -> int:
    """`seed`, or a fresh random one; under DDP every rank gets rank 0's."""
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    rank, world = _world()
    if world > 1:
        box = [seed]
        torch.distributed.broadcast_object_list(box, src=0)
        seed = int(box[0])
    return seed


def load_dataset_per_node(name: str, **options: Any) -> Any:
    """data.load_dataset, with `download` fetched once per node under torchrun.

    Local rank 0 of every node reads (and, if missing, downloads) the files while the other
    ranks of its node wait; then they read the files it wrote. An error on a downloading rank
    stops every rank with its message. Without a process group, or without download, each
    rank simply reads. (The in-memory sets are small uint8 tensors that each rank holds whole,
    because every epoch shuffles across all of them; an image folder over its memory cap is
    decoded batch by batch, each rank only its own batches.)
    """
    from .data import load_dataset

    rank, world = _world()
    if world == 1 or not options.get("download"):
        return load_dataset(name, **options)
    first_on_node = int(os.environ.get("LOCAL_RANK", "0")) == 0
    data, error = None, None
    if first_on_node:
        try:
            data = load_dataset(name, **options)
        except NetslimError as e:
            error = str(e)
    errors: list = [None] * world
    torch.distributed.all_gather_object(errors, error)  # also the barrier the others wait on
    failed = next((e for e in errors if e is not None), None)
    if failed is not None:
        raise DatasetError(failed)
    return data if data is not None else load_dataset(name, **options)


def _all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if _world()[1] > 1:
        dist = torch.distributed
        torch.distributed.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


# --------------------------------------------------------------------------- signals


class _StopFlag:
    """SIGINT/SIGTERM set a flag the loop reads between steps; a second signal aborts at once."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: the user means it; act as if we were not here
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.signum = signum
        log.warning("%s received: stopping after this step", signal.Signals(signum).name)

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():  # signal() works only there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# --------------------------------------------------------------------------- evaluation


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _is_channels_last(model: nn.Module) -> bool:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
    return False


@torch.no_grad()
def _eval_loop(model: nn.Module, loader: Any, amp: Optional[torch.dtype], device: torch.device
               ) -> tuple[float, float]:
    """Mean loss and top-1 % over `loader`, summed over all ranks when the loader is sharded.

    An unsharded loader (world_size 1) is scored by this process alone, even inside a
    process group: the pipeline's rank 0 evaluates a pruned model while the others wait.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for x, y in loader:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x)
        sums[0] += F.cross_entropy(out.float(), y, reduction="sum")
        sums[1] += (out.argmax(1) == y).sum()
        sums[2] += y.numel()
    model.train(was_training)
    if getattr(loader, "world_size", 1) > 1:
        _all_reduce(sums)
    loss_sum, correct, n = sums.tolist()
    if n == 0:
        return float("nan"), float("nan")
    return loss_sum / n, 100.0 * correct / n


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: Any, *, batch_size: int = 256,
             device: str | torch.device | None = None, amp: str | torch.dtype | None = "auto",
             channels_last: Optional[bool] = None, rank: int = 0, world_size: int = 1) -> tuple[float, float]:
    """(mean cross-entropy, top-1 %) of `model` on uint8 images `x` [N, C, H, W] and labels `y`.

    `x` may also be a data.ImageFiles (an image folder streamed from disk): BatchLoader
    decodes its batches in worker processes.

    `device` defaults to the model's; `amp` is a resolve_amp name or a dtype (None = fp32);
    `channels_last` defaults to the layout of the model's conv weights. With world_size > 1
    each rank evaluates x[rank::world_size] and the sums are all-reduced: every rank
    returns the figures for the whole set.
    """
    from .data import BatchLoader

    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = resolve_device(device)
    dtype = resolve_amp(amp, device) if isinstance(amp, str) else amp
    if channels_last is None:
        channels_last = _is_channels_last(model)
    loader = BatchLoader(x, y, spec, batch_size, train=False, device=device, rank=rank, world_size=world_size,
                         channels_last=channels_last)
    return _eval_loop(model, loader, dtype, device)


def _gamma_stats(model: nn.Module) -> tuple[float, float]:
    """(sum |gamma| over all BN layers, fraction of |gamma| below 1e-2): sparsity at a glance."""
    g = abs_gammas(model)
    if g is None:
        return 0.0, 0.0
    return float(g.sum()), float((g < 1e-2).float().mean())


# --------------------------------------------------------------------------- training


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _resolve_resume(resume: str | os.PathLike | None) -> Optional[Path]:
    if resume is None:
        return None
    p = Path(resume)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.exists():
        raise CheckpointError(f"cannot resume: {p} does not exist")
    return p


def fit(model: nn.Module, data: Any, cfg: TrainConfig, save_dir: str | os.PathLike | None = None, *,
        meta: Optional[dict] = None, resume: str | os.PathLike | None = None,
        on_progress: Optional[ProgressFn] = None, optimizer: Optional[torch.optim.Optimizer] = None,
        loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        train_loader: Optional[Iterable] = None, test_loader: Optional[Iterable] = None) -> dict:
    """Train `model` on `data` (a DataBundle) with recipe `cfg`; evaluate on the test split every epoch.

    `meta` goes into every checkpoint (`arch`, `dataset`, `input_size`, ...; a pruned
    model's plan/mask ride along on `model.netslim_meta`). `resume` (a checkpoint.pt or its
    folder) restores weights, optimizer, scheduler, scaler and RNG state and continues at
    the next epoch: with the same config on CPU the result is bit-identical to a run that
    was never interrupted. `on_progress(event)` is called on rank 0 with dicts whose
    `event` is "start", "step" (every `cfg.log_every` steps) or "epoch".

    Raises NetslimError when `save_dir` already holds a run (unless resuming it or
    cfg.force), NonFiniteLoss when the loss stops being finite, TrainingInterrupted on
    SIGINT/SIGTERM (after the current step; checkpoint.pt then holds the last completed
    epoch, which is what a resume needs to be exact). Returns a summary dict.

    Your own pieces, for users who keep theirs (docs/own-loop.md):
      optimizer     used as given, instead of SGD(cfg.lr, cfg.momentum, ...); cfg.schedule
                    drives its learning rate, starting from each param group's own lr
      loss_fn       loss_fn(outputs, targets) -> scalar, instead of cross-entropy (the test
                    loss stays cross-entropy, comparable across runs)
      train_loader, test_loader   any iterables of (x, y) batches ready for the model
                    (normalised floats), with a len(); instead of batches of `data`, which
                    may then be None. Batches are moved to the training device. Under
                    torchrun, shard them yourself (DistributedSampler).
    """
    cfg = dataclasses.replace(cfg)  # fit fills in the seed; the caller's config stays as it was
    cfg.validate()
    save = Path(save_dir) if save_dir is not None else None
    resume_path = _resolve_resume(resume)
    check_save_dir_free(save, resume_path, cfg.force)
    if data is None and (train_loader is None or test_loader is None):
        raise ConfigError("fit needs data (a DataBundle) or both train_loader and test_loader")
    own = _OwnPieces(optimizer, loss_fn, train_loader, test_loader)
    rank, world, device, created = init_distributed(cfg.device)
    # rank 0 alone writes, so it alone locks the folder (the others would lock each other out)
    lock = FolderLock(save) if save is not None and rank == 0 else None
    progress = _RunProgress()
    try:
        return _fit(model, data, cfg, save, resume_path, meta or {}, on_progress, rank, world, device, own, lock,
                    progress)
    except TrainingInterrupted:
        raise  # checkpoint.pt holds the last completed epoch (epoch 0 too): the run resumes exactly
    except BaseException:
        if lock is not None and lock.held and progress.fresh_start_written and progress.epochs_done == 0:
            _discard_unfinished_run(save, progress.created_folder)
        raise
    finally:
        if lock is not None:
            lock.release()
        if created:
            torch.distributed.destroy_process_group()


@dataclass
class _OwnPieces:
    """What a caller of fit() brought instead of netslim's own (None: netslim's)."""
    optimizer: Optional[torch.optim.Optimizer] = None
    loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    train_loader: Optional[Iterable] = None
    test_loader: Optional[Iterable] = None


class _OnDevice:
    """A user's iterable of (x, y) batches, moved to the training device (and memory layout)."""

    def __init__(self, batches: Iterable, device: torch.device, channels_last: bool, what: str) -> None:
        try:
            self.steps = len(batches)  # type: ignore[arg-type]
        except TypeError:
            raise ConfigError(f"{what} needs a length (batches per epoch, for the lr schedule and the progress): "
                              "pass a DataLoader or a list, not a generator") from None
        self.batches, self.device, self.channels_last = batches, device, channels_last

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle a DistributedSampler (or anything with set_epoch) per epoch, as DDP needs."""
        for owner in (self.batches, getattr(self.batches, "sampler", None)):
            if hasattr(owner, "set_epoch"):
                owner.set_epoch(epoch)
                return

    def __iter__(self) -> Any:
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        for x, y in self.batches:
            x = x.to(self.device, non_blocking=True)
            yield (x.to(memory_format=layout) if x.dim() == 4 else x), y.to(self.device, non_blocking=True)


@dataclass
class _RunProgress:
    """How far a fit() got, for the clean-up after a failure."""
    created_folder: bool = False       # fit created save_dir
    fresh_start_written: bool = False  # a new run wrote its epoch-0 checkpoint.pt
    epochs_done: int = 0               # epochs finished by this call


def _discard_unfinished_run(save: Path, created_folder: bool) -> None:
    """Remove what a new run that failed before finishing an epoch wrote (its epoch-0
    checkpoint.pt): nothing there is worth resuming, and it would block the corrected re-run."""
    from .config import CONFIG_NAME  # the CLI records the run's configuration when it starts
    remove_files(save / CHECKPOINT_NAME, save / BEST_NAME, save / METRICS_NAME, save / CONFIG_NAME)
    if created_folder:
        try:
            save.rmdir()  # only if empty: anything else there is not ours
        except OSError:
            pass


def check_save_dir_free(save: Optional[Path], resume_path: Optional[Path], force: bool) -> None:
    """NetslimError when `save` holds results (any of fileio.RESULT_NAMES), unless `force` or
    the run there is the one being resumed: one run's files are never silently replaced."""
    if save is None or force:
        return
    found = results_in(save)
    ckpt = save / CHECKPOINT_NAME
    if not found or (resume_path is not None and ckpt.exists() and resume_path.resolve() == ckpt.resolve()):
        return
    how = (f"use --resume {ckpt} to continue it or --force to replace it" if CHECKPOINT_NAME in found
           else "choose another --save, or --force to replace it")
    raise NetslimError(f"{save} already holds a run ({', '.join(found)}); {how}")


def check_input_fits(model: nn.Module, input_size: Any, what: str = "the model") -> None:
    """ConfigError unless `model` runs on one zero example of `input_size` ([C, H, W] or [F]).

    A model too deep for small images (vgg on 16x16: its last pooling has nothing left to
    pool) fails here, before a run writes anything, instead of in its first step."""
    problem = input_error(model, input_size)
    if problem:
        raise ConfigError(f"{what} cannot take {'x'.join(map(str, input_size))} inputs ({problem}): use larger "
                          "images (--image-size) or a shallower --arch")


def _fit(model: nn.Module, data: Any, cfg: TrainConfig, save: Optional[Path], resume_path: Optional[Path],
         meta: dict, on_progress: Optional[ProgressFn], rank: int, world: int,
         device: torch.device, own: _OwnPieces, lock: Optional[FolderLock], progress: _RunProgress) -> dict:
    from .data import BatchLoader

    t_start = time.perf_counter()
    spec = data.spec if data is not None else None
    amp = resolve_amp(cfg.amp, device)
    if amp is not None and device.type == "cpu" and not _cpu_has_bf16() and cfg.amp == "bf16":
        log.warning("this CPU has no native bf16: --amp bf16 will be slower than --amp off")
    if cfg.sync_bn and world > 1 and device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA GPUs (SyncBatchNorm has no CPU kernel); drop it on CPU")
    if own.train_loader is None and cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} does not split evenly over {world} processes: the batch "
                          f"is global, use a multiple of {world}")
    batch_per_process = cfg.batch_size // world
    summary_writer_cls = _summary_writer_class(cfg, save)  # every rank checks: all fail alike, before any write
    if spec is not None and cfg.crop_pad is not None and cfg.crop_pad >= spec.image_size:
        raise ConfigError(f"crop-pad {cfg.crop_pad} is not valid for {spec.image_size}x{spec.image_size} images: "
                          "use a pad smaller than the image (the 28x28 sets default to 2, the rest to 4)")

    # ---- state to continue from
    ts: dict = {}
    if resume_path is not None:
        obj = read_checkpoint(resume_path)
        ts = obj.get("train_state") or {}
        if "epoch" not in ts or "optimizer" not in ts:
            raise CheckpointError(f"{resume_path} has no training state to resume (a model_best.pt or a pruned "
                                  f"model?); resume from the run's {CHECKPOINT_NAME}, or start a new run from "
                                  "it with --refine")
        try:
            model.load_state_dict(obj["state_dict"])
        except RuntimeError as e:
            raise CheckpointError(f"{resume_path} does not fit the model being trained "
                                  f"({str(e).splitlines()[0][:160]})") from None
        stored_seed = ts.get("seed")
        if cfg.seed is not None and stored_seed is not None and cfg.seed != stored_seed:
            log.warning("resuming a run trained with seed %s under seed %s: the data order changes",
                        stored_seed, cfg.seed)
        else:
            cfg.seed = stored_seed
    seed = resolve_seed(cfg.seed)
    cfg.seed = seed
    start_epoch = int(ts.get("epoch", 0))
    history: list[dict] = list(ts.get("history", []))
    best_top1 = float(ts.get("best_top1", -1.0))

    # ---- model, wrapped for DDP / compile; `raw` is what gets saved and evaluated
    use_cl = cfg.channels_last and _has_conv(model)
    model.to(device)
    if use_cl:
        model.to(memory_format=torch.channels_last)
    if world > 1 and cfg.sync_bn:
        from .layers import convert_sync_batchnorm  # keeps the channel gathers of slim models
        model = convert_sync_batchnorm(model)
    raw = model
    train_model: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    teacher = None
    if cfg.distill:
        from .engine.trace import example_input
        from .distill import load_teacher
        example = example_input(meta.get("input_size"), raw).to(device)
        teacher = load_teacher(cfg.distill, raw, example, device)
        if use_cl:
            teacher.to(memory_format=torch.channels_last)

    opt = own.optimizer or torch.optim.SGD([p for p in raw.parameters() if p.requires_grad], lr=cfg.lr,
                                           momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                           nesterov=cfg.nesterov)
    loss_fn = own.loss_fn or F.cross_entropy
    milestones = epoch_milestones(cfg.epochs, cfg.milestones)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=cfg.gamma)
    # fp16 needs loss scaling; bf16 has fp32's range and does not.
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)

    if ts:
        opt.load_state_dict(ts["optimizer"])
        sched.load_state_dict(ts["scheduler"])
        sched.milestones = Counter(milestones)  # follow cfg.epochs if the run was extended
        if ts.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ts["scaler"])
        rngs = ts.get("rng_per_rank") or []
        if len(rngs) == world:
            _set_rng_state(rngs[rank], device)
        else:  # different world size than the interrupted run: reseed, still deterministic
            torch.manual_seed(seed + 1000 * start_epoch + rank)
    else:
        torch.manual_seed(seed + rank)  # dropout and other in-model randomness

    # On a GPU the uint8 dataset is copied to device memory once (1 byte/pixel); each batch
    # is then augmented and normalised there. On the CPU there is nothing to copy. An image
    # folder over its memory cap (data.train_x / test_x are ImageFiles) is never preloaded:
    # BatchLoader decodes its batches in DataLoader workers, then augments them the same way.
    preload = device.type == "cuda"
    train_loader: Any
    if own.train_loader is not None:
        train_loader = _OnDevice(own.train_loader, device, use_cl, "train_loader")
        augment_label = "the loader's own"
    else:
        train_spec = spec if cfg.crop_pad is None else dataclasses.replace(spec, crop_pad=cfg.crop_pad)
        train_loader = BatchLoader(data.train_x, data.train_y, train_spec, batch_per_process, train=True,
                                   device=device, seed=seed, rank=rank, world_size=world, channels_last=use_cl,
                                   preload=preload, augment=cfg.augment)
        augment_label = _augment_label(train_spec) if cfg.augment else "off"
    test_loader: Any
    if own.test_loader is not None:
        test_loader = _OnDevice(own.test_loader, device, use_cl, "test_loader")
    else:
        # Evaluation is sharded: rank r scores test images r, r+W, ... and _eval_loop all-reduces
        # the sums, so every rank gets the figures for the whole test set.
        test_loader = BatchLoader(data.test_x, data.test_y, spec, cfg.test_batch_size, train=False, device=device,
                                  rank=rank, world_size=world, channels_last=use_cl, preload=preload)
    steps = len(train_loader)
    if steps == 0:
        raise ConfigError("train_loader yields no batches" if own.train_loader is not None else
                          f"batch size {cfg.batch_size} exceeds the {len(data.train_y)} training images: "
                          "lower --batch-size")
    input_size = meta.get("input_size") or ([spec.in_channels, spec.image_size, spec.image_size] if spec else None)
    if input_size is not None:  # (a user's own loaders: their batches show the input shape only when they run)
        check_input_fits(raw, input_size, f"{type(raw).__name__} ({(meta.get('arch') or {}).get('name', 'model')})")
    sparsity, controller, forecast = _sparsity_setup(raw, cfg, meta, ts, device, steps_per_epoch=steps)

    writer = rank == 0 and save is not None
    if writer and lock is not None:  # every check passed: claim the folder, then write
        progress.created_folder = not save.exists()
        lock.acquire(create=True)
        check_save_dir_free(save, resume_path, cfg.force)  # again, now that no one else can write there
    best_path = save / BEST_NAME if save is not None else None
    metrics_path = save / METRICS_NAME if save is not None else None
    ckpt_path = save / CHECKPOINT_NAME if save is not None else None
    train_meta = {**meta}
    train_meta.pop("train_state", None)

    def rng_states() -> list[dict]:
        state = _rng_state(device)
        if world == 1:
            return [state]
        out: list = [None] * world
        torch.distributed.all_gather_object(out, state)
        return out

    def save_latest(epoch_done: int) -> None:
        rngs = rng_states()  # a collective: every rank takes part
        if not writer:
            return
        state = {
            "epoch": epoch_done, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "rng_per_rank": rngs, "seed": seed, "best_top1": best_top1,
            "history": history, "config": cfg.as_dict(), "world_size": world,
            "s_current": controller.s if controller is not None else None,
        }
        save_checkpoint(ckpt_path, raw, **train_meta, train_state=state,
                        metrics=history[-1] if history else {})

    if writer:  # (the lock removed the temporaries of writes a kill -9 interrupted)
        if ts:  # drop lines of epochs after the checkpoint (a crash between the two writes)
            atomic_write_text(metrics_path, "".join(_json_line(r) for r in history))
        else:
            remove_files(best_path, metrics_path)
    if not ts:
        save_latest(0)  # a resumable start: an interrupt in epoch 1 can still resume exactly
        progress.fresh_start_written = writer

    def report(event: dict) -> None:
        if on_progress is not None and rank == 0:
            on_progress(event)

    report({"event": "start", "epochs": cfg.epochs, "start_epoch": start_epoch, "steps": steps,
            "world_size": world, "device": str(device), "amp": str(amp).replace("torch.", "") if amp else "off",
            "channels_last": use_cl, "seed": seed, "milestones": milestones, "schedule": cfg.schedule,
            "augment": augment_label,
            "batch_size": None if own.train_loader is not None else cfg.batch_size,
            "batch_per_process": None if own.train_loader is not None else batch_per_process,
            "params": sum(p.numel() for p in raw.parameters())})

    autocast_dtype = amp or torch.float32
    last_epoch_done = start_epoch
    tb = summary_writer_cls(str(save / TENSORBOARD_DIR)) if writer and summary_writer_cls is not None else None
    with _StopFlag() as stop, (contextlib.closing(tb) if tb is not None else contextlib.nullcontext()):
        for epoch in range(start_epoch, cfg.epochs):
            train_loader.set_epoch(epoch)
            train_model.train()
            if sparsity is not None:
                sparsity.s = controller.s if controller is not None else s_for_epoch(
                    float(cfg.s), cfg.s_schedule, epoch, cfg.epochs, milestones, cfg.gamma)
            epoch_s = sparsity.s if sparsity is not None else None
            s_path: list[float] = []   # s after each update inside this epoch (--s auto)
            control_points = controller.update_points(steps) if controller is not None else set()
            lr = opt.param_groups[0]["lr"]
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float32, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            bad_step = torch.full((), -1, dtype=torch.int64, device=device)  # first non-finite step
            seen = 0
            stopped = False
            for step, (x, y) in enumerate(train_loader, 1):
                if cfg.schedule != "step":  # per step, from each group's starting lr (cfg.lr for netslim's SGD)
                    done = (epoch * steps + step - 1) / (cfg.epochs * steps)
                    for group in opt.param_groups:
                        group["lr"] = scheduled_lr(cfg.schedule, group["initial_lr"], done)
                    lr = opt.param_groups[0]["lr"]
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=amp is not None):
                    out = train_model(x)
                    if teacher is None:
                        loss = loss_fn(out, y)
                    else:
                        with torch.no_grad():
                            soft_target = teacher(x)
                        loss = distillation_loss(out, soft_target, y, alpha=cfg.distill_alpha,
                                                 temperature=cfg.distill_temperature)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()  # under DDP gradients are all-reduced here
                if sparsity is not None:
                    scaler.unscale_(opt)  # the L1 step is in true-gradient units
                    sparsity.step()
                scaler.step(opt)
                scaler.update()
                if controller is not None and step in control_points:  # s follows its plan inside the epoch too
                    s_path.append(controller.update(epoch + step / steps, _gamma_stats(raw)[1]))
                    sparsity.s = controller.s

                n = y.shape[0]
                seen += n
                loss_d = loss.detach().float()
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss_d), step, bad_step)
                loss_sum += loss_d * n
                correct += (out.argmax(1) == y).sum()

                sync = step % cfg.log_every == 0 or step == steps
                if world == 1 and stop.signum is not None:
                    stopped = True
                    break
                if not sync:
                    continue
                # Host sync: agree across ranks on stopping, check the loss, report progress.
                flags = torch.tensor([0 if stop.signum is None else stop.signum, 0], device=device)
                flags[1] = bad_step
                _all_reduce(flags, "max")
                signum, bad = int(flags[0]), int(flags[1])
                if bad >= 0:
                    raise NonFiniteLoss(
                        f"loss is not finite (nan/inf) at epoch {epoch + 1}, step {bad}/{steps} with lr {lr:g}; "
                        + _non_finite_advice(ckpt_path if save is not None else None, last_epoch_done,
                                             fresh=not ts and last_epoch_done == 0))
                if signum:
                    stop.signum = stop.signum or signum
                    stopped = True
                    break
                elapsed = time.perf_counter() - t0
                report({"event": "step", "epoch": epoch + 1, "epochs": cfg.epochs, "step": step, "steps": steps,
                        "loss": float(loss_sum) / seen, "top1": 100.0 * float(correct) / seen, "lr": lr,
                        "images_per_s": seen * world / max(elapsed, 1e-9)})
            if stopped:
                raise TrainingInterrupted(stop.signum, ckpt_path, last_epoch_done)

            train_seconds = time.perf_counter() - t0
            tot = _all_reduce(torch.stack([loss_sum.double(), correct.double(),
                                           torch.tensor(float(seen), dtype=torch.float64, device=device)]))
            train_loss, train_correct, train_n = tot.tolist()
            if cfg.schedule == "step":
                sched.step()

            if world > 1:  # BN running stats drift apart per rank; evaluate (and save) rank 0's
                for b in raw.buffers():
                    torch.distributed.broadcast(b, src=0)
            test_loss, test_top1 = _eval_loop(raw, test_loader, amp, device)
            sum_gamma, frac_small = _gamma_stats(raw)
            record = {
                "epoch": epoch + 1, "lr": lr, "train_loss": train_loss / train_n,
                "train_top1": 100.0 * train_correct / train_n, "test_loss": test_loss, "test_top1": test_top1,
                "images_per_s": train_n / max(train_seconds, 1e-9),
                "seconds": time.perf_counter() - t0, "sum_abs_gamma": sum_gamma,
                "frac_gamma_below_1e-2": frac_small,
            }
            if sparsity is not None:
                record["s"] = epoch_s
                if controller is not None:
                    record["s_next"] = controller.update(epoch + 1, frac_small)
                    record["s_within_epoch"] = s_path
            if forecast is not None:
                record["forecast"] = forecast(raw)
            history.append(record)
            is_best = test_top1 > best_top1
            if is_best:
                best_top1 = test_top1
            if writer:
                # model_best first: should a crash fall between the two writes, the resumed run
                # redoes this epoch, finds the same top-1 and rewrites model_best identically.
                if is_best:
                    save_checkpoint(best_path, raw, **train_meta, metrics=record)
            save_latest(epoch + 1)
            if writer:
                append_jsonl(metrics_path, record)
            if tb is not None:
                _log_epoch_to_tensorboard(tb, record, raw, step_seconds=train_seconds / steps)
            last_epoch_done = epoch + 1
            progress.epochs_done += 1
            report({"event": "epoch", **record, "epochs": cfg.epochs, "best_top1": best_top1, "is_best": is_best})
            if epoch + 1 < cfg.epochs:  # a signal during evaluation or saving: stop here, nothing lost
                flag = torch.tensor([stop.signum or 0], device=device)
                signum = int(_all_reduce(flag, "max")[0])
                if signum:
                    raise TrainingInterrupted(signum, ckpt_path, last_epoch_done)

    final = history[-1]["test_top1"] if history else float("nan")
    return {"best_top1": best_top1 if history else float("nan"), "final_top1": final,
            "epochs": len(history), "seconds": time.perf_counter() - t_start, "history": history,
            "seed": seed, "save_dir": str(save) if save is not None else None}


def _summary_writer_class(cfg: TrainConfig, save: Optional[Path]) -> Any:
    """torch's SummaryWriter when cfg.log asks for TensorBoard, else None; a one-line
    ConfigError when the tensorboard package is missing or there is no folder to write to."""
    if "tensorboard" not in cfg.log:
        return None
    if save is None:
        raise ConfigError("tensorboard logging needs a save folder for its event files")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'netslim[tensorboard]' "
                          "(metrics.jsonl is written either way)") from None
    return SummaryWriter


def _log_epoch_to_tensorboard(tb: Any, record: dict, model: nn.Module, step_seconds: float) -> None:
    """One epoch's figures (the metrics.jsonl record) and the |gamma| histogram, at step = epoch."""
    epoch = record["epoch"]
    for tag, key in (("train/loss", "train_loss"), ("train/top1", "train_top1"), ("test/loss", "test_loss"),
                     ("test/top1", "test_top1"), ("lr", "lr"), ("sparsity/sum_abs_gamma", "sum_abs_gamma"),
                     ("sparsity/frac_gamma_below_1e-2", "frac_gamma_below_1e-2"),
                     ("speed/images_per_s", "images_per_s")):
        tb.add_scalar(tag, record[key], epoch)
    tb.add_scalar("speed/step_seconds", step_seconds, epoch)
    gammas = abs_gammas(model)
    if gammas is not None:
        tb.add_histogram("sparsity/abs_gamma", gammas.cpu(), epoch)
    tb.flush()


def _non_finite_advice(ckpt: Optional[Path], epochs_done: int, fresh: bool) -> str:
    """What to do after a non-finite loss: fit removes a new run that finished no epoch, so
    the same command with a lower lr just works; otherwise the good state is kept."""
    if ckpt is None or fresh:
        return "nothing was kept; run again with a lower --lr, or check the data"
    return (f"{ckpt} holds the last good state (epoch {epochs_done}); start over with a lower --lr "
            "(--force replaces this run), or check the data")


def _sparsity_setup(raw: nn.Module, cfg: TrainConfig, meta: dict, ts: dict, device: torch.device,
                    steps_per_epoch: int) -> tuple:
    """(BNSparsity or None, SparsityController or None, SparsityForecast or None) of a run."""
    if not cfg.sr or cfg.s == 0:
        return None, None, None
    for line in sparsity_warnings(cfg.s if cfg.s != "auto" else 0.0, cfg.weight_decay):
        log.warning("%s", line)
    controller = None
    s = cfg.s
    if s == "auto":
        lrs = epoch_lrs(cfg.lr, cfg.epochs, epoch_milestones(cfg.epochs, cfg.milestones), cfg.gamma, cfg.schedule)
        s = ts.get("s_current") or SparsityController.initial_s(raw, steps_per_epoch * sum(lrs))
        controller = SparsityController(cfg.target_sparsity, lrs, float(s))
    forecast = None
    try:
        from .engine.trace import example_input
        forecast = SparsityForecast(raw, example_input(meta.get("input_size"), raw).to(device), cfg.forecast_percent)
    except NetslimError as e:  # an untraceable model trains all the same; it just gets no forecast
        log.warning("no pruning forecast during sparsity training: %s", e)
    return BNSparsity(raw, float(s)), controller, forecast


def _augment_label(spec: Any) -> str:
    """What the training batches get, as the start line prints it: "crop pad 2 + flip"."""
    parts = ([f"crop pad {spec.crop_pad}"] if spec.crop_pad else []) + (["flip"] if spec.flip else [])
    return " + ".join(parts) or "none"


def _json_line(record: dict) -> str:
    return json.dumps(record) + "\n"
