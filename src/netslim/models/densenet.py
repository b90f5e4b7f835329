"""DenseNet with basic blocks for 32x32 inputs (the seed's `densenet`, models/densenet.py).

Attribute names and registration order follow the seed so its state_dicts load by key,
less the seed's `select.indexes` (netslim's pruning engine gathers kept channels itself).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ._common import BN_INIT, init_weights

__all__ = ["DenseLayer", "Transition", "DenseNet", "densenet"]


class DenseLayer(nn.Module):
    """BN-ReLU-conv3x3(growth) [-dropout], concatenated after its input: C -> C + growth.

    bn1 reads the concatenation that later layers read too: pruning may only choose which
    input channels this layer reads; the conv output keeps its width.
    """

    def __init__(self, inplanes: int, growth_rate: int = 12, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, growth_rate, kernel_size=3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        # A module (not F.dropout(training=self.training)) so a traced graph still follows
        # train()/eval(); absent when unused, which keeps the graph identical to the seed's.
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        if self.dropout is not None:
            out = self.dropout(out)
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1-avgpool2: halves the resolution, optionally compresses channels."""

    def __init__(self, inplanes: int, outplanes: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, outplanes, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.avg_pool2d as in the seed (thop did not count it: FLOPs match the seed's table).
        return F.avg_pool2d(self.conv1(self.relu(self.bn1(x))), 2)


class DenseNet(nn.Module):
    """conv1 (2*growth) -> dense1 -> trans1 -> dense2 -> trans2 -> dense3 -> BN-ReLU -> 8x8 avg-pool -> fc."""

    def __init__(self, layers_per_block: int, num_classes: int = 10, in_channels: int = 3,
                 growth_rate: int = 12, compression: float = 1.0, drop_rate: float = 0.0,
                 bn_init: float = BN_INIT) -> None:
        super().__init__()
        self.growth_rate = growth_rate
        self.drop_rate = drop_rate
        self.inplanes = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=3, padding=1, bias=False)
        self.dense1 = self._make_denseblock(layers_per_block)   # 32x32
        self.trans1 = self._make_transition(compression)
        self.dense2 = self._make_denseblock(layers_per_block)   # 16x16
        self.trans2 = self._make_transition(compression)
        self.dense3 = self._make_denseblock(layers_per_block)   # 8x8
        self.bn = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(self.inplanes, num_classes)
        init_weights(self, bn_init=bn_init)  # fc keeps PyTorch's default, as in the seed

    def _make_denseblock(self, blocks: int) -> nn.Sequential:
        layers = []
        for _ in range(blocks):
            layers.append(DenseLayer(self.inplanes, self.growth_rate, self.drop_rate))
            self.inplanes += self.growth_rate
        return nn.Sequential(*layers)

    def _make_transition(self, compression: float) -> Transition:
        # compression is the kept fraction (DenseNet-BC's theta); the seed's
        # compressionRate is its inverse. 1.0 keeps every channel, as the paper's DenseNet-40.
        inplanes, self.inplanes = self.inplanes, max(1, int(math.floor(self.inplanes * compression)))
        return Transition(inplanes, self.inplanes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.trans1(self.dense1(x))
        x = self.trans2(self.dense2(x))
        x = self.dense3(x)                        # N x C x 8 x 8 for a 32x32 input
        x = self.relu(self.bn(x))
        x = torch.flatten(self.avgpool(x), 1)     # N x C
        return self.fc(x)


def densenet(depth: int = 40, num_classes: int = 10, in_channels: int = 3, *,
             growth_rate: int = 12, compression: float = 1.0, drop_rate: float = 0.0,
             bn_init: float = BN_INIT) -> DenseNet:
    """DenseNet-`depth` with basic blocks, depth = 3n+4 (40: n = 12 layers per block)."""
    if depth < 7 or (depth - 4) % 3 != 0:
        raise ConfigError(f"depth {depth} is not valid for densenet: use 3n+4 (e.g. 40)")
    if isinstance(growth_rate, bool) or not isinstance(growth_rate, int) or growth_rate < 1:
        raise ConfigError(f"densenet growth_rate {growth_rate!r} is not valid: use a positive integer (e.g. 12)")
    if not 0 < compression <= 1:
        raise ConfigError(f"densenet compression {compression} is not valid: use a kept fraction in (0, 1] (e.g. 0.5)")
    if not 0 <= drop_rate < 1:
        raise ConfigError(f"densenet drop_rate {drop_rate} is not valid: use a probability in [0, 1)")
    return DenseNet((depth - 4) // 3, num_classes=num_classes, in_channels=in_channels,
                    growth_rate=growth_rate, compression=compression, drop_rate=drop_rate,
                    bn_init=bn_init)
