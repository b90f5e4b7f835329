"""ResNet-18/34/50/101/152 in torchvision's ImageNet layout.

Attribute names match torchvision.models.resnet (conv1, bn1, relu, maxpool, layer1..4,
avgpool, fc; blocks with `downsample` = conv + BN), so torchvision state_dicts load by key.
The stride of a Bottleneck sits on its 3x3 conv (torchvision's "v1.5"). The global
average pool is adaptive, so small inputs work: 32x32 reaches layer4 at 1x1.
"""
from __future__ import annotations

from typing import Optional, Sequence, Type, Union

import torch
from torch import nn

from ..errors import ConfigError
from ._common import BN_INIT, init_weights, make_stage

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet_imagenet", "resnet18", "resnet34", "resnet50",
           "IMAGENET_DEPTHS"]


def conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1(x4)-BN, plus the shortcut, then ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


Block = Union[Type[BasicBlock], Type[Bottleneck]]

# depth -> (block, blocks per stage), as torchvision.
IMAGENET_DEPTHS: dict[int, tuple[Block, tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(nn.Module):
    """conv1 7x7/2 -> bn1 -> relu -> maxpool 3x3/2 -> layer1..4 (64..512) -> avgpool -> fc."""

    def __init__(self, block: Block, layers: Sequence[int], num_classes: int = 1000,
                 in_channels: int = 3, bn_init: float = BN_INIT) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_weights(self, bn_init=bn_init)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layer, self.inplanes = make_stage(block, self.inplanes, planes, blocks, stride)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))   # /4
        x = self.layer1(x)
        x = self.layer2(x)                                    # /8
        x = self.layer3(x)                                    # /16
        x = self.layer4(x)                                    # /32 (1x1 for a 32x32 input)
        x = torch.flatten(self.avgpool(x), 1)                 # N x 512*expansion
        return self.fc(x)


def resnet_imagenet(depth: int = 18, num_classes: int = 10, in_channels: int = 3, *,
                    bn_init: float = BN_INIT) -> ResNet:
    """torchvision-layout ResNet-`depth` (18, 34, 50, 101 or 152)."""
    if depth not in IMAGENET_DEPTHS:
        raise ConfigError(f"depth {depth} is not valid for resnet-imagenet: use 18, 34, 50, 101 or 152 (e.g. 18)")
    block, layers = IMAGENET_DEPTHS[depth]
    return ResNet(block, layers, num_classes=num_classes, in_channels=in_channels, bn_init=bn_init)


def resnet18(num_classes: int = 10, in_channels: int = 3, *, bn_init: float = BN_INIT) -> ResNet:
    """ResNet-18, torchvision layout."""
    return resnet_imagenet(18, num_classes, in_channels, bn_init=bn_init)


def resnet34(num_classes: int = 10, in_channels: int = 3, *, bn_init: float = BN_INIT) -> ResNet:
    """ResNet-34, torchvision layout."""
    return resnet_imagenet(34, num_classes, in_channels, bn_init=bn_init)


def resnet50(num_classes: int = 10, in_channels: int = 3, *, bn_init: float = BN_INIT) -> ResNet:
    """ResNet-50, torchvision layout."""
    return resnet_imagenet(50, num_classes, in_channels, bn_init=bn_init)
