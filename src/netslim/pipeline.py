"""The whole Network Slimming job in one call: baseline -> sparsity -> prune -> fine-tune -> report.

    cfg = preset_config("quick")                    # or PipelineConfig(dataset=..., arch=..., ...)
    results = run_pipeline(cfg, "runs/quick")       # re-run the same call to resume

Every stage is an ordinary netslim run in its own folder under `run_dir`, so each one can
also be inspected, evaluated or profiled on its own:

    pipeline.json          the config (compared on every re-run) and the seed drawn for it
    baseline/              fit from scratch, no sparsity            (checkpoint.pt, model_best.pt, metrics.jsonl)
    sparsity/              fit from scratch with the L1 term on BN gammas (as the seed does)
    prune-50/              sparsity/model_best.pt pruned at 50%     (pruned.pt, prune.json)
    finetune-50/           fit of prune-50/pruned.pt, same recipe
    prune-70/ finetune-70/ one pair per further percent
    pass2/sparsity/ pass2/prune-50/ pass2/finetune-50/   with passes > 1: pass k starts from
                           pass k-1's fine-tuned model of the first percent
    results.md results.json plots/    written by report.write_report

A stage is finished when its folder holds `done.json` (written atomically, last). On a
re-run finished stages are skipped, an interrupted training stage continues from its
checkpoint.pt (fit(resume=...), exact on CPU), an interrupted prune stage is redone (it
takes seconds). A run_dir that holds a run of a different config is refused unless
`force`, which starts over.

Under torchrun (`torchrun --nproc-per-node N -m netslim pipeline ...`) every rank trains
each training stage (DistributedDataParallel, as `netslim train`); rank 0 alone decides
what is done, prunes, writes the bookkeeping and the report, and tells the others
(`_Ranks.on_rank0`). The run folder must be one folder every rank sees (a shared
filesystem across nodes): later stages read earlier stages' checkpoints from it.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, NetslimError
from .fileio import FolderLock, atomic_write_json, check_regular_file, results_in

log = logging.getLogger(__name__)

__all__ = [
    "PipelineConfig", "PRESETS", "PRESET_NOTES", "preset_config", "list_presets", "run_pipeline",
    "plan_stages", "Stage", "EventFn", "STAGE_KEYS", "DONE_NAME", "PIPELINE_NAME", "PIPELINE_OWN_TRAIN_FIELDS",
]

EventFn = Callable[[dict], None]

STAGE_KEYS = ("baseline", "sparsity", "finetune")   # the stages whose epochs can be set
DONE_NAME = "done.json"
PIPELINE_NAME = "pipeline.json"
PRUNED_NAME = "pruned.pt"
PRUNE_REPORT_NAME = "prune.json"
PIPELINE_FORMAT = "netslim-pipeline/1"

# TrainConfig fields the pipeline sets itself, per stage: not allowed in train_overrides.
PIPELINE_OWN_TRAIN_FIELDS = ("epochs", "batch_size", "lr", "sr", "s", "force", "distill")
RETRAIN_CHOICES = ("finetune", "scratch-b")
# train_overrides keys that go to load_dataset instead of TrainConfig.
_DATA_OVERRIDES = ("train_subset", "image_size", "val_split")
# Settings that change where or how fast a run goes, not its numbers: a resume may change them.
# `passes` may grow: pass k depends only on the passes before it, so `--passes 3` on a finished
# 1-pass run reuses pass 1 and adds passes 2 and 3.
_IGNORED_ON_COMPARE = ("data_dir", "download", "passes")
_IGNORED_OVERRIDES_ON_COMPARE = ("device", "log_every", "test_batch_size", "compile", "log")


# --------------------------------------------------------------------------- config


@dataclass
class PipelineConfig:
    """Everything that decides a pipeline run's numbers. Defaults: the seed's CIFAR recipe.

    `percents` are fractions of all BN channels (the seed's --percent 0.4), pruned from the
    same sparsity model; the first one is the "main" percent that later passes continue.
    `epochs` is one int for every stage or {"baseline", "sparsity", "finetune"}.
    `train_overrides` holds any other TrainConfig field (amp, seed, channels_last, momentum,
    nesterov, device, ...) and the data options `train_subset` (train on the first N images),
    `image_size` and `val_split` (imagefolder); they apply to every training stage.
    `s="auto"` with train_overrides {"target_sparsity": Q} lets the sparsity stage adjust s
    every epoch until a share Q of the BN factors is under 1e-2 (autopilot.py); `s_schedule`
    (constant, linear-decay, step-decay) is a train override too.
    """
    dataset: str = "cifar10"
    arch: str = "vgg"
    depth: Optional[int] = None
    arch_options: dict = field(default_factory=dict)          # e.g. {"width": 0.25}
    epochs: Union[int, dict] = 160
    batch_size: int = 64
    lr: float = 0.1                                           # per batch_size images, /10 at 50% and 75%
    s: Union[float, str] = 1e-4                               # sparsity strength of the sparsity stages, or
                                                              # "auto" with train_overrides target_sparsity
    percents: list = field(default_factory=lambda: [0.5])
    passes: int = 1
    max_layer_percent: Optional[float] = None                 # per-layer cap; the paper's multi-pass: 0.5
    prune_mode: str = "slim"                                  # slim | mask
    min_channels: int = 1
    round_to: Union[int, str] = 1                             # K, or "auto": widths measured in `runtime`
    runtime: str = "torch"                                    # where round_to="auto" measures (batch 1)
    compensate: bool = True                                   # fold removed channels' constants (compensate.py)
    remove_blocks: bool = True                                # a residual branch whose factors are all under the
                                                              # threshold goes whole (engine/blocks.py)
    recalibrate: int = 50                                     # BN recalibration batches after pruning; 0: none
    distill: bool = False                                     # fine-tune with the pruned sparsity model as teacher
    retrain: str = "finetune"                                 # finetune | scratch-b (retrain.py)
    train_overrides: dict = field(default_factory=dict)
    data_dir: Optional[str] = None
    download: bool = False

    def _check_runtime(self) -> None:
        """The runtime round_to="auto" measures in must exist here: found now, not after the training."""
        import importlib.util

        from .profile import RUNTIMES

        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime {self.runtime!r} is not valid: use {' or '.join(RUNTIMES)}")
        if self.round_to == "auto" and self.runtime == "onnxruntime":
            missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
            if missing:
                raise ConfigError(f"round_to 'auto' with runtime onnxruntime needs {' and '.join(missing)}, "
                                  "which is not installed: pip install netslim[onnx]")

    # ---- derived values

    def stage_epochs(self) -> dict[str, int]:
        """{"baseline", "sparsity", "finetune"} -> epochs."""
        if isinstance(self.epochs, dict):
            return {k: self.epochs[k] for k in STAGE_KEYS}
        return {k: self.epochs for k in STAGE_KEYS}

    def layer_cap(self, pass_no: int) -> Optional[float]:
        """The per-layer prune cap of pass `pass_no`: max_layer_percent, or, when it is unset,
        none in pass 1 and the paper's 0.5 in later passes (its multi-pass runs capped every
        layer at 50% so that repeated global cuts cannot empty a layer)."""
        if self.max_layer_percent is not None:
            return self.max_layer_percent
        return 0.5 if pass_no > 1 else None

    def data_options(self) -> dict:
        """load_dataset's keyword arguments."""
        return {"data_dir": self.data_dir, "download": self.download,
                **{k: self.train_overrides.get(k) for k in _DATA_OVERRIDES}}

    # ---- checks and (de)serialisation

    def validate(self) -> None:
        """Raise ConfigError naming the first value that cannot be used (cheap: no data, no model)."""
        from .data import IMAGEFOLDER, get_spec
        from .models import check_depth, list_models, model_info
        from .train import TrainConfig

        if self.dataset != IMAGEFOLDER:
            get_spec(self.dataset)
        if self.arch not in list_models():
            raise ConfigError(f"unknown arch {self.arch!r}: use one of {', '.join(list_models())}")
        check_depth(self.arch, self.depth)
        if not isinstance(self.arch_options, dict):
            raise ConfigError(f"arch_options must be a dict such as {{'width': 0.25}}, got {self.arch_options!r}")
        valid_opts = model_info(self.arch)["options"]
        unknown = sorted(set(self.arch_options) - set(valid_opts))
        if unknown:
            raise ConfigError(f"unknown arch option {', '.join(unknown)} for {self.arch}: valid options are "
                              f"{', '.join(valid_opts) or 'none'}")
        if isinstance(self.epochs, dict):
            extra = sorted(set(self.epochs) - set(STAGE_KEYS))
            missing = [k for k in STAGE_KEYS if k not in self.epochs]
            if extra or missing:
                raise ConfigError(f"epochs {self.epochs!r} is not valid: give one int, or a dict with exactly "
                                  f"the keys {', '.join(STAGE_KEYS)}")
        for stage, e in self.stage_epochs().items():
            if isinstance(e, bool) or not isinstance(e, int) or e < 1:
                raise ConfigError(f"epochs for {stage} {e!r} is not valid: use an integer >= 1")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch size {self.batch_size!r} is not valid: use an integer >= 1")
        if not isinstance(self.percents, (list, tuple)) or not self.percents:
            raise ConfigError(f"percents {self.percents!r} is not valid: give at least one fraction, e.g. [0.5]")
        for p in self.percents:
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
                hint = f" (use {p / 100:g} for {p:g}%)" if isinstance(p, (int, float)) and 1 <= p < 100 else ""
                raise ConfigError(f"percent {p!r} is not valid: use a fraction in (0, 1) of the channels{hint}")
        labels = [percent_label(p) for p in self.percents]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"percents {self.percents!r} repeat a value: give each percent once")
        if isinstance(self.passes, bool) or not isinstance(self.passes, int) or self.passes < 1:
            raise ConfigError(f"passes {self.passes!r} is not valid: use an integer >= 1")
        if self.prune_mode not in ("slim", "mask"):
            raise ConfigError(f"prune mode {self.prune_mode!r} is not valid: use slim or mask")
        if self.max_layer_percent is not None and not (
                isinstance(self.max_layer_percent, (int, float)) and 0 <= self.max_layer_percent <= 1):
            raise ConfigError(f"max_layer_percent {self.max_layer_percent!r} is not valid: use a fraction in [0, 1]")
        for name in ("min_channels", "round_to"):
            v = getattr(self, name)
            if (isinstance(v, bool) or not isinstance(v, int) or v < 1) and not (name == "round_to" and v == "auto"):
                raise ConfigError(f"{name} {v!r} is not valid: use an integer >= 1" + " or 'auto'" * (name == "round_to"))
        self._check_runtime()
        if self.retrain not in RETRAIN_CHOICES:
            raise ConfigError(f"retrain {self.retrain!r} is not valid: use {' or '.join(RETRAIN_CHOICES)}")
        if isinstance(self.recalibrate, bool) or not isinstance(self.recalibrate, int) or self.recalibrate < 0:
            raise ConfigError(f"recalibrate {self.recalibrate!r} is not valid: use a number of batches >= 0")
        if not isinstance(self.train_overrides, dict):
            raise ConfigError(f"train_overrides must be a dict, got {self.train_overrides!r}")
        own = sorted(set(self.train_overrides) & set(PIPELINE_OWN_TRAIN_FIELDS))
        if own:
            raise ConfigError(f"train_overrides may not set {', '.join(own)}: the pipeline sets them per stage "
                              "(use PipelineConfig.epochs / batch_size / lr / s, and force=run_pipeline's)")
        known = {f.name for f in dataclasses.fields(TrainConfig)} | set(_DATA_OVERRIDES)
        unknown = sorted(set(self.train_overrides) - known)
        if unknown:
            raise ConfigError(f"unknown train override {', '.join(unknown)}: use TrainConfig fields "
                              f"({', '.join(sorted(known - set(PIPELINE_OWN_TRAIN_FIELDS)))})")
        ts = self.train_overrides.get("train_subset")
        if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int) or ts < 1):
            raise ConfigError(f"train_subset {ts!r} is not valid: use an integer >= 1")
        for stage in ("baseline", "sparsity", "finetune"):
            try:  # lr, s, amp, momentum, ... checked as fit would check them
                self.train_config(stage, seed=0).validate()
            except TypeError as e:  # e.g. milestones given as one number
                raise ConfigError(f"train_overrides {self.train_overrides!r} do not fit TrainConfig ({e})") from None

    def train_config(self, stage: str, *, seed: int) -> Any:
        """The TrainConfig of a training stage ("baseline", "sparsity" or "finetune")."""
        from .train import TrainConfig
        kw = {k: v for k, v in self.train_overrides.items() if k not in _DATA_OVERRIDES}
        if "milestones" in kw:
            kw["milestones"] = tuple(kw["milestones"])
        kw.setdefault("seed", seed)
        kw.setdefault("forecast_percent", float(self.percents[0]))  # sparsity epochs forecast the first percent
        return TrainConfig(epochs=self.stage_epochs()[stage], batch_size=self.batch_size, lr=self.lr,
                           sr=stage == "sparsity", s=self.s, **kw)

    def as_dict(self) -> dict:
        """JSON types only; epochs always per stage, percents as floats."""
        d = dataclasses.asdict(self)
        d["epochs"] = self.stage_epochs()
        d["percents"] = [float(p) for p in self.percents]
        return json.loads(json.dumps(d))

    def comparable(self) -> dict:
        """as_dict() without the settings a resumed run may change (data location, device, ...)."""
        d = self.as_dict()
        for k in _IGNORED_ON_COMPARE:
            d.pop(k, None)
        d["train_overrides"] = {k: v for k, v in d["train_overrides"].items()
                                if k not in _IGNORED_OVERRIDES_ON_COMPARE}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineConfig":
        """Inverse of as_dict(); unknown keys are a ConfigError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown pipeline setting {', '.join(unknown)}: valid are {', '.join(sorted(known))}")
        return cls(**copy.deepcopy(d))


def percent_label(p: float) -> str:
    """0.5 -> "50", 0.375 -> "37.5": the percent as folder names and table headers show it."""
    return f"{round(p * 100, 6):g}"


# --------------------------------------------------------------------------- presets

_SEED_RECIPE = {"lr": 0.1, "batch_size": 64}  # the seed's main.py defaults (SGD 0.1, /10 at 50% and 75%)

_PRESET_SETTINGS: dict[str, dict] = {
    # Fashion-MNIST is the data set installed on these machines (CIFAR cannot be downloaded here).
    # Epochs are sized for ~10 minutes on a 2-core CPU with bf16 autocast (~20-25 s per epoch);
    # change them with preset_config("quick", epochs={...}).
    # s = 1e-3, not the seed's 1e-4: the L1 step moves a gamma by at most sum(lr * s) over the run,
    # 160 epochs x 782 steps x 0.053 (mean lr) x 1e-4 = 0.66 in the seed's CIFAR runs, but only
    # 6 x 469 x 0.052 x 1e-4 = 0.015 in 6 epochs at batch 128: too little to move a gamma that
    # starts at 0.5. Measured: 8 epochs at 1e-4 left no |gamma| under 0.01 (BENCHMARKS.md).
    "quick": dict(dataset="fashion-mnist", arch="vgg", depth=13, arch_options={"width": 0.25},
                  epochs={"baseline": 6, "sparsity": 6, "finetune": 4}, batch_size=128, lr=0.1, s=1e-3,
                  percents=[0.5, 0.7], train_overrides={"seed": 0}),
    # The quick model at 70% with the recovery that won (BENCHMARKS.md "Recovery"): sparsity
    # trained until 70% of the factors are under 1e-2 (--s auto), then Scratch-B instead of a
    # fine-tune: 93.10% (3 seeds) against the baseline's 92.38%, with 80% fewer FLOPs.
    "quick-scratch-b": dict(dataset="fashion-mnist", arch="vgg", depth=13, arch_options={"width": 0.25},
                            epochs={"baseline": 6, "sparsity": 6, "finetune": 4}, batch_size=128, lr=0.1,
                            s="auto", percents=[0.7], retrain="scratch-b",
                            train_overrides={"seed": 0, "target_sparsity": 0.7}),
    "cifar10-vgg13": dict(dataset="cifar10", arch="vgg", depth=13, epochs=99, batch_size=512, lr=0.1, s=1e-4,
                          percents=[0.4]),
    "cifar10-resnet164": dict(dataset="cifar10", arch="resnet", depth=164, epochs=99, batch_size=256, lr=0.1,
                              s=1e-5, percents=[0.4, 0.6]),
    "cifar10-densenet40": dict(dataset="cifar10", arch="densenet", depth=40, epochs=160, s=1e-5,
                               percents=[0.4, 0.6], **_SEED_RECIPE),
    "cifar100-vgg19": dict(dataset="cifar100", arch="vgg", depth=19, epochs=160, s=1e-4, percents=[0.5],
                           **_SEED_RECIPE),
    "cifar100-resnet164": dict(dataset="cifar100", arch="resnet", depth=164, epochs=160, s=1e-5,
                               percents=[0.4, 0.6], **_SEED_RECIPE),
    "cifar100-densenet40": dict(dataset="cifar100", arch="densenet", depth=40, epochs=160, s=1e-5,
                                percents=[0.4, 0.6], **_SEED_RECIPE),
}

# Each preset is a PipelineConfig: the same typed configuration a command line or a library call makes.
PRESETS: dict[str, PipelineConfig] = {name: PipelineConfig(**kw) for name, kw in _PRESET_SETTINGS.items()}

PRESET_NOTES: dict[str, str] = {
    "quick": "Fashion-MNIST, vgg-13 at width 0.25, seed recipe (SGD 0.1, /10 at 50%/75%), batch 128, s 1e-3, "
             "6+6 epochs, prune 50% and 70%, fine-tune 4; ~10 min on a 2-core CPU",
    "quick-scratch-b": "the quick model pruned 70% with the best measured recovery: s auto to 70% of |gamma| "
                       "under 1e-2, Scratch-B for 6 dense epochs' FLOPs (~30 slim epochs); ~25 min on a 2-core CPU",
    "cifar10-vgg13": "seed table 'CIFAR10-Vgg-13': s 1e-4, batch 512, 99 epochs, prune 40%, fine-tune 99",
    "cifar10-resnet164": "seed table 'CIFAR10-Resnet-164': s 1e-5, batch 256, 99 epochs, prune 40% and 60%, "
                         "fine-tune 99",
    "cifar10-densenet40": "seed table 'CIFAR10-Densenet-40': s 1e-5, batch 64, 160 epochs, prune 40% and 60%, "
                          "fine-tune 160",
    "cifar100-vgg19": "seed table 'CIFAR100-Vgg' (20.04M params: vgg-19): s 1e-4, batch 64, 160 epochs, "
                      "prune 50%, fine-tune 160",
    "cifar100-resnet164": "seed table 'CIFAR100-Resnet-164': s 1e-5, batch 64, 160 epochs, prune 40% and 60%, "
                          "fine-tune 160",
    "cifar100-densenet40": "seed table 'CIFAR100-Densenet-40': s 1e-5, batch 64, 160 epochs, prune 40% and "
                           "60%, fine-tune 160",
}


def list_presets() -> list[str]:
    """The preset names, 'quick' first."""
    return list(PRESETS)


def preset_config(name: str = "quick", **overrides: Any) -> PipelineConfig:
    """The PipelineConfig of preset `name`, with `overrides` (PipelineConfig fields) on top.

    Overrides win; None values are ignored, so a command line can pass unset flags through.
    `epochs`, `train_overrides` and `arch_options` given as dicts update the preset's dicts
    (epochs={"finetune": 8} changes only fine-tuning); an int `epochs` sets every stage.
    Changing `arch` without `depth` / `arch_options` drops the preset's (they belong to its
    architecture). Raises ConfigError for an unknown preset or setting, or an invalid result.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    base = dataclasses.asdict(PRESETS[name])  # a deep copy
    given = {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"unknown pipeline setting {', '.join(unknown)}: valid are {', '.join(sorted(known))}")
    if "arch" in given and given["arch"] != base.get("arch"):
        base.pop("depth", None)
        base.pop("arch_options", None)
    for key in ("train_overrides", "arch_options"):
        if key in given and isinstance(given[key], dict):
            given[key] = {**base.get(key, {}), **given[key]}
    if isinstance(given.get("epochs"), dict):
        old = base.get("epochs", PipelineConfig.epochs)
        old = old if isinstance(old, dict) else {k: old for k in STAGE_KEYS}
        given["epochs"] = {**old, **given["epochs"]}
    if "percents" in given and isinstance(given["percents"], (int, float)):
        given["percents"] = [given["percents"]]
    cfg = PipelineConfig(**{**base, **given})
    cfg.validate()
    return cfg


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline. `key` is also its folder, relative to the run dir."""
    key: str                      # "baseline", "prune-50", "pass2/finetune-50"
    kind: str                     # "train" | "prune"
    role: str                     # "baseline" | "sparsity" | "prune" | "finetune"
    pass_no: int
    percent: Optional[float] = None
    source: Optional[str] = None  # key of the stage whose model this one starts from

    @property
    def output(self) -> str:
        """The file later stages and the report read (relative to the stage folder)."""
        return PRUNED_NAME if self.kind == "prune" else "model_best.pt"


def plan_stages(cfg: PipelineConfig) -> list[Stage]:
    """The stages of `cfg`, in run order."""
    stages = [Stage("baseline", "train", "baseline", 1), Stage("sparsity", "train", "sparsity", 1)]
    for p in cfg.percents:
        lab = percent_label(p)
        stages.append(Stage(f"prune-{lab}", "prune", "prune", 1, p, "sparsity"))
        stages.append(Stage(f"finetune-{lab}", "train", "finetune", 1, p, f"prune-{lab}"))
    main = percent_label(cfg.percents[0])
    prev = f"finetune-{main}"
    for k in range(2, cfg.passes + 1):
        pre = f"pass{k}/"
        stages.append(Stage(pre + "sparsity", "train", "sparsity", k, None, prev))
        stages.append(Stage(pre + f"prune-{main}", "prune", "prune", k, cfg.percents[0], pre + "sparsity"))
        stages.append(Stage(pre + f"finetune-{main}", "train", "finetune", k, cfg.percents[0], pre + f"prune-{main}"))
        prev = pre + f"finetune-{main}"
    return stages


def _owned_paths(run_dir: Path) -> list[Path]:
    """What a pipeline writes in run_dir (and `force` removes); nothing else there is touched."""
    names = re.compile(r"^(baseline|sparsity|plots|(prune|finetune)-[0-9.]+|pass[0-9]+)$")
    out = [p for p in run_dir.iterdir() if p.is_dir() and names.match(p.name)] if run_dir.is_dir() else []
    out += [run_dir / n for n in (PIPELINE_NAME, "results.md", "results.json") if (run_dir / n).exists()]
    return sorted(out)


def _check_run_dir(run_dir: Path, cfg: PipelineConfig, force: bool) -> int:
    """Claim run_dir for `cfg`: returns the run's seed; refuses another config's run unless force."""
    path = run_dir / PIPELINE_NAME
    want = cfg.comparable()
    stored: Optional[dict] = None
    if path.exists() or path.is_symlink():
        try:
            stored = _read_pipeline_file(path)
        except (ValueError, OSError, NetslimError) as e:
            if not force:
                raise NetslimError(f"{path} is not a readable pipeline file ({e}); pass force (--force) to "
                                   "start the run over") from None
            stored = None
    if stored is not None and not force:
        have = stored.get("compare") or {}
        if have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            detail = "; ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in diff[:3])
            raise NetslimError(f"{run_dir} holds a pipeline run with different settings ({detail}); re-run with "
                               "the same settings to resume it, choose another folder, or pass force (--force) "
                               "to start over")
        if (stored.get("config") or {}).get("passes") != cfg.passes:
            atomic_write_json(path, {**stored, "config": cfg.as_dict(), "compare": want})
        return int(stored["seed"])
    owned = _owned_paths(run_dir)
    # any result counts: a train or prune run's files there too (force leaves those alone)
    others = [n for n in results_in(run_dir) if not any(p.name == n for p in owned)]
    if (owned or others) and not force:
        found = [p.name for p in owned] + others
        raise NetslimError(f"{run_dir} holds results ({', '.join(found[:4])}) but no "
                           f"{PIPELINE_NAME}; choose another folder or pass force (--force) to start over")
    for p in owned:
        log.info("force: removing %s", p)
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    seed = cfg.train_overrides.get("seed")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")  # recorded so a resumed run uses the same one
    atomic_write_json(path, {"format": PIPELINE_FORMAT, "config": cfg.as_dict(), "compare": want,
                             "seed": int(seed), "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return int(seed)


def _read_pipeline_file(path: Path) -> dict:
    """pipeline.json as written by _check_run_dir; ValueError naming what is wrong with it."""
    stored = json.loads(check_regular_file(path, "pipeline file").read_text(encoding="utf-8"))
    if not isinstance(stored, dict) or stored.get("format") != PIPELINE_FORMAT:
        raise ValueError("not a pipeline file")
    seed = stored.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"its seed {seed!r} is not an integer >= 0")
    for key in ("config", "compare"):
        if not isinstance(stored.get(key), dict):
            raise ValueError(f"its {key!r} is not a JSON object")
    return stored


def read_done(stage_dir: Path) -> Optional[dict]:
    """The stage's done.json, or None when the stage has not finished."""
    p = stage_dir / DONE_NAME
    if not p.exists():
        return None
    try:
        return json.loads(check_regular_file(p, "stage marker").read_text(encoding="utf-8"))
    except (ValueError, OSError, NetslimError):
        return None  # a damaged marker: redo the stage (training resumes from checkpoint.pt)


