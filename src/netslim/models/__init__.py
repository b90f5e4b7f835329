"""Model families and their registry.

`build_model(arch, depth, num_classes, in_channels, **options)` is the one way the rest of
netslim makes a network; `list_models()` and `model_info()` describe what it accepts.
Every model is traceable with torch.fx, keeps its pooling as modules (flatten is
`torch.flatten(x, 1)`), and starts from the seed's initialisation (BN gamma 0.5).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import nn

from ..errors import ConfigError
from .densenet import DenseNet, densenet
from .mlp import MLP, mlp
from .mobilenetv2 import MobileNetV2, mobilenetv2
from .preresnet import PreResNet, preresnet
from .resnet_cifar import CifarResNet, resnet_cifar
from .resnet_imagenet import IMAGENET_DEPTHS, ResNet, resnet18, resnet34, resnet50, resnet_imagenet
from .vgg import VGG, VGG_CFGS, vgg

__all__ = [
    "build_model", "list_models", "model_info", "check_depth",
    "VGG", "PreResNet", "DenseNet", "CifarResNet", "ResNet", "MobileNetV2", "MLP",
    "vgg", "preresnet", "densenet", "resnet_cifar", "resnet_imagenet", "resnet18", "resnet34",
    "resnet50", "mobilenetv2", "mlp",
]

# Arguments every builder takes; the rest of a builder's keyword arguments are its options.
_COMMON = ("depth", "num_classes", "in_channels")


@dataclass(frozen=True)
class _Family:
    builder: Callable[..., nn.Module]
    description: str
    depths: Optional[str] = None                 # the valid form, for messages: "9n+2"
    default_depth: Optional[int] = None          # None: the family has no depth
    depth_ok: Callable[[int], bool] = field(default=lambda d: False)

    @property
    def options(self) -> dict[str, Any]:
        params = inspect.signature(self.builder).parameters.values()
        return {p.name: p.default for p in params if p.name not in _COMMON}


def _form(a: int, b: int, least: int) -> Callable[[int], bool]:
    return lambda d: d >= least and (d - b) % a == 0


def _one_of(*depths: int) -> Callable[[int], bool]:
    return lambda d: d in depths


_REGISTRY: dict[str, _Family] = {
    "vgg": _Family(vgg, "VGG with BN for 32x32 inputs (the seed's vgg)",
                   "11, 13, 16 or 19", 19, _one_of(*VGG_CFGS)),
    "resnet": _Family(preresnet, "pre-activation bottleneck ResNet (the seed's resnet)",
                      "9n+2", 164, _form(9, 2, 11)),
    "densenet": _Family(densenet, "DenseNet with basic blocks (the seed's densenet)",
                        "3n+4", 40, _form(3, 4, 7)),
    "resnet-cifar": _Family(resnet_cifar, "post-activation CIFAR ResNet (He et al.), 1x1 conv+BN shortcuts",
                            "6n+2", 56, _form(6, 2, 8)),
    "resnet-imagenet": _Family(resnet_imagenet, "ResNet in torchvision's ImageNet layout",
                               "18, 34, 50, 101 or 152", 18, _one_of(*IMAGENET_DEPTHS)),
    "resnet18": _Family(resnet_imagenet, "ResNet-18, torchvision layout", "18", 18, _one_of(18)),
    "resnet34": _Family(resnet_imagenet, "ResNet-34, torchvision layout", "34", 34, _one_of(34)),
    "resnet50": _Family(resnet_imagenet, "ResNet-50, torchvision layout", "50", 50, _one_of(50)),
    "mobilenetv2": _Family(mobilenetv2, "MobileNetV2, torchvision layout (small_input: stride 1 stem for 32x32)"),
    "mlp": _Family(mlp, "the paper's MNIST MLP: Linear-BN-ReLU hidden layers"),
}


def list_models() -> list[str]:
    """The registered architecture names, in registry order."""
    return list(_REGISTRY)


def _family(arch: str) -> _Family:
    try:
        return _REGISTRY[arch]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown arch {arch!r}: use one of {', '.join(_REGISTRY)}") from None


def model_info(arch: str) -> dict[str, Any]:
    """What `arch` accepts: {'description', 'depths', 'default_depth', 'options'}.

    `depths` is the valid form ("9n+2") or None for families without a depth;
    `options` maps each extra keyword of build_model to its default.
    """
    fam = _family(arch)
    return {"description": fam.description, "depths": fam.depths,
            "default_depth": fam.default_depth, "options": fam.options}


def check_depth(arch: str, depth: Optional[int]) -> None:
    """Raise ConfigError unless `depth` suits `arch` (None always does: the default)."""
    fam = _family(arch)
    if depth is None:
        return
    if fam.default_depth is None:
        raise ConfigError(f"{arch} takes no depth (got {depth}): leave the depth out")
    if isinstance(depth, bool) or not isinstance(depth, int) or not fam.depth_ok(depth):
        example = "" if fam.depths == str(fam.default_depth) else f" (e.g. {fam.default_depth})"
        raise ConfigError(f"depth {depth!r} is not valid for {arch}: use {fam.depths}{example}")


def build_model(arch: str, depth: Optional[int] = None, num_classes: int = 10, in_channels: int = 3,
                **options: Any) -> nn.Module:
    """Build architecture `arch` (see list_models) with freshly initialised weights.

    `depth` None means the family's default; `options` are the family's extra keywords
    (model_info(arch)['options']), e.g. width=0.25 for vgg, growth_rate=12 for densenet.
    """
    fam = _family(arch)
    check_depth(arch, depth)
    valid = fam.options
    unknown = sorted(set(options) - set(valid))
    if unknown:
        allowed = ", ".join(valid) or "none"
        raise ConfigError(f"unknown option {', '.join(unknown)} for {arch}: valid options are {allowed}")
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} {value!r} is not valid: use a positive integer")
    if "bn_init" in options and not isinstance(options["bn_init"], (int, float)):
        raise ConfigError(f"bn_init {options['bn_init']!r} is not valid: use a number (the seed uses 0.5)")
    if fam.default_depth is None:
        model = fam.builder(num_classes=num_classes, in_channels=in_channels, **options)
        recipe = {"name": arch}
    else:
        depth = fam.default_depth if depth is None else depth
        model = fam.builder(depth, num_classes=num_classes, in_channels=in_channels, **options)
        recipe = {"name": arch, "depth": depth}
    # What rebuilds it: save_checkpoint stores this, so a built (or pruned) model reloads from
    # its file alone. The same dict as a checkpoint's "arch".
    model.netslim_meta = {"arch": {**recipe, "num_classes": num_classes, "in_channels": in_channels, **options}}
    return model
