"""The `netslim` command line: argparse subcommands that call the library. Printing lives here only.

    netslim train    --dataset D --arch A --depth N [...]   (-sr --s S: sparsity training)
    netslim finetune --checkpoint PRUNED [...]               (= train --refine PRUNED)
    netslim eval     --checkpoint C [--dataset D]
    netslim prune    --checkpoint C --percent P | --target-flops F | --target-params F [--mode slim|mask] [--save DIR]
    netslim profile  --checkpoint C | --arch A --depth N --dataset D
    netslim export   --checkpoint C --onnx FILE [--pad-channels auto|off|N] [--torchscript FILE]
    netslim pipeline [--preset quick] [--save DIR] [any train/prune flag]

Exit status: 0 done; 2 a user error (one line `netslim: error: ...` on stderr, no
traceback, nothing written); 130 / 143 training stopped by SIGINT / SIGTERM (it prints how
to resume); 130 Ctrl-C elsewhere.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TextIO

from . import __version__
from .errors import ConfigError, DatasetError, NetslimError

log = logging.getLogger("netslim")


# --------------------------------------------------------------------------- parser plumbing


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `netslim: error: <what> (see <prog> --help)`, exit 2."""

    commands: dict[str, argparse.ArgumentParser] = {}  # the subcommands' parsers, by name (top level)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"netslim: error: {message} (see {self.prog} --help)\n")


