"""Running a model on the meta device for shapes alone (no arithmetic).

Used where only shapes are needed on large inputs: the trace's shape propagation
(engine/trace.py) and MAC counting (profile.count). One thing PyTorch's meta device does
slowly is eval-mode batch norm: its meta kernel is a Python decomposition into prims
(about 2 ms a call, most of a ResNet-50 pass at 224x224), and so are several activations
(ReLU6, hardswish...); MetaShapes answers them directly.
A leaf module (imports nothing of netslim), so the engine and profile.py both use it.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

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


# Same-shape, same-dtype element-wise sums and products (a residual add: 0.15 ms on meta) and
# concatenations (DenseNet's: 0.1 ms), answered when no broadcasting or promotion is involved.
_BINARY = {_aten.add.Tensor, _aten.mul.Tensor, _aten.sub.Tensor}
_BINARY_INPLACE = {_aten.add_.Tensor, _aten.mul_.Tensor, _aten.sub_.Tensor}
_CAT = _aten.cat.default
_CONV = _aten.convolution.default  # its meta kernel works out the size in Python (50 us a call)


def _like(t: Tensor) -> Tensor:
    """torch.empty_like(t) on meta: itself a Python decomposition (20 us a call, 5 of them per
    ResNet block), so a contiguous tensor's twin is made directly (1-2 us)."""
    if t.is_contiguous():
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return torch.empty_like(t)


def fast_meta_op(func: Any, args: tuple) -> Optional[Any]:
    """What aten.native_batch_norm in eval mode, an element-wise activation, a convolution, or a
    sum, product or concatenation without broadcasting, returns on meta inputs, without its meta kernel; None
    for any other op or case (run it as usual)."""
    if func is _CAT and len(args) == 2 and args[0] and _same_dense(args[0], same_shape=False):
        return _concatenated(args[0], args[1])  # None if the shapes do not fit: the kernel says why
    if not args or not isinstance(args[0], Tensor) or not args[0].is_meta:
        return None
    if func is _BATCH_NORM and not args[5]:
        x, running_mean, running_var = args[0], args[3], args[4]
        return _like(x), _like(running_mean), _like(running_var)
    if func in _ELEMENTWISE_INPLACE:
        return args[0]
    if func in _ELEMENTWISE:
        return _like(args[0])
    if func is _CONV and len(args) == 9:
        return _convolved(*args)
    if func in _BINARY and _same_dense(args[:2]) and args[0].is_floating_point():
        return _like(args[0])
    if func in _BINARY_INPLACE and _same_dense(args[:2]) and args[0].is_floating_point():
        return args[0]
    return None


def _convolved(x: Tensor, w: Any, bias: Any, stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int], transposed: bool, output_padding: Any, groups: int) -> Optional[Tensor]:
    """A (not transposed) convolution of contiguous batched meta tensors: its output, by the
    size formula; None for anything else or what the kernel would refuse (it says why)."""
    if transposed or not isinstance(w, Tensor) or not w.is_meta or x.dim() != w.dim() or x.dtype != w.dtype \
            or not (x.is_contiguous() and w.is_contiguous()) or x.shape[1] != w.shape[1] * groups \
            or not len(stride) == len(padding) == len(dilation) == x.dim() - 2:
        return None
    spatial = [(n + 2 * p - d * (k - 1) - 1) // s + 1
               for n, k, s, p, d in zip(x.shape[2:], w.shape[2:], stride, padding, dilation)]
    if min(spatial, default=1) < 1 or w.shape[0] % groups:
        return None
    return torch.empty((x.shape[0], w.shape[0], *spatial), dtype=x.dtype, device=x.device)


def _same_dense(tensors: Sequence[Any], same_shape: bool = True) -> bool:
    """Contiguous meta tensors of one dtype (and one shape, or one rank for a concatenation):
    no broadcasting or type promotion to work out, the result is like the first."""
    first = tensors[0]
    return len(tensors) >= (2 if same_shape else 1) and all(
        isinstance(t, Tensor) and t.is_meta and t.dtype == first.dtype and t.is_contiguous()
        and (t.shape == first.shape if same_shape else t.dim() == first.dim() > 0) for t in tensors)


def _concatenated(tensors: Sequence[Tensor], dim: int) -> Optional[Tensor]:
    shape = list(tensors[0].shape)
    if not -len(shape) <= dim < len(shape):
        return None
    dim %= len(shape)
    if any(t.shape[:dim] != tensors[0].shape[:dim] or t.shape[dim + 1:] != tensors[0].shape[dim + 1:]
           for t in tensors):
        return None
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return torch.empty(shape, dtype=tensors[0].dtype, device=tensors[0].device)


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
