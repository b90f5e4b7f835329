"""Pre-activation bottleneck ResNet for 32x32 inputs (the seed's `resnet`, models/preresnet.py).

Attribute names and registration order follow the seed so its state_dicts load by key,
less the seed's `select.indexes` (netslim's pruning engine gathers kept channels itself).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError
from ._common import BN_INIT, init_weights, make_stage

__all__ = ["PreActBottleneck", "PreResNet", "preresnet"]


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3(stride), BN-ReLU-conv1x1(x4), plus the shortcut.

    bn1 reads the residual stream, which the shortcut reads too: pruning may only choose
    which stream channels this branch reads, not shrink the stream.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        # The seed adds the *raw* input (not the pre-activated one) on the shortcut.
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class PreResNet(nn.Module):
    """conv1 -> layer1..3 (planes 16/32/64, stride 1/2/2) -> BN-ReLU -> 8x8 avg-pool -> fc."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3,
                 bn_init: float = BN_INIT) -> None:
        super().__init__()
        n = blocks_per_stage
        self.inplanes = 16
        # No BN after the stem: the first block's bn1 pre-activates it.
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False)
        self.layer1 = self._make_layer(16, n)             # 32x32
        self.layer2 = self._make_layer(32, n, stride=2)   # 16x16
        self.layer3 = self._make_layer(64, n, stride=2)   # 8x8
        self.bn = nn.BatchNorm2d(64 * PreActBottleneck.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64 * PreActBottleneck.expansion, num_classes)
        init_weights(self, bn_init=bn_init)  # fc keeps PyTorch's default, as in the seed

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        # A bare 1x1-conv shortcut (no BN): the stream is pre-activated by the next block.
        layer, self.inplanes = make_stage(PreActBottleneck, self.inplanes, planes, blocks, stride,
                                          shortcut_bn=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))   # N x 256 x 8 x 8 for a 32x32 input
        x = self.relu(self.bn(x))
        x = torch.flatten(self.avgpool(x), 1)          # N x 256
        return self.fc(x)


def preresnet(depth: int = 164, num_classes: int = 10, in_channels: int = 3, *,
              bn_init: float = BN_INIT) -> PreResNet:
    """Pre-activation bottleneck ResNet-`depth`, depth = 9n+2 (164: n = 18)."""
    if depth < 11 or (depth - 2) % 9 != 0:
        raise ConfigError(f"depth {depth} is not valid for resnet: use 9n+2 (e.g. 164)")
    return PreResNet((depth - 2) // 9, num_classes=num_classes, in_channels=in_channels, bn_init=bn_init)
