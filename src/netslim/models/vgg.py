"""VGG for 32x32 inputs, as in the Network Slimming seed (models/vgg.py).

Layer order and attribute names follow the seed so its state_dicts load by key:
`feature` (conv3x3-BN-ReLU per cfg entry, 'M' = 2x2 max-pool) and `classifier`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ._common import BN_INIT, init_weights

__all__ = ["VGG", "vgg", "VGG_CFGS"]

CfgEntry = Union[int, str]

VGG_CFGS: dict[int, list[CfgEntry]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class VGG(nn.Module):
    """VGG with BatchNorm: `feature` -> 2x2 avg-pool -> flatten -> one Linear.

    With the default cfgs (four max-pools) a 32x32 input reaches the avg-pool at 2x2,
    so the classifier sees exactly `cfg[-1]` features.
    """

    def __init__(self, cfg: Sequence[CfgEntry], num_classes: int = 10, in_channels: int = 3,
                 bn_init: float = BN_INIT) -> None:
        super().__init__()
        self.feature = self._make_layers(cfg, in_channels)
        last = [v for v in cfg if v != "M"][-1]
        self.classifier = nn.Linear(int(last), num_classes)
        init_weights(self, bn_init=bn_init, linear_std=0.01)

    @staticmethod
    def _make_layers(cfg: Sequence[CfgEntry], in_channels: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [
                    nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(int(v)),
                    nn.ReLU(inplace=True),
                ]
                in_channels = int(v)
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feature(x)          # N x C x 2 x 2 for a 32x32 input
        # Inline, as the seed's nn.AvgPool2d(2)(x): thop never counted it, so FLOPs match the seed's table.
        x = F.avg_pool2d(x, 2)       # N x C x 1 x 1
        x = torch.flatten(x, 1)      # N x C
        return self.classifier(x)


def _check_cfg(cfg: Sequence[CfgEntry]) -> list[CfgEntry]:
    out: list[CfgEntry] = []
    for v in cfg:
        if v == "M":
            out.append("M")
        elif isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            out.append(v)
        else:
            raise ConfigError(f"vgg cfg entry {v!r} is not valid: use positive channel counts and 'M' for max-pool")
    if not any(v != "M" for v in out):
        raise ConfigError("vgg cfg has no conv layer: give at least one channel count")
    return out


def vgg(depth: int = 19, num_classes: int = 10, in_channels: int = 3, *,
        cfg: Optional[Sequence[CfgEntry]] = None, width: float = 1.0, bn_init: float = BN_INIT) -> VGG:
    """VGG-`depth` (11/13/16/19), or the layer list `cfg` when given (it wins over depth).

    `width` scales every conv: channels = max(1, round(v * width)).
    """
    if cfg is None:
        if depth not in VGG_CFGS:
            raise ConfigError(f"depth {depth} is not valid for vgg: use 11, 13, 16 or 19")
        cfg = VGG_CFGS[depth]
    cfg = _check_cfg(cfg)
    if not width > 0:
        raise ConfigError(f"vgg width {width} is not valid: use a multiplier > 0 (e.g. 0.25, 1.0)")
    scaled = [v if v == "M" else max(1, int(round(int(v) * width))) for v in cfg]
    return VGG(scaled, num_classes=num_classes, in_channels=in_channels, bn_init=bn_init)
