"""Checkpoints: plain dicts that torch.load(..., weights_only=True) reads.

Never a pickled module. A checkpoint names its architecture (registry name + constructor
arguments), the pruning applied to it (`plan`: kept channel indices per BatchNorm for a
physically slimmed model; `mask`: kept indices per BatchNorm for a masked one), and the
weights. Loading rebuilds the dense architecture, applies the plan, applies the mask and
loads the weights, so a pruned model comes back from its file alone.

Layout (FORMAT_VERSION 1):
    format       "netslim-checkpoint/1"
    arch         {"name": "vgg", "depth": 13, "num_classes": 10, "in_channels": 1, ...}
    plan         {bn module name: [kept channel indices]}, relative to the dense model
    mask         {bn module name: [kept channel indices]}, relative to the planned model
    biases       optional: convs/linears that compensation gave a bias the architecture lacks
    mode         "dense" | "slim" | "mask" | "slim+mask"
    input_size   [C, H, W] of one example (what the graph analysis traces with)
    state_dict   the weights
    dataset      {"name", "in_channels", "image_size", "num_classes", "mean", "std"}
    train_state  optional: epoch, optimizer, scheduler, RNG states, best metric
    metrics      optional: anything JSON-like
    netslim      the code that wrote the file: {"version", "git_commit", "git_dirty"}
                 (provenance.py; the git fields are None outside a git checkout)
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .engine.compensate import add_biases
from .engine.mask import apply_mask
from .engine.slim import apply_plan
from .engine.trace import example_input, guess_input_size
from .errors import CheckpointError, NetslimError
from .fileio import atomic_torch_save, check_regular_file
from .provenance import provenance
from .wrappers import unwrap_model

FORMAT_PREFIX = "netslim-checkpoint/"
FORMAT_VERSION = 1
FORMAT = f"{FORMAT_PREFIX}{FORMAT_VERSION}"

# Limits on what a checkpoint's metadata may ask for. A damaged or hostile file naming a
# width of 1e6 would otherwise allocate terabytes (or take the machine down) before failing.
MAX_PARAMS = 2_000_000_000     # dense parameters; netslim's largest registry model has ~25M
MAX_INPUT_SIDE = 8192          # pixels (or features) per input dimension


def checkpoint_mode(plan: dict | None, mask: dict | None) -> str:
    if plan and mask:
        return "slim+mask"
    return "slim" if plan else "mask" if mask else "dense"


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **meta: Any) -> None:
    """Write `model` and `meta` to `path` atomically.

    `meta` carries `arch` (required to reload without a model), `plan`, `mask`,
    `input_size`, `dataset`, `train_state`, `metrics`. A model returned by `netslim.prune`
    carries its own plan/mask/arch (attribute `netslim_meta`); explicit `meta` wins.
    `netslim` is always the writing code's provenance (what a loaded file carried is replaced).
    """
    model = unwrap_model(model)  # plan and weights both from the inner model
    carried = dict(getattr(model, "netslim_meta", {}) or {})
    carried.update(meta)
    plan = _plain_plan(carried.pop("plan", None))
    mask = _plain_plan(carried.pop("mask", None))
    state = {k: v.detach().clone() if torch.is_tensor(v) else v
             for k, v in model.state_dict().items()}
    obj = {"format": FORMAT, **carried, "plan": plan, "mask": mask,
           "mode": checkpoint_mode(plan, mask), "netslim": provenance(), "state_dict": state}
    atomic_torch_save(obj, path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """torch.load a checkpoint file safely (weights_only) with one-line errors."""
    path = Path(path)
    try:
        check_regular_file(path, "checkpoint")  # a FIFO would block torch.load forever
    except NetslimError as e:
        raise CheckpointError(str(e)) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "Unsupported operand" in str(e):  # bytes that are no pickle opcode: a text file, garbage
            raise CheckpointError(f"{path} is not a readable checkpoint (truncated or not a torch file)") from None
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path} holds pickled Python objects, not just weights, and a checkpoint can carry "
                "code: netslim only opens weights-only files. Re-save it as a state_dict "
                "(torch.save(model.state_dict(), f)) from code you trust") from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({first or 'unpickling failed'})") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, ValueError, OSError, TypeError,
            AttributeError, IndexError, KeyError, UnicodeDecodeError, MemoryError, OverflowError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or not a torch file: {msg[:120]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a checkpoint (it holds a {type(obj).__name__}, not a dict)")
    fmt = obj.get("format")
    if isinstance(fmt, str) and fmt.startswith(FORMAT_PREFIX):
        try:
            version = int(fmt[len(FORMAT_PREFIX):])
        except ValueError:
            raise CheckpointError(f"{path} has an unknown format tag {fmt!r}") from None
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{path} was written by a newer netslim (format {version}, this one reads "
                                  f"up to {FORMAT_VERSION}); upgrade netslim to load it")
        if not isinstance(obj.get("state_dict"), dict):
            raise CheckpointError(f"{path} is a damaged netslim checkpoint (it has no state_dict)")
    return obj


def is_netslim_checkpoint(obj: dict) -> bool:
    return isinstance(obj.get("format"), str) and obj["format"].startswith(FORMAT_PREFIX)


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None, *,
                    strict: bool = True) -> tuple[nn.Module, dict]:
    """Rebuild the model stored at `path`; returns (model in eval mode, meta).

    `model`, when given, is a freshly built dense instance of the architecture (needed for
    models that are not in netslim's registry); the stored plan and mask are applied to it.
    `meta` is the checkpoint dict without `state_dict`.
    """
    obj = read_checkpoint(path)
    if not is_netslim_checkpoint(obj):
        raise CheckpointError(
            f"{path} is not a netslim checkpoint; for the seed's checkpoints pass --arch/--depth/--dataset "
            "(library: netslim.checkpoint.import_seed_checkpoint)")
    model = model_from_checkpoint(obj, model=model, strict=strict, source=str(path))
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return model, meta


def model_from_checkpoint(obj: dict, model: nn.Module | None = None, *, strict: bool = True,
                          source: str = "checkpoint", load_weights: bool = True) -> nn.Module:
    """Build the architecture an in-memory checkpoint dict describes and load its weights.

    load_weights=False: the architecture with the builder's fresh initialisation (Scratch-B).
    """
    from .models import build_model

    _check_input_size(obj.get("input_size"), source)
    if model is None:
        arch = obj.get("arch") or {}
        if not isinstance(arch, dict) or "name" not in arch:
            raise CheckpointError(f"{source} holds a model outside netslim's registry; build it and pass it "
                                  "to load_checkpoint(path, model=...)")
        arch = dict(arch)
        name = arch.pop("name")
        _check_buildable(name, arch, obj.get("input_size"), source)
        model = build_model(name, **arch)
    try:
        add_biases(model, obj.get("biases") or [])
        example = example_input(obj.get("input_size"), model)
        if obj.get("plan"):
            model = apply_plan(model, obj["plan"], example_input=example)
        if obj.get("mask"):
            model = apply_mask(model, obj["mask"])
    except (NetslimError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{source} holds a pruning plan that does not fit its architecture "
                              f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}); the file is damaged") from None
    try:
        if load_weights:
            model.load_state_dict(obj["state_dict"], strict=strict)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:3])[:200]
        raise CheckpointError(f"{source} does not fit the architecture it names ({detail})") from None
    meta = {k: obj.get(k) for k in ("arch", "plan", "mask", "biases", "input_size", "dataset")
            if obj.get(k) is not None}
    model.netslim_meta = meta
    return model.eval()


def _check_input_size(input_size: Any, source: str) -> None:
    """CheckpointError unless `input_size` is None or [C, H, W] / [F] of sane positive ints."""
    if input_size is None:
        return
    ok = (isinstance(input_size, (list, tuple)) and 1 <= len(input_size) <= 3
          and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_INPUT_SIDE for v in input_size))
    if not ok:
        raise CheckpointError(f"{source} has an invalid input_size {input_size!r:.80} (want [C, H, W] of integers "
                              f"in 1..{MAX_INPUT_SIDE}); the file is damaged")


def _check_buildable(name: Any, arch: dict, input_size: Any, source: str) -> None:
    """Build the named architecture on the meta device (no memory) and run one example
    through it: a bad name, argument, size or input fails here, as a CheckpointError."""
    from .models import build_model

    damaged = "the file is damaged or from another tool"
    try:
        with torch.device("meta"):
            model = build_model(name, **arch)
    except (NetslimError, TypeError, ValueError, RuntimeError, OverflowError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{source} names an architecture netslim cannot build ({first}); {damaged}") from None
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_PARAMS:
        raise CheckpointError(f"{source} names a model of {params:.3g} parameters ({name}, {arch}), more than "
                              f"netslim builds ({MAX_PARAMS:.0e}); {damaged}")
    problem = input_error(model, input_size if input_size is not None else guess_input_size(model))
    if problem:
        raise CheckpointError(f"{source}: its model cannot take its input_size {input_size} ({problem}); {damaged}")


def input_error(model: nn.Module, input_size: Any) -> str | None:
    """None when `model` runs on one zero example of `input_size` ([C, H, W] or [F]), else
    the first line of the failure. Eval mode, no gradients, on the model's device (the
    meta device costs nothing): nothing in the model changes."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *[int(v) for v in input_size], device=device))
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        return str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    finally:
        model.train(was_training)
    return None


