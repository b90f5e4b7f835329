"""BatchNorm recalibration: re-estimate the running statistics of a pruned model.

Pruning (and compensation, which shifts running means by a constant) changes what every
BN behind a pruned layer sees, so the running mean and variance saved from training no
longer describe its input. Running the pruned model forward on a few training batches,
with every BN in training mode and momentum None (a cumulative average over the batches,
not an exponential one), measures them afresh. No gradient step; dropout and everything
else stays in eval mode.

    netslim.recalibrate_bn(pruned, (x for x, _ in loader), batches=20)
"""
from __future__ import annotations

import itertools
from typing import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor], *, limit: int | None = None) -> int:
    """Reset and re-estimate every BN's running stats of `model` (in place) on `batches`.

    `batches`: input tensors (or (input, label) pairs), already on the model's device;
    at most `limit` of them are used. Returns how many batches were seen. The model is
    left in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    momenta = {m: m.momentum for m in bns}
    saved = {m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns}
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None           # cumulative average: every batch weighs the same
        m.train()
    seen = 0
    try:
        with torch.no_grad():
            for batch in itertools.islice(batches, limit):
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x)
                seen += 1
    finally:
        for m in bns:
            m.momentum = momenta[m]
            m.eval()
            if seen == 0:       # nothing measured (no batches, or the first one failed): keep the old stats
                for buf, old in zip((m.running_mean, m.running_var, m.num_batches_tracked), saved[m]):
                    buf.copy_(old)
    return seen


def recalibrate_on_training_data(model: nn.Module, data, batches: int, *, batch_size: int = 128,
                                 device: str | torch.device = "cpu", seed: int = 0,
                                 channels_last: bool = False) -> int:
    """recalibrate_bn on `batches` shuffled training batches of a DataBundle.

    The batches are not augmented: the statistics should describe images as the model
    sees them at test time. Returns how many batches were used (fewer if the set is small).
    """
    from .data import BatchLoader

    device = torch.device(device)
    model.to(device)
    loader = BatchLoader(data.train_x, data.train_y, data.spec, batch_size, train=True, device=device,
                         seed=seed, augment=False, drop_last=False, channels_last=channels_last)
    return recalibrate_bn(model, loader, limit=batches)
