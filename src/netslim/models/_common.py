"""Helpers shared by the model families: the seed's weight initialisation, ResNet stages."""
from __future__ import annotations

import math
from typing import Any, Optional

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# Network Slimming starts every BN scaling factor at 0.5, not PyTorch's 1: the L1 penalty
# then has room to push unimportant ones towards zero from a common starting point.
BN_INIT = 0.5


def init_weights(model: nn.Module, bn_init: float = BN_INIT, linear_std: Optional[float] = None) -> None:
    """Initialise `model` in place as the seed does.

    Conv weights ~ N(0, sqrt(2 / (k*k*out_channels))) (He, fan-out), conv biases 0;
    BN weight `bn_init`, bias 0; Linear layers ~ N(0, linear_std) with bias 0 when
    `linear_std` is given, else PyTorch's default (the seed's resnet and densenet leave
    their `fc` at the default).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # For grouped/depthwise convs this is still k*k*out_channels, which equals
            # torchvision's kaiming_normal_(mode='fan_out') as the weight's fan-out.
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _BatchNorm) and m.affine:
            nn.init.constant_(m.weight, bn_init)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def make_stage(block: Any, inplanes: int, planes: int, blocks: int, stride: int = 1,
               shortcut_bn: bool = True) -> tuple[nn.Sequential, int]:
    """One ResNet stage of `blocks` blocks, and the width of the stream it leaves.

    `block(inplanes, planes, stride, downsample)` with `block.expansion`, as in torchvision.
    The first block gets a 1x1-conv shortcut where the stride or the width changes, with a
    BN behind it (`shortcut_bn`) in post-activation nets; the pre-activation ResNet has a
    bare conv there, because the next block's bn1 pre-activates the stream.
    """
    outplanes = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != outplanes:
        shortcut = [nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=stride, bias=False)]
        downsample = nn.Sequential(*shortcut, *([nn.BatchNorm2d(outplanes)] if shortcut_bn else []))
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(outplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers), outplanes