def _int_at_least(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {v}")
        return v
    return parse


def _int_or_auto(text: str) -> Any:
    return "auto" if text == "auto" else _int_at_least(1)(text)


def _pad_setting(text: str) -> Any:
    return text if text in ("auto", "off") else _int_at_least(2)(text)


def _float_where(ok: Callable[[float], bool], want: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return v
    return parse


_positive = _float_where(lambda v: v > 0 and v != float("inf"), "> 0")
_non_negative = _float_where(lambda v: 0 <= v < float("inf"), ">= 0")
_unit = _float_where(lambda v: 0 <= v < 1, "in [0, 1)")


def _forecast_text(f: Optional[dict]) -> str:
    """'; pruning 50% now: threshold 0.07, 47% of FLOPs and 20% of params left, ...' (or '')."""
    if not f:
        return ""
    at_min = f["at_min_channels"]
    return (f"; pruning {100 * f['percent']:g}% now: threshold {f['threshold']:.3g}, {100 * f['flops_left']:.0f}% "
            f"of FLOPs and {100 * f['params_left']:.0f}% of params left"
            + (f", {len(at_min)} layer(s) emptied but for min_channels ({', '.join(at_min[:3])}"
               f"{' ...' if len(at_min) > 3 else ''})" if at_min else "")
            + (f", {len(gone)} block(s) removed ({', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''})"
               if (gone := f.get("removed_blocks")) else ""))


def _s_value(text: str) -> "float | str":
    """--s: a sparsity strength >= 0, or auto (the controller of autopilot.py)."""
    return "auto" if text.strip().lower() == "auto" else _non_negative(text)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


_OTHER_RANKS_ERROR_DELAY_S = 3.0


# --------------------------------------------------------------------------- progress display


class Progress:
    """Turns fit()'s progress events into a start line and a progress bar on stderr and a line
    per epoch on stdout.

    The bar is tqdm's, redrawn in place, and only on a terminal: a log file or a CI pipe gets
    the start and epoch lines alone. `quiet` (--quiet) shows nothing at all.
    """

    def __init__(self, err: Optional[TextIO] = None, out: Optional[TextIO] = None, quiet: bool = False):
        self.err = err if err is not None else sys.stderr  # looked up now: tests swap sys.stderr
        self.out = out if out is not None else sys.stdout
        self.quiet = quiet
        self.show_bar = not quiet and bool(getattr(self.err, "isatty", lambda: False)())
        self.bar: Any = None

    def __call__(self, ev: dict) -> None:
        if self.quiet:
            return
        kind = ev["event"]
        if kind == "start":
            resumed = f", resuming after epoch {ev['start_epoch']}" if ev["start_epoch"] else ""
            procs = f", {ev['world_size']} processes" if ev["world_size"] > 1 else ""
            batch = ("batches from the caller's loader" if ev.get("batch_size") is None
                     else f"global batch {ev['batch_size']} ({ev['batch_per_process']} per process)"
                     if ev["world_size"] > 1 else f"batch {ev['batch_size']}")
            sched = (f"lr decays at epochs {ev['milestones']}" if ev.get("schedule", "step") == "step"
                     else f"{ev['schedule']} lr schedule")
            print(f"training {ev['params']:,} parameters for {ev['epochs']} epochs x {ev['steps']} steps "
                  f"({sched}) on {ev['device']}{procs}, {batch}, amp {ev['amp']}, "
                  f"channels_last {'on' if ev['channels_last'] else 'off'}, augment {ev.get('augment', 'off')}, "
                  f"seed {ev['seed']}{resumed}",
                  file=self.err, flush=True)
        elif kind == "step" and self.show_bar:
            if self.bar is None:
                from tqdm import tqdm
                self.bar = tqdm(total=ev["steps"], desc=f"epoch {ev['epoch']}/{ev['epochs']}", unit="step",
                                file=self.err, leave=False, mininterval=0.1)
            self.bar.set_postfix_str(f"loss {ev['loss']:.4f} top1 {ev['top1']:.2f}% "
                                     f"{ev['images_per_s']:.0f} img/s", refresh=False)
            self.bar.update(ev["step"] - self.bar.n)
        elif kind == "epoch":
            self.close()  # the bar's line is cleared before the epoch's line is printed
            best = " *" if ev["is_best"] else ""
            print(f"epoch {ev['epoch']}/{ev['epochs']} lr {ev['lr']:.4g} | train loss {ev['train_loss']:.4f} "
                  f"top1 {ev['train_top1']:.2f}% | test loss {ev['test_loss']:.4f} top1 {ev['test_top1']:.2f}%{best} "
                  f"(best {ev['best_top1']:.2f}%) | sum|gamma| {ev['sum_abs_gamma']:.1f} "
                  f"| {ev['images_per_s']:.0f} img/s {ev['seconds']:.1f} s", file=self.out, flush=True)
            if ev.get("s") is not None:
                inside = ev.get("s_within_epoch") or []
                print(f"  sparsity: s {ev['s']:.3g}" + (f" to {ev['s_next']:.3g} over the epoch ({len(inside) + 1} updates)"
                                                       if inside else "")
                      + (f" (next {ev['s_next']:.3g})" if "s_next" in ev and not inside else "")
                      + f", {100 * ev['frac_gamma_below_1e-2']:.1f}% of |gamma| < 1e-2"
                      + _forecast_text(ev.get("forecast")), file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --------------------------------------------------------------------------- train / finetune


# torchrun's own parser takes `--s` for an ambiguous abbreviation of its --standalone,
# --start-method, ... and stops, even after `-m netslim`.
_LAMBDA_WHY = "write --lambda under torchrun, which mistakes --s for one of its own flags"


def _add_train_flags(p: argparse.ArgumentParser, command: str) -> None:
    """The seed's flags (same names and meanings) plus netslim's, for `train`, `finetune` and
    `pipeline` (which sets -sr, --epochs per stage, --refine and --resume itself). Recipe flags
    default to None: "not given", so that a resumed run or a preset keeps its values."""
    from .train import LOG_KINDS, TrainConfig
    d = TrainConfig()
    pipeline = command == "pipeline"

    def default(value: Any) -> str:
        return "the preset's" if pipeline else str(value)

    g = p.add_argument_group("model and data")
    g.add_argument("--dataset", help="dataset name (default: the checkpoint's with --refine/--resume)")
    g.add_argument("--arch", help="architecture (vgg, resnet, densenet, ...; see the error for the full list)")
    g.add_argument("--depth", type=_int_at_least(1), help="network depth (default: the family's)")
    g.add_argument("--width", type=_positive, help="channel width multiplier (vgg, mobilenetv2)")
    g.add_argument("--data-dir", help="where the dataset files are (default: search the usual places)")
    g.add_argument("--download", action="store_true", default=None, help="fetch the dataset if it is missing")
    g.add_argument("--train-subset", type=_int_at_least(1), metavar="N", help="train on the first N images only")
    g.add_argument("--image-size", type=_int_at_least(8), metavar="S",
                   help="imagefolder: resize and centre-crop images to SxS (default 32)")
    g.add_argument("--val-split", type=_float_where(lambda v: 0 < v < 1, "in (0, 1)"), metavar="F",
                   help="imagefolder without train/ and test/ sub-folders: hold out this fraction for testing "
                        "(default 0.1)")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="no pad/crop/flip augmentation (e.g. for an MLP, where pixel position matters)")
    g.add_argument("--crop-pad", type=_int_at_least(0), metavar="PX",
                   help="zero-pad training images by PX pixels before the random crop (default: the "
                        "dataset's, 4 for the 32x32 sets, 2 for the 28x28 ones; 0: no crop)")

    r = p.add_argument_group("recipe (defaults: the seed's)")
    r.add_argument("--epochs", type=_int_at_least(1),
                   help="epochs of every training stage" if pipeline else f"epochs to train (default {d.epochs})")
    r.add_argument("--batch-size", type=_int_at_least(1),
                   help=f"images per step (default {default(d.batch_size)})")
    r.add_argument("--test-batch-size", type=_int_at_least(1), help=f"default {d.test_batch_size}")
    r.add_argument("--lr", type=_positive, help=f"learning rate (default {default(d.lr)}); see --schedule")
    r.add_argument("--momentum", type=_unit, help=f"default {d.momentum}")
    r.add_argument("--weight-decay", "--wd", type=_non_negative, help=f"default {d.weight_decay:g}")
    r.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum (the paper's)")
    r.add_argument("--schedule", choices=("step", "cosine", "onecycle"),
                   help="lr schedule: step (default, the seed's: /10 at 50%% and 75%% of the epochs), cosine "
                        "(per step, down to 0) or onecycle (per step: warm-up over 25%%, then cosine to 0; "
                        "better for short runs)")
    if not pipeline:
        r.add_argument("-sr", "--sr", "--sparsity-regularization", dest="sr", action="store_true", default=None,
                       help="train with the L1 sparsity term on BatchNorm gammas")
    r.add_argument("--s", "--lambda", dest="s", type=_s_value, metavar="S",
                   help=f"sparsity strength, the paper's lambda (default {default(f'{d.s:g}')}; 1e-5 for "
                        f"resnet/densenet), or auto: adjusted every epoch to reach --target-sparsity; {_LAMBDA_WHY}")
    r.add_argument("--target-sparsity", type=_float_where(lambda v: 0 < v < 1, "in (0, 1)"), metavar="Q",
                   help="with --s auto: the share of BN factors under 1e-2 to reach by the last "
                        + ("sparsity epoch" if pipeline else "epoch"))
    if not pipeline:
        r.add_argument("--forecast-percent", type=_float_where(lambda v: 0 < v < 1, "in (0, 1)"), metavar="P",
                       help=f"sparsity epochs log what pruning P of the channels would give (default "
                            f"{d.forecast_percent})")
    r.add_argument("--s-schedule", choices=("constant", "linear-decay", "step-decay"),
                   help="s over the epochs: constant (default), linear-decay (to 0) or step-decay (/10 at the "
                        "lr milestones)")
    r.add_argument("--seed", type=_int_at_least(0), help="random seed (default: drawn and recorded)")
    if pipeline:
        r.add_argument("--distill", action="store_true", default=None,
                       help="fine-tune with the sparsity model it pruned as the teacher (logits KD + CE)")
        r.add_argument("--retrain", choices=("finetune", "scratch-b"),
                       help="after pruning: finetune the inherited weights (default) or scratch-b: random init, "
                            "epochs x dense FLOPs / slim FLOPs (Liu et al. 2019)")
    else:
        r.add_argument("--distill", metavar="TEACHER",
                       help="add the Hinton KD loss towards this checkpoint's logits (same task, e.g. the "
                            "sparsity model that was pruned)")
    r.add_argument("--distill-alpha", type=_float_where(lambda v: 0 <= v <= 1, "in [0, 1]"), metavar="A",
                   help=f"weight of the teacher term, 1 - A on the labels (default {d.distill_alpha})")
    r.add_argument("--distill-temperature", type=_positive, metavar="T",
                   help=f"softmax temperature of the teacher term (default {d.distill_temperature:g})")
    if command in ("train", "finetune"):
        r.add_argument("--scratch", action="store_true", default=None,
                       help="Scratch-B: train the pruned architecture from random init for --epochs x dense "
                            "FLOPs / slim FLOPs (--epochs: the dense model's budget)")

    s = p.add_argument_group("run")
    if command == "finetune":
        s.add_argument("--checkpoint", dest="refine", required=True, metavar="PRUNED",
                       help="the pruned checkpoint to fine-tune")
    elif command == "train":
        s.add_argument("--refine", metavar="PRUNED", help="fine-tune this pruned checkpoint (same recipe)")
    if not pipeline:
        s.add_argument("--resume", metavar="CKPT", help="continue an interrupted run (its checkpoint.pt or folder)")
        s.add_argument("--save", metavar="DIR", help="output folder (default runs/<arch><depth>/<stage>)")
        s.add_argument("--force", action="store_true", help="replace a run already in --save")
    s.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    s.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"),
                   help="mixed precision (default auto: bf16 where the hardware has it)")
    s.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=None,
                   help="keep NCHW memory layout")
    s.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    s.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm under torchrun (CUDA)")
    s.add_argument("--log-every", type=_int_at_least(1), metavar="STEPS", help="steps between progress updates")
    s.add_argument("--log", nargs="+", choices=LOG_KINDS, metavar="KIND",
                   help="extra logs besides metrics.jsonl: tensorboard (event files in the run folder's "
                        "tensorboard/: loss, top-1, lr, sum|gamma|, small-factor share, |gamma| histogram, "
                        "step time; needs the tensorboard package)")
    s.add_argument("--tensorboard", dest="log", action="append_const", const="tensorboard",
                   help="the same as --log tensorboard")
    s.add_argument("--quiet", action="store_true", default=None,
                   help="no progress output (start line, bar, epoch lines); errors and the result still print")


# TrainConfig fields that have a flag; flags given > --config file > stored (resume) > TrainConfig's defaults
_RECIPE_FLAGS = ("epochs", "batch_size", "test_batch_size", "lr", "momentum", "weight_decay", "nesterov", "schedule",
                 "sr", "s", "seed", "amp", "channels_last", "augment", "crop_pad", "compile", "device", "sync_bn",
                 "log_every", "log", "distill", "distill_alpha", "distill_temperature", "target_sparsity", "s_schedule",
                 "forecast_percent")
# load_dataset's options that have a flag (stored in checkpoints as `data_options`)
_DATA_FLAGS = ("data_dir", "download", "train_subset", "image_size", "val_split")


def _arch_dict(arch: str, depth: Optional[int], width: Optional[float], spec: Any) -> dict:
    """The build_model arguments of a fresh model, as a checkpoint's `arch` records them."""
    from .models import check_depth, list_models, model_info
    if arch not in list_models():
        raise ConfigError(f"unknown arch {arch!r}: use one of {', '.join(list_models())}")
    check_depth(arch, depth)
    info = model_info(arch)
    options = info["options"]
    out: dict = {"name": arch}
    if info["default_depth"] is not None:
        out["depth"] = info["default_depth"] if depth is None else depth
    out["num_classes"] = spec.num_classes
    out["in_channels"] = spec.in_channels
    if width is not None:
        key = next((k for k in ("width", "width_mult") if k in options), None)
        if key is None:
            raise ConfigError(f"--width does not apply to {arch}: it has no width option")
        out[key] = width
    if "image_size" in options:
        out["image_size"] = spec.image_size
    return out


def _check_fits(arch: dict, spec: Any, what: str) -> None:
    """One-line error when dataset `spec` does not fit a checkpoint's model."""
    c, k = arch.get("in_channels"), arch.get("num_classes")
    if c is not None and int(c) != spec.in_channels:
        raise DatasetError(f"dataset {spec.name} has {spec.in_channels} input channel(s) but the model in {what} "
                           f"takes {c}: use a dataset with {c}")
    if k is not None and int(k) != spec.num_classes:
        raise DatasetError(f"dataset {spec.name} has {spec.num_classes} classes but the model in {what} "
                           f"predicts {k}: use a dataset with {k} classes")


def _same_or_error(flag: str, given: Any, stored: Any, what: str) -> None:
    if given is not None and stored is not None and given != stored:
        raise ConfigError(f"{flag} {given} does not match {what}, which holds {stored}: "
                          f"leave {flag} out")


def _config_header(command: str) -> str:
    return (f"The configuration this run resolved to (flags > --config file > stored > defaults).\n"
            f"Repeat the run with: netslim {command} --config THIS_FILE [--save ANOTHER_FOLDER]")


def _train_config_values(command: str, cfg: Any, dataset: str, arch: dict, data_opts: dict,
                         refine: Optional[str], save: Path, resume: Optional[Path]) -> Optional[dict]:
    """The train command's flags as this run resolved them (its config.toml), or None when there
    is nothing faithful to write: a resumed run keeps the file its start wrote (recipe updated)."""
    from .config import CONFIG_NAME, read_config_file

    recipe = {k: v for k, v in cfg.as_dict().items() if k in _RECIPE_FLAGS}
    if resume is not None:
        previous = save / CONFIG_NAME
        return {**read_config_file(previous), **recipe} if previous.exists() else None
    values: dict = {"dataset": dataset}
    if refine:  # the pruned checkpoint fixes the model
        values["checkpoint" if command == "finetune" else "refine"] = str(Path(refine).resolve())
    else:
        values.update(arch=arch["name"], depth=arch.get("depth"), width=arch.get("width", arch.get("width_mult")))
    values.update({k: data_opts.get(k) for k in _DATA_FLAGS})
    if values["data_dir"]:
        values["data_dir"] = str(Path(values["data_dir"]).resolve())
    return {**values, **recipe}


def _stage(sr: bool, refine: bool) -> str:
    return "finetune" if refine else "sparsity" if sr else "baseline"


def cmd_train(args: argparse.Namespace) -> int:
    """train / finetune: resolve the run (fresh, --refine or --resume), then fit()."""
    from .checkpoint import load_checkpoint
    from .config import resolve
    from .data import get_spec, list_datasets
    from .fileio import FolderLock, check_writable_folder
    from .models import list_models
    from .train import CHECKPOINT_NAME, TrainConfig, check_resume_recipe, check_save_dir_free

    if args.resume and args.refine:
        raise ConfigError("give --resume or --refine, not both: a resumed run already holds its pruned model")
    if args.dataset is not None and args.dataset not in list_datasets():
        raise ConfigError(f"unknown dataset {args.dataset!r}: use one of {', '.join(list_datasets())}")

    stored_cfg: dict = {}
    data_opts: dict = {}
    model = None
    resume: Optional[Path] = None
    if args.resume:
        resume = Path(args.resume)
        if resume.is_dir():
            resume = resume / CHECKPOINT_NAME
        model, meta = load_checkpoint(resume)
        ts = meta.get("train_state") or {}
        if "epoch" not in ts:
            raise ConfigError(f"{resume} has no training state to resume (a model_best.pt or a pruned model?): "
                              f"resume from the run's {CHECKPOINT_NAME}, or fine-tune it with --refine")
        stored_cfg = dict(ts.get("config") or {})
        data_opts = dict(meta.get("data_options") or {})
        arch = dict(meta["arch"])
        ds = (meta.get("dataset") or {}).get("name")
        _same_or_error("--dataset", args.dataset, ds, str(resume))
        _same_or_error("--arch", args.arch, arch.get("name"), str(resume))
        _same_or_error("--depth", args.depth, arch.get("depth"), str(resume))
        _same_or_error("--width", args.width, arch.get("width", arch.get("width_mult")), str(resume))
        dataset = args.dataset or ds
    elif args.refine:
        model, meta = load_checkpoint(args.refine)
        arch = dict(meta["arch"])
        _same_or_error("--arch", args.arch, arch.get("name"), args.refine)
        _same_or_error("--depth", args.depth, arch.get("depth"), args.refine)
        if args.width is not None:
            raise ConfigError("--width does not apply to --refine: the pruned checkpoint fixes every layer's width")
        dataset = args.dataset or (meta.get("dataset") or {}).get("name")
        if dataset is None:
            raise ConfigError(f"{args.refine} does not record its dataset: pass --dataset")
        if dataset == (meta.get("dataset") or {}).get("name"):  # where that run found its data
            stored = meta.get("data_options") or {}
            data_opts = {k: stored.get(k) for k in ("data_dir", "image_size", "val_split")}
    else:
        if args.dataset is None or args.arch is None:
            missing = " and ".join(f for f, v in (("--dataset", args.dataset), ("--arch", args.arch)) if v is None)
            raise ConfigError(f"train needs {missing} (or --resume / --refine a checkpoint)")
        dataset = args.dataset
        arch = {}
        meta = {}

    given = {k: getattr(args, k) for k in _RECIPE_FLAGS}
    if given["distill"] is not None:  # absolute, so a resume from elsewhere finds the teacher
        given["distill"] = str(Path(given["distill"]).resolve())
    if args.scratch and not args.refine:
        raise ConfigError("--scratch retrains a pruned architecture: give it with --refine (finetune --checkpoint)")
    check_resume_recipe(stored_cfg, given)
    # A run from before --crop-pad existed cropped every dataset with pad 4.
    legacy = {"crop_pad": 4} if stored_cfg and "crop_pad" not in stored_cfg else {}
    cfg = TrainConfig.from_dict(resolve(TrainConfig().as_dict(), stored_cfg, legacy, given,
                                        {"force": bool(args.force)}))
    cfg.validate()
    data_opts = resolve({"download": False}, data_opts, {k: getattr(args, k) for k in _DATA_FLAGS})
    source = str(resume or args.refine)
    # Check everything cheap before the (slow) data load. imagefolder's spec comes from its files.
    if dataset != "imagefolder":
        spec = get_spec(dataset)
        if arch:
            _check_fits(arch, spec, source)
        else:
            arch = _arch_dict(args.arch, args.depth, args.width, spec)
    elif not arch and args.arch not in list_models():
        raise ConfigError(f"unknown arch {args.arch!r}: use one of {', '.join(list_models())}")

    name = arch.get("name") or args.arch
    tag = f"{name}{arch.get('depth') or args.depth or ''}"
    if args.save:
        save = Path(args.save)
    elif resume is not None:
        save = resume.parent
    else:
        save = Path("runs") / tag / _stage(cfg.sr, bool(args.refine))
    check_save_dir_free(save, resume, cfg.force)
    check_writable_folder(save)
    # A second writer (train, --resume, prune, pipeline) in a folder that exists is refused
    # here, before the data load; fit locks a new folder once it has created it.
    with FolderLock(save) if _rank() == 0 else contextlib.nullcontext() as lock:
        if lock is not None and lock.held:
            check_save_dir_free(save, resume, cfg.force)  # the run may have appeared since
        return _train_locked(args, cfg, dataset, arch, model, meta, resume, save, source, data_opts)



def _train_locked(args: argparse.Namespace, cfg: Any, dataset: str, arch: dict, model: Any, meta: dict,
                  resume: Optional[Path], save: Path, source: str, data_opts: dict) -> int:
    """cmd_train once the run folder is claimed: load the data, build the model, fit()."""
    from .config import CONFIG_NAME, write_config_file
    from .models import build_model
    from .train import fit, init_distributed, load_dataset_per_node, resolve_seed

    data_dir, train_subset, download = data_opts.get("data_dir"), data_opts.get("train_subset"), data_opts["download"]
    image_size, val_split = data_opts.get("image_size"), data_opts.get("val_split")
    name = arch.get("name") or args.arch
    rank, world, _, created = init_distributed(cfg.device)
    try:
        data = load_dataset_per_node(dataset, data_dir=data_dir, download=download, train_subset=train_subset,
                                     image_size=image_size, val_split=val_split)
        spec = data.spec
        if not arch:
            arch = _arch_dict(args.arch, args.depth, args.width, spec)
        elif dataset == "imagefolder":
            _check_fits(arch, spec, source)
        cfg.seed = resolve_seed(cfg.seed)
        if model is None:
            import torch
            torch.manual_seed(cfg.seed)  # the same initial weights for the same seed
            model = build_model(name, **{k: v for k, v in arch.items() if k != "name"})
        budget = cfg.epochs
        if args.scratch:
            from .retrain import scratch_b_epochs, scratch_model
            model, _ = scratch_model(args.refine, seed=cfg.seed)
            cfg.epochs, ratio = scratch_b_epochs(model, meta, budget)
            if rank == 0:
                print(f"Scratch-B: random init, {cfg.epochs} epochs = {budget} x {ratio:.2f} (dense FLOPs / "
                      f"slim FLOPs)", flush=True)
        input_size = meta.get("input_size") or [spec.in_channels, spec.image_size, spec.image_size]
        run_meta = {"arch": arch, "dataset": spec.as_dict(), "input_size": list(input_size),
                    "data_options": {"data_dir": str(Path(data_dir).resolve()) if data_dir else None,
                                     "train_subset": train_subset, "download": download,
                                     "image_size": image_size, "val_split": val_split}}
        run_values = _train_config_values(args.command, cfg, dataset, arch, data_opts, args.refine, save, resume)
        if args.scratch and run_values is not None:  # the file repeats the flags: the budget, not the scaled epochs
            run_values.update(scratch=True, epochs=budget)
        progress = Progress(quiet=bool(args.quiet)) if rank == 0 else None

        def on_progress(ev: dict) -> None:
            if ev["event"] == "start" and run_values is not None:  # the run has begun: record what it runs
                write_config_file(save / CONFIG_NAME, run_values, _config_header(args.command))
            progress(ev)

        try:
            summary = fit(model, data, cfg, save, meta=run_meta, resume=resume,
                          on_progress=on_progress if progress is not None else None)
        finally:
            if progress is not None:
                progress.close()
    finally:
        if created:
            import torch.distributed as dist
            dist.destroy_process_group()
    if rank == 0:
        print(f"done: best top-1 {summary['best_top1']:.2f}%, final {summary['final_top1']:.2f}% after "
              f"{summary['epochs']} epochs ({summary['seconds']:.0f} s); files in {save}")
    return 0


# --------------------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> int:
    """Top-1 of a checkpoint on a dataset's test split."""
    import torch

    from .checkpoint import load_checkpoint
    from .data import get_spec, load_dataset
    from .train import evaluate, resolve_device

    model, meta = load_checkpoint(args.checkpoint)
    dataset = args.dataset or (meta.get("dataset") or {}).get("name")
    if dataset is None:
        raise ConfigError(f"{args.checkpoint} does not record its dataset: pass --dataset")
    if dataset != "imagefolder":  # check before the data load: get_spec also rejects unknown names
        _check_fits(meta.get("arch") or {}, get_spec(dataset), args.checkpoint)
    stored = (meta.get("data_options") or {}) if dataset == (meta.get("dataset") or {}).get("name") else {}
    data = load_dataset(dataset, data_dir=args.data_dir or stored.get("data_dir"), download=args.download,
                        image_size=stored.get("image_size"), val_split=stored.get("val_split"))
    _check_fits(meta.get("arch") or {}, data.spec, args.checkpoint)
    device = resolve_device(args.device)
    model.to(device)
    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)  # as fit() evaluates: the same figures
    loss, top1 = evaluate(model, data.test_x, data.test_y, data.spec, batch_size=args.batch_size,
                          device=device, amp=args.amp)
    print(f"{args.checkpoint}: top-1 {top1:.2f}% (loss {loss:.4f}) on {dataset} test, {len(data.test_y)} images")
    return 0


