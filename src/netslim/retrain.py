"""Scratch-B: train the pruned architecture from random initialisation.

Liu et al., "Rethinking the Value of Network Pruning" (ICLR 2019): a pruned architecture
trained from scratch for the dense model's compute budget (Scratch-B: its training epochs
x dense FLOPs / slim FLOPs) often matches fine-tuning the inherited weights. netslim lets
you measure that on your model instead of assuming either way.

    model, meta = scratch_model("prune-70/pruned.pt", seed=0)    # same widths, fresh weights
    epochs, ratio = scratch_b_epochs(model, meta, dense_epochs=6)
"""
from __future__ import annotations

import os

import torch
from torch import nn


def scratch_model(path: str | os.PathLike, *, seed: int) -> tuple[nn.Module, dict]:
    """The architecture of the pruned checkpoint at `path` with the builder's fresh weights.

    The dense model is built under torch.manual_seed(seed), then the checkpoint's plan and
    mask are applied: every kept channel starts where a dense model trained from scratch
    would start. Returns (model in train mode, the checkpoint's meta without state_dict).
    """
    from .checkpoint import is_netslim_checkpoint, model_from_checkpoint, read_checkpoint
    from .errors import CheckpointError

    obj = read_checkpoint(path)
    if not is_netslim_checkpoint(obj):
        raise CheckpointError(f"{path} is not a netslim checkpoint; Scratch-B needs the pruned model's plan")
    torch.manual_seed(seed)
    model = model_from_checkpoint(obj, source=str(path), load_weights=False)
    return model.train(), {k: v for k, v in obj.items() if k != "state_dict"}


def scratch_b_epochs(pruned: nn.Module, meta: dict, dense_epochs: int) -> tuple[int, float]:
    """(epochs, FLOPs ratio): dense_epochs x dense FLOPs / pruned FLOPs, rounded (at least dense_epochs)."""
    from .engine.trace import example_input
    from .models import build_model
    from .profile import count
    from .engine.slim import apply_plan

    arch = dict(meta.get("arch") or {})
    name = arch.pop("name")
    x = example_input(meta.get("input_size"), pruned)
    dense_flops = count(build_model(name, **arch), example_input=x)["flops"]
    mask = meta.get("mask") or {}
    effective = apply_plan(pruned, mask, x) if mask else pruned   # a masked model costs what it would slim
    ratio = dense_flops / count(effective, example_input=x)["flops"]
    return max(dense_epochs, round(dense_epochs * ratio)), ratio
