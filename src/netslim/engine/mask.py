"""Step 5b: mask. `apply_mask` zeroes the pruned factors (gamma and beta) in place and keeps
them at zero while training, so the masked model computes what the slim model computes.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import PruneError
from ..wrappers import unwrap_model


class _MaskGradient:
    """A parameter's gradient hook: multiply the gradient by its BN's current 0/1 mask."""

    def __init__(self, bn: nn.Module):
        self.bn = bn

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        mask = self.bn._buffers.get("netslim_mask")
        return grad if mask is None else grad * mask.to(grad.dtype)


def _has_mask_hook(p: nn.Parameter) -> bool:
    return any(isinstance(h, _MaskGradient) for h in (p._backward_hooks or {}).values())


def _hold_masked_factors(bn: nn.Module, args=None) -> None:
    """Forward pre-hook of a masked BN: make sure its gamma and beta carry a _MaskGradient.

    Tensor hooks do not survive copy.deepcopy (nor anything else that makes new
    Parameters), while module hooks do. So the module hook checks the parameters
    themselves on every forward, i.e. before every backward, and re-hooks new ones.
    """
    for p in (bn.weight, bn.bias):
        if p is not None and p.requires_grad and not _has_mask_hook(p):
            p.register_hook(_MaskGradient(bn))


def strip_masks(model: nn.Module, modules: Iterable[nn.Module] | None = None) -> None:
    """Remove the masks apply_mask put on `model` (its `modules`, if the caller has them)."""
    for m in model.modules() if modules is None else modules:
        if "netslim_mask" in getattr(m, "_buffers", {}):
            del m._buffers["netslim_mask"]
        for key, hook in list(m._forward_pre_hooks.items()):
            if hook is _hold_masked_factors:
                del m._forward_pre_hooks[key]


def apply_mask(model: nn.Module, mask: dict[str, Sequence[int]]) -> nn.Module:
    """Zero gamma and beta of every channel not kept in `mask`, in place, and keep them zero.

    A gradient hook multiplies their gradients by the 0/1 mask, so SGD's weight decay and
    momentum see exact zeros too and the factors stay exactly 0 through fine-tuning
    (sign(0) = 0, so the sparsity step leaves them alone as well). The hooks survive
    copy.deepcopy and re-masking (see _hold_masked_factors).
    """
    model = unwrap_model(model)
    mods = dict(model.named_modules())
    for name, kept in mask.items():
        bn = mods.get(name)
        if not isinstance(bn, _BatchNorm) or bn.weight is None:
            raise PruneError(f"the mask names {name!r}, which is not an affine BatchNorm of this model")
        keep = torch.zeros(bn.num_features, dtype=bn.weight.dtype, device=bn.weight.device)
        keep[list(kept)] = 1
        bn.register_buffer("netslim_mask", keep, persistent=False)
        with torch.no_grad():
            bn.weight.mul_(keep)
            bn.bias.mul_(keep)
        if _hold_masked_factors not in bn._forward_pre_hooks.values():
            bn.register_forward_pre_hook(_hold_masked_factors)
        _hold_masked_factors(bn)
    meta = dict(getattr(model, "netslim_meta", {}) or {})
    meta["mask"] = {n: [int(i) for i in k] for n, k in mask.items()}
    model.netslim_meta = meta
    return model