def _plain_plan(plan: dict | None) -> dict:
    """{name: [int, ...]}: lists of ints survive weights_only loading and read well."""
    if not plan:
        return {}
    return {str(k): [int(i) for i in (v.tolist() if torch.is_tensor(v) else v)] for k, v in plan.items()}


# ----------------------------------------------------------------------------------------
# The seed's checkpoints (github.com/Eric-mingjie/network-slimming)

def is_seed_checkpoint(obj: dict) -> bool:
    """A training checkpoint {'epoch','best_prec1','state_dict',...} or a pruned one {'cfg','state_dict'}."""
    return isinstance(obj.get("state_dict"), dict) and not is_netslim_checkpoint(obj) and (
        "cfg" in obj or "epoch" in obj or "best_prec1" in obj)


def import_seed_checkpoint(obj: dict, arch: str, depth: int | None, *, num_classes: int,
                           in_channels: int = 3, source: str = "checkpoint") -> nn.Module:
    """Rebuild a model from one of the seed's checkpoint dicts (dense, pruned or fine-tuned).

    The seed stores no plan. Which channels a BN keeps comes from the state_dict itself:
    a `channel_selection` layer's 0/1 `indexes` vector names the stream channels the BN
    before it reads (the seed computes that BN at full width, so its tensors are sliced to
    the kept channels here), and a BN narrower than the dense architecture keeps its first
    channels (the seed's pruned weights are already compacted in order). The result is an
    ordinary netslim model with a plan, so it saves, prunes and reloads like any other.
    """
    from .models import build_model

    state = {k: v for k, v in obj["state_dict"].items()}
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    dense = build_model(arch, depth=depth, num_classes=num_classes, in_channels=in_channels)
    dense_bns = {n: m for n, m in dense.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    plan: dict[str, list[int]] = {}
    for key in [k for k in state if k.endswith("select.indexes")]:
        prefix = key[: -len("select.indexes")]
        bn = prefix + ("bn1" if prefix + "bn1.weight" in state else "bn")
        if bn not in dense_bns:
            raise CheckpointError(f"{source}: channel selection {key} follows no BatchNorm of {arch}-{depth}")
        kept = torch.nonzero(state.pop(key).flatten() > 0).flatten().tolist()
        if len(kept) < dense_bns[bn].num_features:
            plan[bn] = kept
            for t in ("weight", "bias", "running_mean", "running_var"):
                k = f"{bn}.{t}"
                if k in state and state[k].shape[0] == dense_bns[bn].num_features:
                    state[k] = state[k][kept]
    for bn, m in dense_bns.items():
        w = state.get(f"{bn}.weight")
        if w is None:
            raise CheckpointError(f"{source} is not a {arch}-{depth} checkpoint (it has no {bn}.weight); "
                                  "check --arch and --depth")
        if bn not in plan and w.shape[0] < m.num_features:
            plan[bn] = list(range(w.shape[0]))
        state.setdefault(f"{bn}.num_batches_tracked", torch.tensor(0))  # PyTorch < 0.4.1 had none
    try:
        model = apply_plan(dense, plan) if plan else dense
        if plan:
            for n, m in model.named_modules():  # gathers are derived from the plan, not stored by the seed
                if hasattr(m, "keep_index"):
                    state[f"{n}.keep_index"] = m.keep_index
        missing, unexpected = model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, IndexError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise CheckpointError(f"{source} does not fit {arch}-{depth} with {num_classes} classes "
                              f"({'; '.join(lines[:2])[:200]}); check --arch, --depth and --dataset") from None
    meta = {"arch": {"name": arch, "depth": depth, "num_classes": num_classes, "in_channels": in_channels},
            "plan": plan, "input_size": [in_channels, 32, 32]}
    model.netslim_meta = meta
    return model.eval()


def load_any_checkpoint(path: str | os.PathLike, *, arch: str | None = None, depth: int | None = None,
                        num_classes: int | None = None, in_channels: int = 3) -> tuple[nn.Module, dict]:
    """Load a netslim checkpoint, or a seed checkpoint when arch/depth/classes are given."""
    obj = read_checkpoint(path)
    if is_netslim_checkpoint(obj):
        model = model_from_checkpoint(obj, source=str(path))
        return model, {k: v for k, v in obj.items() if k != "state_dict"}
    if is_seed_checkpoint(obj):
        if arch is None or num_classes is None:
            raise CheckpointError(f"{path} is a checkpoint of the seed (network-slimming); say what it holds "
                                  "with --arch, --depth and --dataset")
        model = import_seed_checkpoint(obj, arch, depth, num_classes=num_classes, in_channels=in_channels,
                                       source=str(path))
        meta = dict(model.netslim_meta)
        meta["metrics"] = {k: float(obj[k]) for k in ("best_prec1",) if isinstance(obj.get(k), (int, float))}
        meta["mode"] = "slim" if meta["plan"] else "dense"
        meta["imported_from"] = "seed"
        return model, meta
    raise CheckpointError(f"{path} is neither a netslim checkpoint nor one of the seed's "
                          f"(its keys: {', '.join(sorted(map(str, obj))[:6])})")
