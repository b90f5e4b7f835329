"""Running a model on the meta device for shapes alone (no arithmetic).

Used where only shapes are needed on large inputs: the trace's shape propagation
(engine/trace.py) and MAC counting (profile.count). One thing PyTorch's meta device does
slowly is eval-mode batch norm: its meta kernel is a Python decomposition into prims
(about 2 ms a call, most of a ResNet-50 pass at 224x224), and so are several activations
(ReLU6, hardswish...); MetaShapes answers them directly.
A leaf module (imports nothing of netslim), so the engine and profile.py both use it.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
_BATCH_NORM = _aten.native_batch_norm.default
# Element-wise activations whose meta kernels are Python decompositions too (0.4-3 ms a call
# at 96x112x112: MobileNetV2's 35 ReLU6 were a quarter of a prune call at 224x224). Their
# output has the input's shape, dtype and layout; the in-place forms return the input.
_ELEMENTWISE = {getattr(_aten, name).default for name in (
    "relu", "hardtanh", "hardswish", "hardsigmoid", "gelu", "leaky_relu", "elu", "mish") if hasattr(_aten, name)}
_ELEMENTWISE_INPLACE = {getattr(_aten, name + "_").default for name in (
    "relu", "hardtanh", "hardswish", "hardsigmoid", "gelu", "leaky_relu", "elu", "mish") if hasattr(_aten, name + "_")}


def fast_meta_op(func: Any, args: tuple) -> Optional[Any]:
    """What aten.native_batch_norm in eval mode, or an element-wise activation, returns on a
    meta input, without its meta kernel; None for any other op (run it as usual)."""
    if not args or not isinstance(args[0], Tensor) or not args[0].is_meta:
        return None
    if func is _BATCH_NORM and not args[5]:
        x, running_mean, running_var = args[0], args[3], args[4]
        return torch.empty_like(x), torch.empty_like(running_mean), torch.empty_like(running_var)
    if func in _ELEMENTWISE_INPLACE:
        return args[0]
    if func in _ELEMENTWISE:
        return torch.empty_like(args[0])
    return None


class MetaShapes(TorchDispatchMode):
    """Every op as usual, except eval batch norm and activations on meta tensors (fast_meta_op)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        out = fast_meta_op(func, args)
        return out if out is not None else func(*args, **(kwargs or {}))


# Above this many values per example, a pass on the meta device (no arithmetic) beats a
# real forward; below it the real forward costs milliseconds and the meta pass's per-op
# Python overhead dominates. Measured, 1 thread (one MAC count; one shape propagation):
# ResNet-50 at 3x224x224 0.18 s real vs 0.05 s meta (0.17 vs 0.06), MobileNetV2 0.46 vs
# 0.08; at 3x32x32 ResNet-50 0.03 s real vs 0.05 s meta.
_REAL_MAX_VALUES = 3 * 96 * 96


def prefer_meta(example_input: Tensor) -> bool:
    """Is one example of `example_input` large enough that shapes are cheaper on meta?"""
    return example_input[0].numel() > _REAL_MAX_VALUES
