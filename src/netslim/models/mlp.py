"""The paper's MNIST multi-layer perceptron: Linear-BN-ReLU per hidden layer, then Linear.

Liu et al. prune its neurons with the same global threshold over BatchNorm1d gammas
(784-500-300-10 -> 784-100-60-10). netslim pads 28x28 images to 32x32, hence
`image_size=32` by default; `image_size=28` gives the paper's 784 inputs.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ._common import BN_INIT

__all__ = ["MLP", "mlp"]


class MLP(nn.Module):
    """flatten -> features (Linear-BN1d-ReLU per hidden width) -> classifier Linear."""

    def __init__(self, in_features: int, hidden: Sequence[int] = (500, 300), num_classes: int = 10,
                 bn_init: float = BN_INIT) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            # No bias: the BN that follows has its own shift.
            layers += [nn.Linear(in_features, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            in_features = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_features, num_classes)
        for m in self.features.modules():
            if isinstance(m, nn.Linear):
                # The conv rule with k = 1: N(0, sqrt(2 / out_features)).
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / m.out_features))
            elif isinstance(m, nn.BatchNorm1d):
                nn.init.constant_(m.weight, bn_init)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)      # N x (C*H*W)
        return self.classifier(self.features(x))


def mlp(num_classes: int = 10, in_channels: int = 3, *, hidden: Sequence[int] = (500, 300),
        image_size: int = 32, bn_init: float = BN_INIT) -> MLP:
    """MLP over `in_channels` x `image_size` x `image_size` inputs with hidden widths `hidden`."""
    hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
    if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
        raise ConfigError(f"mlp hidden {hidden!r} is not valid: use one or more positive widths (e.g. (500, 300))")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"mlp image_size {image_size!r} is not valid: use the input side in pixels (e.g. 28, 32)")
    return MLP(in_channels * image_size * image_size, hidden, num_classes=num_classes, bn_init=bn_init)