# --------------------------------------------------------------------------- prune / profile / export


def _load_for_cli(args: argparse.Namespace) -> tuple[Any, dict]:
    """A netslim checkpoint, or one of the seed's given --arch/--depth/--dataset."""
    from .checkpoint import load_any_checkpoint
    from .data import get_spec

    spec = get_spec(args.dataset) if getattr(args, "dataset", None) else None
    model, meta = load_any_checkpoint(args.checkpoint, arch=getattr(args, "arch", None),
                                      depth=getattr(args, "depth", None),
                                      num_classes=spec.num_classes if spec else None,
                                      in_channels=spec.in_channels if spec else 3)
    if spec is not None:
        _check_fits(meta.get("arch") or {}, spec, args.checkpoint)
        if meta.get("imported_from") == "seed":
            meta["dataset"] = spec.as_dict()
    return model, meta


def _dataset_for(meta: dict, args: argparse.Namespace, *, required: bool = False) -> Any:
    """The checkpoint's dataset as its run read it, or None (a warning) when it is not at hand."""
    from .data import load_dataset

    name = getattr(args, "dataset", None) or (meta.get("dataset") or {}).get("name")
    if not name:
        if required:
            raise ConfigError("the checkpoint names no dataset; pass --dataset")
        return None
    stored = meta.get("data_options") or {}  # where the checkpoint's run read its data
    try:
        data = load_dataset(name, data_dir=getattr(args, "data_dir", None) or stored.get("data_dir"),
                            image_size=stored.get("image_size"), val_split=stored.get("val_split"))
    except NetslimError as e:
        if required:
            raise
        log.warning("not evaluating after pruning: %s", e)
        return None
    _check_fits(meta.get("arch") or {}, data.spec, args.checkpoint)
    return data