# --------------------------------------------------------------------------- running


class _Ranks:
    """The processes of one pipeline run: one without torchrun, else the process group's."""

    def __init__(self) -> None:
        from .train import _world
        self.rank, self.world = _world()

    def on_rank0(self, fn: Callable[[], Any]) -> Any:
        """fn() on rank 0 only; every rank returns its result, or raises its error.

        Also a barrier: no rank goes on before rank 0 has finished fn (and written its files).
        """
        if self.world == 1:
            return fn()
        import torch.distributed as dist
        box: list = [None]
        error: Optional[BaseException] = None
        if self.rank == 0:
            try:
                box = [("ok", fn())]
            except BaseException as e:  # the others must hear of it, or they wait forever
                error = e
                box = [("error", isinstance(e, NetslimError), str(e))]
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        status, *rest = box[0]
        if status == "ok":
            return rest[0]
        is_user_error, message = rest
        raise NetslimError(message) if is_user_error else RuntimeError(f"rank 0 failed: {message}")


class _Runner:
    """Runs the stages of one pipeline; holds the lazily loaded data set."""

    def __init__(self, cfg: PipelineConfig, run_dir: Path, seed: int, on_event: Optional[EventFn],
                 ranks: Optional[_Ranks] = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.seed = seed
        self.on_event = on_event
        self.ranks = ranks or _Ranks()
        self._data: Any = None

    def emit(self, event: dict) -> None:
        if self.on_event is not None and self.ranks.rank == 0:
            self.on_event(event)

    @property
    def data(self) -> Any:
        """The data set, read on first use (a fully finished run never reads it)."""
        if self._data is None:
            from .data import load_dataset
            self._data = load_dataset(self.cfg.dataset, **self.cfg.data_options())
        return self._data

    def arch_dict(self, spec: Any) -> dict:
        """The build_model arguments of the dense model, as checkpoints record them."""
        from .models import model_info
        info = model_info(self.cfg.arch)
        out: dict = {"name": self.cfg.arch}
        if info["default_depth"] is not None:
            out["depth"] = info["default_depth"] if self.cfg.depth is None else self.cfg.depth
        out["num_classes"] = spec.num_classes
        out["in_channels"] = spec.in_channels
        out.update(self.cfg.arch_options)
        if "image_size" in info["options"] and "image_size" not in out:
            out["image_size"] = spec.image_size
        return out

    def run_meta(self, stage: Stage, spec: Any, arch: dict, input_size: list) -> dict:
        """What fit stores in the stage's checkpoints besides the model (and its plan/mask)."""
        opts = self.cfg.data_options()
        return {"arch": arch, "dataset": spec.as_dict(), "input_size": list(input_size),
                "data_options": {**opts,
                                 "data_dir": str(Path(opts["data_dir"]).resolve()) if opts["data_dir"] else None},
                "pipeline_stage": stage.key}

    def stage_dir(self, stage: Stage | str) -> Path:
        return self.run_dir / (stage.key if isinstance(stage, Stage) else stage)

    def source_checkpoint(self, stage: Stage) -> Path:
        src = next(s for s in plan_stages(self.cfg) if s.key == stage.source)
        path = self.stage_dir(src) / src.output
        if not path.exists():
            raise CheckpointError(f"{path} is missing although stage {src.key} is marked done; "
                                  "pass force (--force) to redo the run")
        return path

    # ---- training stages

    def train(self, stage: Stage, resume: bool) -> dict:
        from .checkpoint import load_checkpoint
        from .models import build_model
        from .train import CHECKPOINT_NAME, fit

        save = self.stage_dir(stage)
        data = self.data
        spec = data.spec
        tcfg = self.cfg.train_config(stage.role, seed=self.seed)
        if stage.source is None:  # from scratch
            arch = self.arch_dict(spec)
            torch.manual_seed(tcfg.seed)  # same seed, same initial weights: baseline and sparsity start alike
            model = build_model(arch["name"], **{k: v for k, v in arch.items() if k != "name"})
            input_size = [spec.in_channels, spec.image_size, spec.image_size]
        else:
            model, meta = load_checkpoint(self.source_checkpoint(stage))
            model.train()
            arch = dict(meta["arch"])
            input_size = meta.get("input_size") or [spec.in_channels, spec.image_size, spec.image_size]
            if stage.role == "finetune":
                model, tcfg = self.recovery(stage, model, meta, tcfg)
        ckpt = save / CHECKPOINT_NAME if resume else None
        if ckpt is not None:
            log.info("stage %s: resuming from %s", stage.key, ckpt)

        def progress(ev: dict) -> None:
            self.emit({**ev, "stage": stage.key})

        summary = fit(model, data, tcfg, save, meta=self.run_meta(stage, spec, arch, input_size),
                      resume=ckpt, on_progress=progress)
        return {"best_top1": summary["best_top1"], "final_top1": summary["final_top1"],
                "epochs": summary["epochs"], "seed": summary["seed"], "resumed": resume}

    def recovery(self, stage: Stage, pruned: nn.Module, meta: dict, tcfg: Any) -> tuple[nn.Module, Any]:
        """How a fine-tune stage recovers: the teacher (distill) and the start (Scratch-B)."""
        from .retrain import scratch_b_epochs, scratch_model

        prune_stage = next(s for s in plan_stages(self.cfg) if s.key == stage.source)
        if self.cfg.distill:  # the teacher: the sparsity model this stage's model was pruned from
            tcfg = dataclasses.replace(tcfg, distill=str(self.source_checkpoint(prune_stage).resolve()))
        if self.cfg.retrain == "scratch-b":
            dense_epochs = self.cfg.stage_epochs()["sparsity"]   # what the dense model trained for
            pruned, _ = scratch_model(self.source_checkpoint(stage), seed=tcfg.seed)
            epochs, ratio = scratch_b_epochs(pruned, meta, dense_epochs)
            log.info("stage %s: Scratch-B, random init, %d epochs = %d x %.2f", stage.key, epochs, dense_epochs, ratio)
            tcfg = dataclasses.replace(tcfg, epochs=epochs)
        return pruned, tcfg

    # ---- prune stages

    def prune(self, stage: Stage) -> dict:
        from .checkpoint import load_checkpoint, save_checkpoint
        from .engine.prune import prune
        from .recalibrate import recalibrate_on_training_data
        from .train import evaluate, resolve_device

        src = self.source_checkpoint(stage)
        model, meta = load_checkpoint(src)
        cap = self.cfg.layer_cap(stage.pass_no)
        pruned, report = prune(model, float(stage.percent), mode=self.cfg.prune_mode,
                               min_channels=self.cfg.min_channels, max_layer_percent=cap,
                               round_to=self.cfg.round_to, runtime=self.cfg.runtime,
                               compensate=self.cfg.compensate, remove_blocks=self.cfg.remove_blocks)
        # Top-1 right after pruning, before fine-tuning (the seed's "Prune (40%)" column), evaluated
        # as fit evaluates: same device, autocast and memory layout, so the columns compare.
        tcfg = self.cfg.train_config("finetune", seed=self.seed)
        device = resolve_device(tcfg.device)
        pruned.to(device)
        cl = tcfg.channels_last and any(isinstance(m, nn.Conv2d) for m in pruned.modules())
        if cl:
            pruned.to(memory_format=torch.channels_last)
        data = self.data
        def score() -> tuple[float, float]:
            return evaluate(pruned, data.test_x, data.test_y, data.spec, batch_size=tcfg.test_batch_size,
                            device=device, amp=tcfg.amp, channels_last=cl)
        loss, top1 = score()
        metrics = {"test_top1": top1, "test_loss": loss, "evaluated": "after pruning, before fine-tuning"}
        if self.cfg.recalibrate:
            used = recalibrate_on_training_data(pruned, data, self.cfg.recalibrate, batch_size=self.cfg.batch_size,
                                                device=device, seed=self.seed, channels_last=cl)
            report["recalibration"] = {"batches": used, "top1_before": top1, "loss_before": loss}
            loss, top1 = score()
            metrics.update(test_top1=top1, test_loss=loss, top1_before_recalibration=report["recalibration"]["top1_before"],
                           evaluated="after pruning and BN recalibration, before fine-tuning")
        pruned.to("cpu")
        keep = {k: meta[k] for k in ("arch", "dataset", "input_size", "data_options") if meta.get(k) is not None}
        out = self.stage_dir(stage)
        with FolderLock(out) as lock:  # (removes the temporaries of a write a kill -9 interrupted)
            lock.acquire(create=True)
            save_checkpoint(out / PRUNED_NAME, pruned, **keep, metrics=metrics, pipeline_stage=stage.key,
                            prune={k: v for k, v in report.items() if k != "layers"})
            atomic_write_json(out / PRUNE_REPORT_NAME, {"source": str(src.relative_to(self.run_dir)),
                                                        "test_top1": top1, "test_loss": loss, **report})
        log.info("stage %s: kept %d of %d channels, top-1 %.2f%% before fine-tuning",
                 stage.key, report["channels_kept"], report["channels_total"], top1)
        return {"top1": top1, "threshold": report["threshold"], "channels_total": report["channels_total"],
                "channels_kept": report["channels_kept"], "max_layer_percent": cap}

    # ---- the loop

    def stage_state(self, stage: Stage) -> str:
        """'done', 'resume' (an interrupted training stage) or 'new'."""
        folder = self.stage_dir(stage)
        if read_done(folder) is not None:
            if not (folder / stage.output).exists():
                raise CheckpointError(f"stage {stage.key} is marked done but {folder / stage.output} is missing; "
                                      "pass force (--force) to redo the run")
            return "done"
        return "resume" if stage.kind == "train" and (folder / "checkpoint.pt").exists() else "new"

    def run(self) -> None:
        stages = plan_stages(self.cfg)
        on_rank0 = self.ranks.on_rank0
        self.emit({"event": "pipeline_start", "run_dir": str(self.run_dir), "stages": [s.key for s in stages],
                   "seed": self.seed, "world_size": self.ranks.world})
        for i, stage in enumerate(stages, 1):
            folder = self.stage_dir(stage)
            state = on_rank0(lambda: self.stage_state(stage))  # every rank acts on rank 0's view
            common = {"stage": stage.key, "kind": stage.kind, "role": stage.role, "pass": stage.pass_no,
                      "percent": stage.percent, "index": i, "total": len(stages)}
            if state == "done":
                log.info("stage %s: finished earlier, skipped", stage.key)
                self.emit({"event": "stage_skip", **common, "reason": "done"})
                continue
            epochs = self.cfg.stage_epochs()[stage.role] if stage.kind == "train" else None
            self.emit({"event": "stage_start", **common, "epochs": epochs, "resume": state == "resume"})
            log.info("stage %d/%d: %s", i, len(stages), stage.key)
            t0 = time.perf_counter()
            if stage.kind == "train":  # every rank trains (DDP under torchrun)
                result = self.train(stage, resume=state == "resume")
            else:  # pruning takes seconds and needs no data parallelism: rank 0 alone
                result = on_rank0(lambda: self.prune(stage))
            seconds = time.perf_counter() - t0
            on_rank0(lambda: atomic_write_json(folder / DONE_NAME, {
                "stage": stage.key, "kind": stage.kind, "seconds": seconds,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **result}))
            self.emit({"event": "stage_end", **common, "seconds": seconds, **result})


def run_pipeline(cfg: PipelineConfig, run_dir: str | os.PathLike, *, on_event: Optional[EventFn] = None,
                 force: bool = False, latency_seconds: float = 0.5) -> dict:
    """Run (or resume) every stage of `cfg` in `run_dir`, then write the report; returns the results.

    `on_event(dict)` receives {"event": "pipeline_start" | "stage_start" | "stage_skip" |
    "stage_end" | "report_start" | "pipeline_end", "stage": key, ...} and fit's own
    progress events ("start", "step", "epoch") with the stage's key added. An exception
    raised by on_event stops the run; re-running resumes it. `force` discards whatever
    run_dir holds from an earlier pipeline (its stage folders and report; other files stay)
    and starts over. `latency_seconds` is the time spent per latency measurement in the
    report. Raises ConfigError for a bad config, NetslimError for a run_dir holding another
    config's run, TrainingInterrupted on SIGINT/SIGTERM (re-run to resume).

    Under torchrun (WORLD_SIZE > 1) every rank calls this; the training stages run data
    parallel, rank 0 alone writes, and every rank returns the same results.
    """
    from .train import init_distributed

    cfg.validate()
    _, _, _, created = init_distributed(cfg.train_overrides.get("device", "auto"))
    try:
        results = _run_pipeline(cfg, Path(run_dir), on_event, force, latency_seconds)
        if created:  # no rank tears the group down while another still reads from it (gloo aborts)
            torch.distributed.barrier()
        return results
    finally:
        if created:
            torch.distributed.destroy_process_group()
            # Free the collectives' last tensors now rather than during interpreter teardown,
            # where gloo now and then aborts a finished process ("terminate called without an
            # active exception"; 2 of 8 runs before, 0 of 12 after). `python -m netslim` also
            # skips the teardown under torchrun (__main__.py).
            gc.collect()


def _run_pipeline(cfg: PipelineConfig, run_dir: Path, on_event: Optional[EventFn], force: bool,
                  latency_seconds: float) -> dict:
    ranks = _Ranks()
    # rank 0 writes and holds the run folder's lock for the whole run: a second pipeline (or a
    # train / prune) there is refused at once, before any data is loaded
    lock = FolderLock(run_dir)
    try:
        ranks.on_rank0(lambda: lock.acquire() and None)
        return _run_pipeline_locked(cfg, run_dir, on_event, force, latency_seconds, ranks, lock)
    finally:
        lock.release()


def _run_pipeline_locked(cfg: PipelineConfig, run_dir: Path, on_event: Optional[EventFn], force: bool,
                         latency_seconds: float, ranks: _Ranks, lock: FolderLock) -> dict:
    from .fileio import check_writable_folder
    from .report import collect_results, write_report
    from .train import load_dataset_per_node

    data = None
    if ranks.on_rank0(lambda: force or not (run_dir / PIPELINE_NAME).exists()):
        # a new run: fail on missing or damaged data before anything is written (the folder,
        # pipeline.json); it is read for the first stage anyway
        ranks.on_rank0(lambda: check_writable_folder(run_dir))
        data = load_dataset_per_node(cfg.dataset, **cfg.data_options())  # one download per node

    def claim_run_dir() -> int:
        lock.acquire(create=True)
        return _check_run_dir(run_dir, cfg, force)

    seed = ranks.on_rank0(claim_run_dir)
    t0 = time.perf_counter()
    runner = _Runner(cfg, run_dir, seed, on_event, ranks)
    runner._data = data
    runner.run()
    runner.emit({"event": "report_start", "run_dir": str(run_dir)})

    def report() -> dict:
        results = collect_results(run_dir, latency_seconds=latency_seconds)
        results["report"] = write_report(run_dir, results)
        return results

    results = ranks.on_rank0(report)
    files = results["report"]
    runner.emit({"event": "pipeline_end", "run_dir": str(run_dir), "seconds": time.perf_counter() - t0,
                 "results": files["json"], "markdown": files["markdown"]})
    return results
