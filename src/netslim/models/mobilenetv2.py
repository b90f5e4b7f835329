"""MobileNetV2 in torchvision's layout, with an option for 32x32 inputs.

Module indices match torchvision.models.mobilenetv2 (features.N.conv.M..., classifier.1),
so torchvision state_dicts load by key. `small_input=True` (the default) makes the stem
and the first stride-2 stage stride 1, as common CIFAR ports do, so a 32x32 input reaches
the last stage at 4x4 instead of 1x1.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ._common import BN_INIT, init_weights

__all__ = ["ConvBNReLU", "InvertedResidual", "MobileNetV2", "mobilenetv2"]

# (expand ratio t, output channels c, repeats n, first stride s), as in the paper.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round `v` to a multiple of `divisor` (at least `divisor`), never more than 10% down."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU(nn.Sequential):
    """conv (no bias) - BN - ReLU6; indices 0/1/2 as torchvision's Conv2dNormActivation."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, (kernel_size - 1) // 2,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )
        self.out_channels = out_planes


class InvertedResidual(nn.Module):
    """Expand 1x1 (skipped when t = 1) - depthwise 3x3 (stride) - linear project 1x1 + BN.

    The input is added back when stride is 1 and the width is unchanged: those project
    BNs are coupled to the stream. The depthwise conv ties its input and output channels.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden_dim, kernel_size=1))
        layers += [
            ConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:   # fixed at construction, so fx sees plain Python control flow
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """features (stem, 17 inverted residuals, 1x1 conv to 1280) -> global avg-pool -> classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
                 small_input: bool = True, dropout: float = 0.2, bn_init: float = BN_INIT) -> None:
        super().__init__()
        input_channel = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU(in_channels, input_channel, stride=1 if small_input else 2)]
        first_stride2_stage = True
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            if s == 2 and small_input and first_stride2_stage:
                s, first_stride2_stage = 1, False   # keep 32x32 inputs at 32x32 one stage longer
            output_channel = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(ConvBNReLU(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        # torchvision calls adaptive_avg_pool2d in forward; a module here, no weights, same keys.
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(self.last_channel, num_classes),
        )
        init_weights(self, bn_init=bn_init, linear_std=0.01)  # Linear as torchvision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)                     # N x 1280 x 4 x 4 (32x32 input, small_input)
        x = torch.flatten(self.avgpool(x), 1)    # N x 1280
        return self.classifier(x)


def mobilenetv2(num_classes: int = 10, in_channels: int = 3, *, width_mult: float = 1.0,
                small_input: bool = True, dropout: float = 0.2, bn_init: float = BN_INIT) -> MobileNetV2:
    """MobileNetV2; `width_mult` scales every width (rounded to multiples of 8)."""
    if not width_mult > 0:
        raise ConfigError(f"mobilenetv2 width_mult {width_mult} is not valid: use a multiplier > 0 (e.g. 0.5, 1.0)")
    if not isinstance(small_input, bool):
        raise ConfigError(f"mobilenetv2 small_input {small_input!r} is not valid: use True or False")
    if not 0 <= dropout < 1:
        raise ConfigError(f"mobilenetv2 dropout {dropout} is not valid: use a probability in [0, 1)")
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels, width_mult=width_mult,
                       small_input=small_input, dropout=dropout, bn_init=bn_init)