def _try_top1(model: Any, meta: dict, args: argparse.Namespace, data: Any = None) -> Optional[float]:
    """Top-1 on the test split when the data is at hand; pruning itself needs none."""
    from .train import evaluate, resolve_device

    if getattr(args, "no_eval", False):
        return None
    data = data or _dataset_for(meta, args)
    if data is None:
        return None
    _, top1 = evaluate(model, data.test_x, data.test_y, data.spec, device=resolve_device(args.device))
    return top1


def _fmt_count(n: float, unit: str = "") -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _prune_folder_name(args: argparse.Namespace) -> str:
    """pruned-50 for --percent 0.5; pruned-flops-50 / -params- / -latency- for a target."""
    if args.percent is not None:
        return f"pruned-{round(args.percent * 100):g}"
    key = next(k for k in ("flops", "params", "latency") if getattr(args, f"target_{k}") is not None)
    return f"pruned-{key}-{round(getattr(args, f'target_{key}') * 100):g}"


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune a checkpoint with the global threshold; write DIR/pruned.pt and DIR/prune.json."""
    from .fileio import FolderLock, check_writable_folder

    given = [f for f in ("percent", "target_flops", "target_params", "target_latency") if getattr(args, f) is not None]
    if len(given) != 1:
        raise ConfigError("give --percent (the fraction of channels to prune) or one target (--target-flops, "
                          "--target-params or --target-latency F: the fraction of the dense count), one of them")
    save = Path(args.save) if args.save else Path(args.checkpoint).resolve().parent / _prune_folder_name(args)
    target = save / "pruned.pt"
    _refuse_results(save, args.force)
    check_writable_folder(save)
    with FolderLock(save) as lock:
        if lock.held:
            _refuse_results(save, args.force)  # again, now that no one else writes there
        return _prune_locked(args, save, target, lock)


def _refuse_results(save: Path, force: bool) -> None:
    """ConfigError when `save` holds any result (a pruned model, a run): never replaced without --force."""
    from .fileio import results_in

    found = results_in(save)
    if found and not force:
        what = f"{save / 'pruned.pt'} already exists" if "pruned.pt" in found else \
            f"{save} already holds results ({', '.join(found)})"
        raise ConfigError(f"{what}; use --force to replace it or another --save")


def _prune_locked(args: argparse.Namespace, save: Path, target: Path, lock: Any) -> int:
    """cmd_prune once the output folder is claimed (or does not exist yet)."""
    import json

    from .checkpoint import save_checkpoint
    from .fileio import atomic_write_json
    from .engine.prune import prune

    model, meta = _load_for_cli(args)
    measured = dict(runtime=args.runtime, batch_size=args.batch_size, threads=args.threads)
    latency = {**measured, "target_latency": args.target_latency} if args.target_latency is not None \
        else measured if args.round_to == "auto" else {}
    pruned, report = prune(model, args.percent, mode=args.mode, min_channels=args.min_channels,
                           max_layer_percent=args.max_layer_percent, round_to=args.round_to,
                           group_score=args.group_score, skip_coupled=args.skip_coupled,
                           exclude=args.exclude or (), target_flops=args.target_flops,
                           target_params=args.target_params, compensate=args.compensate is not False,
                           remove_blocks=args.remove_blocks is not False, **latency)
    data = _dataset_for(meta, args, required=True) if args.recalibrate else None
    top1 = _try_top1(pruned, meta, args, data)
    if args.recalibrate:
        from .recalibrate import recalibrate_on_training_data
        from .train import resolve_device

        used = recalibrate_on_training_data(pruned, data, args.recalibrate, device=resolve_device(args.device))
        report["recalibration"] = {"batches": used, "top1_before": top1}
        top1 = report["recalibration"]["top1_after"] = _try_top1(pruned, meta, args, data)
    report["top1"] = top1
    report["checkpoint"] = str(args.checkpoint)
    keep_meta = {k: meta[k] for k in ("arch", "dataset", "data_options") if meta.get(k)}
    if not lock.held:  # a new folder: claim it now, and check no one filled it meanwhile
        lock.acquire(create=True)
        _refuse_results(save, args.force)
    save_checkpoint(target, pruned, **keep_meta, metrics={"top1": top1, "prune": {
        k: report[k] for k in ("percent", "threshold", "mode", "channels_total", "channels_kept")}})
    atomic_write_json(save / "prune.json", report)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'layer':<32} {'total':>6} {'kept':>6} {'pruned':>7}  guard")
    for layer in report["layers"]:
        gone = 1 - layer["kept"] / layer["total"]
        print(f"{layer['name'][:32]:<32} {layer['total']:>6} {layer['kept']:>6} {gone:>6.1%}  {layer['guard'] or ''}")
    for name, why in report["unprunable"].items():
        print(f"{name[:32]:<32} {'':>6} {'':>6} {'-':>7}  not pruned: {why}")
    b, a = report["before"], report["effective"]
    thr = f"{report['threshold']:.4g}" if report["threshold"] is not None else "none (percent 0)"
    print(f"threshold {thr}: kept {report['channels_kept']} of {report['channels_total']} BN channels "
          f"({report['units_kept']} of {report['units_total']} pruning units; a coupled unit spans several BNs)")
    if report.get("budget"):
        bud = report["budget"]
        print(f"target {bud['target']} {bud['fraction']:.1%} of the dense model: reached {bud['reached']:.1%} "
              f"at percent {bud['percent']:.4f}")
    if report.get("shortfall"):
        print(f"note: {report['shortfall']}")
    eff = " (effective: as if removed; the file keeps the dense shape)" if args.mode == "mask" else ""
    print(f"params {_fmt_count(b['params'])} -> {_fmt_count(a['params'])}, "
          f"FLOPs {_fmt_count(b['flops'])} -> {_fmt_count(a['flops'])}{eff}")
    if report["guarded"]:
        print(f"guards changed {len(report['guarded'])} layer(s): {', '.join(report['guarded'][:8])}"
              f"{' ...' if len(report['guarded']) > 8 else ''}")
    for block in report["removed_blocks"]:
        print(f"removed block {block['block'] or '(the model)'}: its branch {', '.join(block['modules'][:6])}"
              f"{' ...' if len(block['modules']) > 6 else ''} (every BN factor under the threshold)")
    if report.get("latency_target"):
        from .latency_target import describe
        print(describe(report["latency_target"]))
    comp = report["compensation"]
    if comp:
        print(f"compensation: {comp['folded']} constant(s) of {comp['removed_channels']} removed channels folded "
              f"into the next layer" + (f", {comp['skipped']} not constant (left as pruned)" if comp["skipped"] else "")
              + ("; the removed blocks' channels are dropped, not folded" if report["removed_blocks"] else ""))
    recal = report.get("recalibration")
    if recal and recal["top1_before"] is not None:
        print(f"top-1 right after pruning: {recal['top1_before']:.2f}%, after BN recalibration on "
              f"{recal['batches']} batches: {recal['top1_after']:.2f}%")
    elif top1 is not None:
        print(f"top-1 right after pruning: {top1:.2f}%")
    print(f"wrote {target} and {save / 'prune.json'}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """Params, MACs, FLOPs, latency and peak memory of a checkpoint or an architecture."""
    import json

    from .engine.trace import example_input
    from .data import get_spec
    from .models import build_model
    from .profile import count, profile
    from .engine.slim import apply_plan
    from .sparsity import GAMMA_THRESHOLDS, gamma_summary
    from .train import resolve_device

    if args.checkpoint:
        model, meta = _load_for_cli(args)
        input_size = meta.get("input_size") or list(example_input(None, model).shape[1:])
        what = args.checkpoint
    else:
        if not (args.arch and args.dataset):
            raise ConfigError("give --checkpoint, or --arch (with --depth) and --dataset")
        spec = get_spec(args.dataset)
        arch = _arch_dict(args.arch, args.depth, args.width, spec)
        name = arch.pop("name")
        model, meta = build_model(name, **arch).eval(), {"mode": "dense"}
        input_size = [spec.in_channels, spec.image_size, spec.image_size]
        what = f"{name}-{arch.get('depth', '')} on {spec.name}".replace("- on", " on")
    if args.optimized and args.runtime == "onnxruntime":
        raise ConfigError("--optimized times torch's optimize_for_inference; onnxruntime applies its own "
                          "graph optimisations: use one of --optimized and --runtime onnxruntime")
    # onnxruntime's latency is measured on the CPU (its CPU execution provider)
    device = "cpu" if args.runtime == "onnxruntime" and args.device == "auto" else resolve_device(args.device)
    result = profile(model, input_size, batch_sizes=args.batch_sizes, device=device,
                     latency=not args.no_latency, threads=args.threads, runtime=args.runtime)
    mask = (meta.get("mask") or {}) if isinstance(meta, dict) else {}
    if mask:
        effective = apply_plan(model, mask)
        result["effective"] = count(effective, input_size)
    result["mode"] = meta.get("mode", "dense")
    result["bn_gamma"] = gamma_summary(model)
    if args.optimized and not args.no_latency:
        from .fuse import optimize_for_inference
        from .profile import measure_latency
        result["latency_optimized_ms"] = {}
        for bs in args.batch_sizes:
            nhwc = bs >= 16  # oneDNN's NHWC kernels pay off from a few images per batch up
            fast = optimize_for_inference(model, channels_last=nhwc)
            result["latency_optimized_ms"].update(measure_latency(
                fast, input_size, [bs], device=device, threads=args.threads, channels_last=nhwc))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    print(f"{what} ({result['mode']}), input {'x'.join(map(str, input_size))}")
    print(f"  params {result['params']:,} ({_fmt_count(result['params'])})")
    print(f"  MACs   {result['macs']:,} ({_fmt_count(result['macs'])}), FLOPs = 2 x MACs = {_fmt_count(result['flops'])} "
          f"({result['flops'] / 1e9:.2f}G, as the seed's table writes it)")
    if mask:
        e = result["effective"]
        print(f"  effective (mask as if removed): params {_fmt_count(e['params'])}, FLOPs {_fmt_count(e['flops'])}")
    g = result["bn_gamma"]
    if g["count"]:
        below = ", ".join(f"< {t:g} {g[f'frac_below_{t:g}']:.1%}" for t in GAMMA_THRESHOLDS)
        print(f"  BN |gamma| ({g['count']:,} factors): median {g['median']:.3g} (10%-90% {g['q10']:.3g}-{g['q90']:.3g}); "
              f"{below}")
    for bs, ms in (result.get("latency_ms") or {}).items():
        print(f"  latency batch {bs}: {ms:.2f} ms ({result['runtime']}, {result['device']}, "
              f"{result['threads']} threads)")
    for bs, ms in (result.get("latency_optimized_ms") or {}).items():
        print(f"  latency batch {bs}, optimized for inference: {ms:.2f} ms "
              f"({result['latency_ms'][bs] / ms:.2f}x the model as stored)")
    if result.get("peak_memory_bytes"):
        print(f"  peak memory (batch {result.get('memory_batch_size')}): "
              f"{result['peak_memory_bytes'] / 2**20:.1f} MiB")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write the slim model as ONNX and/or TorchScript, and check the ONNX file's outputs."""
    from .export import check_onnx_dependencies, export_onnx, export_torchscript

    if not (args.onnx or args.torchscript):
        raise ConfigError("say what to write: --onnx FILE and/or --torchscript FILE")
    if args.onnx:
        check_onnx_dependencies()  # before anything is written
    model, meta = _load_for_cli(args)
    for path in (args.onnx, args.torchscript):
        if path and Path(path).exists() and not args.force:
            raise ConfigError(f"{path} already exists; use --force to replace it")
    if args.torchscript:
        export_torchscript(model, meta, args.torchscript)
        print(f"wrote {args.torchscript} (TorchScript)")
    if args.onnx:
        check = export_onnx(model, meta, args.onnx, pad_channels=args.pad_channels)
        note = (f"onnxruntime max |difference| {check['max_abs_diff']:.2e}" if check.get("checked")
                else "not checked: pip install netslim[onnx] to compare outputs")
        padded = (f"odd widths padded to multiples of {check['pad_channels']}" if check["pad_channels"]
                  else "not padded")
        print(f"wrote {args.onnx} (ONNX opset {check['opset']}; {padded}; {note})")
    return 0


