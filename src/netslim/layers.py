"""Modules that slim models run: the BatchNorm that reads a subset of its input's channels.

A BN whose input is a stream that must keep its width (a pre-activation residual stream, a
DenseNet concatenation) normalises only its kept channels: `IndexedBatchNorm*` gathers them
through `keep_index` (the seed's `channel_selection`, done without computing the BN at full
width). These live apart from the analysis (engine/) because every slim model, loaded or
fused or trained, runs them, while only pruning needs the analysis.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def gather_channels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x.index_select(1, index), in x's own memory layout ([N, C, ...] -> [N, len(index), ...]).

    On a channels-last tensor, index_select along dim 1 writes a contiguous (NCHW) result,
    a transposing copy that costs ~5x the gather, and the next conv has to transpose it back.
    Seen as its [N*H*W, C] matrix, the same gather is a row-wise index_select along the last
    dim, which stays channels-last (benchmarks/bench_inference.py measures both).
    """
    if x.dim() in (4, 5) and not x.is_contiguous():
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=fmt):
            n, c, *spatial = x.shape
            order = (0, *range(2, x.dim()), 1)                       # NCHW view -> NHWC (a view)
            rows = x.permute(order).reshape(-1, c)                   # [N*H*W, C], still a view
            y = rows.index_select(1, index).view(n, *spatial, index.numel())
            return y.permute(0, x.dim() - 1, *range(1, x.dim() - 1))  # NHWC -> NCHW view
    return x.index_select(1, index)


class _IndexedBatchNorm:
    """Mixin: gather `keep_index` channels of the input, then batch-normalise them."""

    keep_index: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(gather_channels(x, self.keep_index))  # [N, C_in, ...] -> [N, len(keep), ...]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reads {self.keep_index.numel()} input channels"


class IndexedBatchNorm1d(_IndexedBatchNorm, nn.BatchNorm1d):
    pass


class IndexedBatchNorm2d(_IndexedBatchNorm, nn.BatchNorm2d):
    pass


class IndexedBatchNorm3d(_IndexedBatchNorm, nn.BatchNorm3d):
    pass


INDEXED_BN = {nn.BatchNorm1d: IndexedBatchNorm1d, nn.BatchNorm2d: IndexedBatchNorm2d,
              nn.BatchNorm3d: IndexedBatchNorm3d}


class IndexedSyncBatchNorm(_IndexedBatchNorm, nn.SyncBatchNorm):
    pass


def is_indexed_bn(m: nn.Module) -> bool:
    return isinstance(m, _IndexedBatchNorm)


def convert_sync_batchnorm(model: nn.Module, process_group: Any = None) -> nn.Module:
    """nn.SyncBatchNorm.convert_sync_batchnorm that keeps the channel gather of slim models.

    torch's conversion builds a plain SyncBatchNorm from every BN and so drops the
    `keep_index` of an IndexedBatchNorm (the model would then normalise the wrong
    channels); here an IndexedBatchNorm becomes an IndexedSyncBatchNorm with the same
    index. Parameters and buffers are shared with the original, as torch does.
    """
    if isinstance(model, _BatchNorm) and not isinstance(model, nn.SyncBatchNorm):
        cls = IndexedSyncBatchNorm if is_indexed_bn(model) else nn.SyncBatchNorm
        new = cls(model.num_features, model.eps, model.momentum, model.affine, model.track_running_stats,
                  process_group)
        if model.affine:
            new.weight, new.bias = model.weight, model.bias
        new.running_mean, new.running_var = model.running_mean, model.running_var
        new.num_batches_tracked = model.num_batches_tracked
        if is_indexed_bn(model):
            new.register_buffer("keep_index", model.keep_index)
        new.train(model.training)
        for key, hook in model._forward_pre_hooks.items():  # e.g. the mask's gradient guard
            new._forward_pre_hooks[key] = hook
        for key, buf in model._buffers.items():
            if key not in new._buffers:
                new._buffers[key] = buf
                if key in model._non_persistent_buffers_set:
                    new._non_persistent_buffers_set.add(key)
        model = new
    for name, child in list(model.named_children()):
        model.add_module(name, convert_sync_batchnorm(child, process_group))
    return model
