"""Post-activation ResNet for 32x32 inputs (He et al. 2016, CIFAR ResNet-20/56/110).

Shortcuts that change shape are a 1x1 conv + BN (option B), named `downsample` as in
torchvision. Every block's bn2 output is added to the shortcut: pruning must treat the
channels of each stage's stream as one coupled group.
"""
from __future__ import annotations


import torch
from torch import nn

from ..errors import ConfigError
from ._common import BN_INIT, init_weights, make_stage
from .resnet_imagenet import BasicBlock

__all__ = ["CifarBasicBlock", "CifarResNet", "resnet_cifar"]


# The block is torchvision's BasicBlock (conv3x3-BN-ReLU, conv3x3-BN, + shortcut, ReLU).
CifarBasicBlock = BasicBlock


class CifarResNet(nn.Module):
    """conv1-bn1-relu (16) -> layer1..3 (16/32/64, stride 1/2/2) -> global avg-pool -> fc."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3,
                 bn_init: float = BN_INIT) -> None:
        super().__init__()
        n = blocks_per_stage
        self.inplanes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n)             # 32x32
        self.layer2 = self._make_layer(32, n, stride=2)   # 16x16
        self.layer3 = self._make_layer(64, n, stride=2)   # 8x8
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        init_weights(self, bn_init=bn_init)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layer, self.inplanes = make_stage(CifarBasicBlock, self.inplanes, planes, blocks, stride)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))   # N x 64 x 8 x 8 for a 32x32 input
        x = torch.flatten(self.avgpool(x), 1)          # N x 64
        return self.fc(x)


def resnet_cifar(depth: int = 56, num_classes: int = 10, in_channels: int = 3, *,
                 bn_init: float = BN_INIT) -> CifarResNet:
    """Post-activation CIFAR ResNet-`depth`, depth = 6n+2 (20, 56, 110)."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ConfigError(f"depth {depth} is not valid for resnet-cifar: use 6n+2 (e.g. 20, 56, 110)")
    return CifarResNet((depth - 2) // 6, num_classes=num_classes, in_channels=in_channels, bn_init=bn_init)