def _add_checkpoint_source(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--checkpoint", required=required, help="a netslim checkpoint, or one of the seed's "
                   "(then also --arch, --depth, --dataset)")
    p.add_argument("--arch", help="for a seed checkpoint: vgg, resnet or densenet")
    p.add_argument("--depth", type=_int_at_least(1), help="for a seed checkpoint: its depth")
    p.add_argument("--dataset", help="the dataset (for a seed checkpoint: cifar10 or cifar100)")
    p.add_argument("--data-dir", help="where the dataset files are")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _add_threads_flag(p: argparse.ArgumentParser, what: str) -> None:
    """A subcommand's --threads, the same value as `netslim --threads N COMMAND`. SUPPRESS: no
    default of its own, which argparse would write over the global flag's value (then
    `netslim --threads 1 profile` measured with all threads)."""
    p.add_argument("--threads", type=_int_at_least(1), default=argparse.SUPPRESS, metavar="N",
                   help=f"{what} (same as netslim --threads N; default: torch's)")


def _add_prune_parsers(sub: Any) -> None:
    from .engine.plan import DEFAULT_GROUP_SCORE, GROUP_SCORES

    p = sub.add_parser("prune", help="prune channels with one global threshold", allow_abbrev=False,
                       description="Network Slimming's pruning: all BatchNorm |gamma| in one sorted list, "
                                   "threshold at --percent, keep channels above it.")
    _add_checkpoint_source(p)
    # one of --percent and the three targets: cmd_prune checks, before anything is read or written
    p.add_argument("--percent", type=_unit, help="fraction of BN channels to prune, in [0, 1)")
    p.add_argument("--target-flops", type=_float_where(lambda v: 0 < v <= 1, "in (0, 1]"), metavar="F",
                   help="instead of --percent: prune until at most F x the dense FLOPs remain "
                        "(the percent is searched; the slim model lands within 2%% below)")
    p.add_argument("--target-params", type=_float_where(lambda v: 0 < v <= 1, "in (0, 1]"), metavar="F",
                   help="instead of --percent: prune until at most F x the dense parameters remain")
    p.add_argument("--target-latency", type=_float_where(lambda v: 0 < v < 1, "in (0, 1)"), metavar="F",
                   help="instead of --percent: search the percent whose measured latency is at most F x "
                        "the dense model's (0.5: at least 2x faster)")
    p.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",  # profile.RUNTIMES
                   help="with --target-latency / --round-to auto: where latency is measured (default torch)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=1,
                   help="with --target-latency / --round-to auto: batch size (default 1)")
    _add_threads_flag(p, "with --target-latency / --round-to auto: CPU threads")
    p.add_argument("--mode", choices=("slim", "mask"), default="slim",
                   help="slim: a physically smaller model (default); mask: zero the pruned factors")
    p.add_argument("--min-channels", type=_int_at_least(1), default=1,
                   help="every layer keeps at least this many channels (default 1)")
    p.add_argument("--max-layer-percent", type=_float_where(lambda v: 0 <= v <= 1, "in [0, 1]"),
                   help="prune at most this fraction of any one layer (the paper's multi-pass: 0.5)")
    p.add_argument("--round-to", type=_int_or_auto, default=1, metavar="K|auto",
                   help="round kept widths up to a multiple of K (hardware-friendly sizes); auto: per layer, "
                        "the width at or above the kept count that measures fastest in --runtime with "
                        "--threads at --batch-size (cached in ~/.cache/netslim)")
    p.add_argument("--group-score", choices=GROUP_SCORES, default=DEFAULT_GROUP_SCORE,
                   help="score of channels that must go together (residual adds, depthwise chains): mean "
                        "(default), max or sum, each such channel counted in the global sort with its group's "
                        "score so --percent holds; strict: the paper's threshold per factor, a group goes only "
                        "if all its factors are under it (prunes far less on coupled models)")
    p.add_argument("--skip-coupled", action="store_true", help="leave coupled groups unpruned")
    p.add_argument("--exclude", nargs="+", metavar="MODULE", help="module names to leave alone")
    p.add_argument("--no-compensate", dest="compensate", action="store_false", default=None,
                   help="do not fold the removed channels' constant output (act(beta)) into the next layer's "
                        "bias or BN mean: the seed's pruning exactly")
    p.add_argument("--no-remove-blocks", dest="remove_blocks", action="store_false", default=None,
                   help="keep residual branches whose every BN factor is under the threshold (min-channels "
                        "per layer) instead of removing them whole; with --no-compensate the seed's rule exactly")
    p.add_argument("--recalibrate", type=_int_at_least(1), metavar="N",
                   help="re-estimate every BN's running statistics on N training batches after pruning "
                        "(needs the dataset; prints top-1 before and after)")
    p.add_argument("--save", metavar="DIR", help="output folder (default: pruned-<P> beside the checkpoint)")
    p.add_argument("--force", action="store_true", help="replace DIR/pruned.pt if it exists")
    p.add_argument("--no-eval", action="store_true", help="skip the top-1 evaluation after pruning")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("profile", help="params, FLOPs, latency, memory", allow_abbrev=False,
                       description="Count parameters, MACs and FLOPs (thop's conventions, FLOPs = 2 x MACs) "
                                   "and measure latency and peak memory.")
    _add_checkpoint_source(p, required=False)
    p.add_argument("--width", type=_positive, help="channel width multiplier (with --arch)")
    p.add_argument("--batch-sizes", type=lambda t: [int(v) for v in t.split(",")], default=[1, 64],
                   metavar="B1,B2", help="latency batch sizes (default 1,64)")
    _add_threads_flag(p, "CPU threads")
    p.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",  # profile.RUNTIMES
                   help="where latency is measured: torch (eager, default) or onnxruntime (the model as "
                        "`netslim export --onnx` writes it, in an onnxruntime CPU session)")
    p.add_argument("--no-latency", action="store_true", help="count only")
    p.add_argument("--optimized", action="store_true",
                   help="also time the model after netslim.optimize_for_inference (BNs folded, gathers "
                        "fused into one clamp pass, conv+ReLU/add as one kernel; channels-last from batch 16)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("export", help="write the slim model as ONNX / TorchScript", allow_abbrev=False)
    _add_checkpoint_source(p)
    p.add_argument("--onnx", metavar="FILE", help="ONNX file to write (checked with onnxruntime if installed)")
    p.add_argument("--torchscript", metavar="FILE", help="TorchScript file to write")
    p.add_argument("--pad-channels", type=_pad_setting, default="auto", metavar="auto|off|N",
                   help="pad odd channel widths in the ONNX graph with zero channels up to a multiple of N "
                        "(same outputs; onnxruntime then runs them in its blocked layout); auto (default): "
                        "onnxruntime's block on this CPU, 16 with AVX-512, 8 with AVX2, off without")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=cmd_export)


