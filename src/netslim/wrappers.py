"""The model inside DataParallel / DistributedDataParallel / torch.compile wrappers.

Everything netslim carries on a model (`netslim_meta`: arch, plan, mask) lives on the
inner module, and the wrappers prefix or hide its names; so every entry point that reads
or changes a model unwraps it here first, in one way.
"""
from __future__ import annotations

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The innermost module of any DataParallel / DDP / torch.compile wrapping (or `model`)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model