# --------------------------------------------------------------------------- pipeline


def _preset_note(preset: str, cfg) -> str:
    """The preset's one-line description, or, where flags changed it, what they changed:
    the note names the preset's model and recipe, which `--arch resnet-cifar` no longer runs."""
    from dataclasses import fields
    from .pipeline import PRESET_NOTES, PRESETS
    base = PRESETS.get(preset)
    changed = [f"{f.name} {getattr(cfg, f.name)}" for f in fields(cfg) if base is not None
               and f.name not in ("data_dir", "download") and getattr(cfg, f.name) != getattr(base, f.name)]
    return "the preset with " + ", ".join(changed) if changed else PRESET_NOTES.get(preset, "")


def cmd_pipeline(args: argparse.Namespace) -> int:
    """baseline -> sparsity -> prune -> fine-tune (-> more passes), resumable, with a report."""
    from .config import CONFIG_NAME, write_config_file
    from .pipeline import PIPELINE_OWN_TRAIN_FIELDS, preset_config, run_pipeline
    from .report import render_table
    from .train import TrainingInterrupted

    epochs: Any = args.epochs
    per_stage = {k: v for k, v in (("baseline", args.baseline_epochs), ("sparsity", args.sparsity_epochs),
                                   ("finetune", args.finetune_epochs)) if v is not None}
    if per_stage:
        epochs = {**({"baseline": args.epochs, "sparsity": args.epochs, "finetune": args.epochs}
                     if args.epochs else {}), **per_stage}
    # every train flag the pipeline does not set per stage applies to each training stage
    shared = [k for k in (*_RECIPE_FLAGS, *_DATA_FLAGS) if k not in PIPELINE_OWN_TRAIN_FIELDS
              and k not in ("data_dir", "download")]
    overrides = {k: getattr(args, k) for k in shared if getattr(args, k, None) is not None}
    cfg = preset_config(
        args.preset, dataset=args.dataset, arch=args.arch, depth=args.depth,
        arch_options={"width": args.width} if args.width is not None else None, epochs=epochs,
        batch_size=args.batch_size, lr=args.lr, s=args.s, percents=args.percent, passes=args.passes,
        max_layer_percent=args.max_layer_percent, prune_mode=args.mode, min_channels=args.min_channels,
        round_to=args.round_to, runtime=args.runtime, train_overrides=overrides or None, data_dir=args.data_dir,
        download=args.download or None, compensate=args.compensate, remove_blocks=args.remove_blocks,
        recalibrate=args.recalibrate,
        distill=args.distill, retrain=args.retrain)
    run_dir = Path(args.save or f"runs/{args.preset}")
    progress = Progress(quiet=bool(args.quiet))

    def say(line: str) -> None:  # the stage lines are progress too: --quiet drops them
        if not args.quiet:
            print(line, flush=True)

    def on_event(ev: dict) -> None:
        kind = ev["event"]
        if kind in ("start", "step", "epoch"):
            progress(ev)
        elif kind == "pipeline_start":  # run_dir is claimed: record what this run resolved to
            write_config_file(run_dir / CONFIG_NAME, _pipeline_config_values(args, cfg, ev["seed"]),
                              _config_header("pipeline"))
            say(f"pipeline {args.preset} in {run_dir}: {_preset_note(args.preset, cfg)}".rstrip(": "))
        elif kind == "stage_start":
            how = " (resuming)" if ev.get("resume") else ""
            say(f"== stage {ev.get('index', '?')}/{ev.get('total', '?')}: {ev['stage']}{how}")
        elif kind == "stage_skip":
            say(f"== stage {ev.get('index', '?')}/{ev.get('total', '?')}: {ev['stage']} already done")
        elif kind == "stage_end":
            progress.close()
            top1 = ev.get("top1")
            say(f"== {ev['stage']} done" + (f": top-1 {top1:.2f}%" if isinstance(top1, (int, float)) else "")
                + (f" in {ev['seconds']:.0f} s" if ev.get("seconds") else ""))
        elif kind == "report_start":
            say("== measuring and writing the report")

    t0 = time.monotonic()
    try:
        results = run_pipeline(cfg, run_dir, on_event=on_event, force=args.force,
                               latency_seconds=args.latency_seconds)
    except TrainingInterrupted as e:
        progress.close()
        print("netslim: interrupted; re-run the same command to resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None
    finally:
        progress.close()
    if _rank() != 0:  # under torchrun: one report on the screen
        return 0
    print()
    print(render_table(results))
    files = results.get("report") or {}
    shown = [str(files[k]) for k in ("markdown", "json") if files.get(k)] + [str(p) for p in files.get("plots") or []]
    print(f"\nwrote {', '.join(shown)} (wall time {time.monotonic() - t0:.0f} s)")
    if files.get("plots_skipped"):
        print(f"plots skipped: {files['plots_skipped']}")
    return 0


def _pipeline_config_values(args: argparse.Namespace, cfg: Any, seed: int) -> dict:
    """The pipeline command's flags as `cfg` (a PipelineConfig) and the run's seed resolve them."""
    epochs = cfg.stage_epochs()
    values = {"preset": args.preset, "dataset": cfg.dataset, "arch": cfg.arch, "depth": cfg.depth,
              **{k: v for k, v in cfg.arch_options.items()},
              **{f"{stage}_epochs": n for stage, n in epochs.items()},
              "batch_size": cfg.batch_size, "lr": cfg.lr, "s": cfg.s, "percent": [float(p) for p in cfg.percents],
              "passes": cfg.passes, "max_layer_percent": cfg.max_layer_percent, "mode": cfg.prune_mode,
              "min_channels": cfg.min_channels, "round_to": cfg.round_to, "runtime": cfg.runtime,
              "compensate": cfg.compensate, "remove_blocks": cfg.remove_blocks, "recalibrate": cfg.recalibrate, "distill": cfg.distill, "retrain": cfg.retrain,
              "data_dir": str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None, "download": cfg.download,
              "latency_seconds": args.latency_seconds}
    return {**values, **cfg.train_overrides, "seed": seed}


def _add_pipeline_parser(sub: Any) -> None:
    from .pipeline import list_presets

    p = sub.add_parser("pipeline", help="baseline -> sparsity -> prune -> fine-tune, with a report",
                       allow_abbrev=False,
                       description="The whole Network Slimming job in one resumable command. A preset sets "
                                   "everything; any flag overrides it.")
    p.add_argument("--preset", default="quick", choices=list_presets(), help="default quick (Fashion-MNIST, "
                   "width-0.25 vgg-13, ~10 minutes on a 2-core CPU); the others reproduce the seed's table rows")
    p.add_argument("--save", metavar="DIR", help="run folder (default runs/<preset>); re-run to resume")
    p.add_argument("--force", action="store_true", help="start the run folder over")
    _add_train_flags(p, "pipeline")
    e = p.add_argument_group("pipeline")
    e.add_argument("--baseline-epochs", type=_int_at_least(1))
    e.add_argument("--sparsity-epochs", type=_int_at_least(1))
    e.add_argument("--finetune-epochs", type=_int_at_least(1))
    e.add_argument("--percent", type=_unit, nargs="+", metavar="P", help="prune percents, e.g. 0.5 0.7")
    e.add_argument("--passes", type=_int_at_least(1), help="sparsity -> prune -> fine-tune passes (paper: multi-pass)")
    e.add_argument("--max-layer-percent", type=_float_where(lambda v: 0 <= v <= 1, "in [0, 1]"))
    e.add_argument("--mode", choices=("slim", "mask"), help="prune mode (default slim)")
    e.add_argument("--min-channels", type=_int_at_least(1))
    e.add_argument("--round-to", type=_int_or_auto, metavar="K|auto",
                   help="round kept widths up to a multiple of K; auto: per layer, the width at or above the "
                        "kept count that measures fastest in --runtime at batch 1 (cached in ~/.cache/netslim)")
    e.add_argument("--runtime", choices=("torch", "onnxruntime"),  # profile.RUNTIMES
                   help="with --round-to auto: where widths are measured (default torch)")
    e.add_argument("--no-compensate", dest="compensate", action="store_false", default=None,
                   help="prune as the seed does: no folding of the removed channels' constants")
    e.add_argument("--no-remove-blocks", dest="remove_blocks", action="store_false", default=None,
                   help="keep residual branches whose factors are all under the threshold (min-channels per "
                        "layer) instead of removing them whole; with --no-compensate the seed's rule exactly")
    e.add_argument("--recalibrate", type=_int_at_least(0), metavar="N",
                   help="BN recalibration batches after pruning (default 50; 0: none, the seed's)")
    p.add_argument("--latency-seconds", type=_positive, default=0.5, help="time per latency measurement")
    p.set_defaults(func=cmd_pipeline)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="netslim", allow_abbrev=False,
                     description="Network Slimming: sparsity training, channel pruning, fine-tuning.")
    parser.add_argument("--version", action="version", version=f"netslim {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (INFO level)")
    parser.add_argument("--threads", type=_int_at_least(1), metavar="N",
                        help="CPU threads for torch (default: torch's; 1 is faster when other jobs share the CPU)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("train", help="train a model (baseline, or -sr for sparsity)", allow_abbrev=False,
                       description="Train from scratch (--dataset --arch --depth), fine-tune a pruned "
                                   "checkpoint (--refine), or continue a run (--resume).")
    _add_train_flags(p, "train")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a pruned checkpoint (= train --refine)", allow_abbrev=False)
    _add_train_flags(p, "finetune")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1 of a checkpoint on a test split", allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, help="a netslim checkpoint (.pt)")
    p.add_argument("--dataset", help="default: the checkpoint's")
    p.add_argument("--data-dir", help="where the dataset files are")
    p.add_argument("--download", action="store_true", help="fetch the dataset if it is missing")
    p.add_argument("--batch-size", type=_int_at_least(1), default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto")
    p.set_defaults(func=cmd_eval)

    _add_prune_parsers(sub)
    _add_pipeline_parser(sub)
    for command in sub.choices.values():
        command.add_argument("--config", metavar="FILE",
                             help="read flags from a TOML file: the same keys as the flags (batch_size = 128, "
                                  "sr = true); flags given here win. Every run writes its own as config.toml")
    parser.commands = dict(sub.choices)
    return parser


def _expand_config(parser: "_Parser", argv: list[str]) -> list[str]:
    """argv with the flags of its `--config FILE` placed right after the command name, so that
    argparse checks them as typed flags and flags typed after them win."""
    from .config import config_tokens, find_config_arg, read_config_file

    at = next((i for i, tok in enumerate(argv) if tok in parser.commands), None)
    if at is None:
        return argv
    path = find_config_arg(argv[at + 1:])
    if path is None:
        return argv
    tokens = config_tokens(parser.commands[argv[at]], read_config_file(path), path)
    return argv[:at + 1] + tokens + argv[at + 1:]


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("netslim: %(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line. Returns 0 on success; otherwise raises SystemExit with the status
    (2 user error, 130/143 interrupted), so `python -m netslim` exits with it too."""
    from .train import TrainingInterrupted

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = _expand_config(parser, argv)
    except NetslimError as e:
        parser.exit(2, f"netslim: error: {e}\n")
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    try:
        code = args.func(args)
    except TrainingInterrupted as e:
        if _rank() == 0:
            how = f"netslim train --resume {e.checkpoint}" if e.checkpoint else "(no --save folder: nothing to resume)"
            print(f"netslim: interrupted; resume with: {how}", file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None
    except NetslimError as e:
        if _rank() == 0:
            print(f"netslim: error: {e}", file=sys.stderr, flush=True)
        else:
            # torchrun stops every process as soon as one exits: the others, which usually hit
            # the same error, wait a moment so that rank 0 has printed it before it is stopped
            time.sleep(_OTHER_RANKS_ERROR_DELAY_S)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("netslim: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGINT) from None
    except BrokenPipeError:  # `netslim ... | head`
        sys.stderr.close()
        raise SystemExit(1) from None
    if code:
        raise SystemExit(code)
    return 0


if __name__ == "__main__":
    main()
