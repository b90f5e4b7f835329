"""Inference-time rewrites of a (dense or slim) model: same outputs, fewer passes over memory.

    fast = netslim.fuse.optimize_for_inference(model)                       # eval-only copy
    fast = netslim.fuse.optimize_for_inference(model, channels_last=True)   # + NHWC weights

The model is traced with torch.fx (BatchNorms as leaves, as the pruning engine sees it)
and rewritten, in eval mode (BN = a fixed per-channel affine map s*x + b):

- fold: a BN that only reads a conv's (or Linear's) output goes into that conv's weight
  and bias (VGG's BNs, the ResNet bottleneck's bn2/bn3).
- pre-activation: BN -> ReLU -> 1x1 conv (the pre-activation ResNet's bn1, gathers
  included; DenseNet's transitions) becomes `ClampActivation` -> conv: relu(s*x + b) =
  s*clamp(x, lo, hi) + const per channel, so s and the constant move into the conv and one
  clamp pass replaces the BN pass and the ReLU pass. (Not before a padded 3x3 conv: the
  zero padding would then stand for the wrong value.)
- fuse: conv -> ReLU, conv -> add(other) and conv -> add -> ReLU become one `FusedConv2d`,
  which on CPU runs oneDNN's convolution with post-ops
  (`torch.ops.mkldnn._convolution_pointwise`, the kernels torch.compile's CPU backend
  uses): the ReLU and the residual add happen while the output tile is still in cache.
  Where the other addend is dead after the add (a residual stream), the sum is written
  into it in place: one read and one write of the stream instead of two reads and a
  write to a fresh tensor. oneDNN fuses the add only for channels-last tensors; in NCHW
  it runs the conv, then an in-place add.
- pool: nn.MaxPool2d(2) becomes `MaxPool2x2`, two elementwise maxima (aten's CPU
  max-pool computes argmax indices it then drops; 12-21% of VGG-13's time in NCHW).
- channels_last=True stores conv weights channels-last, so oneDNN runs the whole network
  in NHWC (no reorder to its blocked layout and back around every conv) and the
  pre-activation gathers of a slim model stay NHWC (layers.gather_channels). Best from a
  few images per batch up; for batch 1 keep NCHW (FusedConv2d then hands small convs to
  PyTorch's im2col path, as plain Conv2d does).

Outputs match the original eval-mode model up to float rounding (tests/test_fuse.py);
the input is never written to. The result is for inference: FusedConv2d runs plain ops
(no fused kernel) when autograd needs its weights.
"""
from __future__ import annotations

import copy
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .engine.trace import Tracer
from .layers import gather_channels, is_indexed_bn

__all__ = ["ClampActivation", "FusedConv2d", "MaxPool2x2", "fold_bn", "optimize_for_inference",
           "preactivation_fold"]

_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_}
_RELU_METHODS = {"relu", "relu_"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def _onednn_pointwise_available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


class FusedConv2d(nn.Conv2d):
    """Conv2d [+ add(other)] [+ ReLU] as one oneDNN convolution with post-ops (CPU, eval).

    forward(x) or forward(x, other): relu?(conv(x) + other?). Elsewhere (CUDA, float64,
    autograd through the weights) it runs the same maths with plain ops.
    """

    def __init__(self, conv: nn.Conv2d, relu: bool = False, add: bool = False,
                 inplace: bool = False) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                         conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                         conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        self.weight = conv.weight
        self.bias = conv.bias
        self.relu = relu
        self.add = add
        # inplace: the sum is written into `other` (which must be dead afterwards): one pass
        # over the residual stream instead of reading it and writing a fresh tensor.
        self.inplace = inplace and add

    def extra_repr(self) -> str:
        post = [p for p, on in (("add_" if self.inplace else "add", self.add), ("relu", self.relu)) if on]
        return super().extra_repr() + (f", post_ops={'+'.join(post)}" if post else "")

    def _onednn(self, x: torch.Tensor) -> bool:
        if not (x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES and x.dtype == self.weight.dtype
                and x.dim() == 4 and not (torch.is_grad_enabled() and self.weight.requires_grad)
                and _onednn_pointwise_available()):
            return False
        if x.dtype != torch.float32:
            return True
        # PyTorch's own choice for fp32 (aten's ConvParams::use_mkldnn): for one small image
        # (and for 1x1 convs on one thread) its im2col + GEMM conv, which vectorises over
        # pixels, beats oneDNN, which pads channels to the SIMD width: a slim model's narrow
        # layers at batch 1 run ~1.5x faster that way.
        n, (kh, kw) = x.shape[0], self.kernel_size
        first = (any(s != 1 for s in self.stride) or any(d != 1 for d in self.dilation) or n >= 16
                 or kh != 1 or kw != 1 or torch.get_num_threads() > 1)
        return first and (self.groups > 1 or (kh > 3 and kw > 3) or n > 1 or x.numel() > 20480)

    def forward(self, x: torch.Tensor, other: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (other is None) == self.add:
            raise TypeError(f"FusedConv2d(add={self.add}) needs {'an' if self.add else 'no'} `other` tensor")
        if self._onednn(x):
            pad, stride, dil = list(self.padding), list(self.stride), list(self.dilation)
            if self.add and other.shape[1:] == (self.out_channels, *other.shape[2:]) \
                    and other.dtype == x.dtype and other.device == x.device:
                if self.inplace:
                    return torch.ops.mkldnn._convolution_pointwise_.binary(
                        other, x, self.weight, self.bias, pad, stride, dil, self.groups,
                        "add", None, "relu" if self.relu else None, [], None)
                return torch.ops.mkldnn._convolution_pointwise.binary(
                    x, other, self.weight, self.bias, pad, stride, dil, self.groups,
                    "add", None, "relu" if self.relu else None, [], None)
            if not self.add:
                return torch.ops.mkldnn._convolution_pointwise(
                    x, self.weight, self.bias, pad, stride, dil, self.groups,
                    "relu" if self.relu else "none", [], "")
        y = self._conv_forward(x, self.weight, self.bias)
        if self.add:
            inplace = self.inplace and other.shape == y.shape and not torch.is_grad_enabled()
            y = other.add_(y) if inplace else y + other
        return torch.relu_(y) if self.relu else y


# ----------------------------------------------------------------------------------------
# BN folding

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _can_fold(producer: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(producer, _FOLDABLE) or isinstance(producer, FusedConv2d):
        return False
    if not isinstance(bn, _BatchNorm) or is_indexed_bn(bn) or bn.running_mean is None:
        return False
    width = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    return width == bn.num_features


def fold_bn(producer: nn.Module, bn: _BatchNorm) -> nn.Module:
    """A copy of conv/linear `producer` whose output equals bn(producer(x)) with bn in eval mode."""
    new = copy.deepcopy(producer)
    with torch.no_grad():
        w = producer.weight
        var = bn.running_var.to(torch.float64)
        scale = (bn.weight.to(torch.float64) if bn.weight is not None else torch.ones_like(var)) \
            / torch.sqrt(var + bn.eps)
        shift = bn.bias.to(torch.float64) if bn.bias is not None else torch.zeros_like(var)
        b = producer.bias.to(torch.float64) if producer.bias is not None else torch.zeros_like(var)
        shape = (-1,) + (1,) * (w.dim() - 1)
        new.weight = nn.Parameter((w.to(torch.float64) * scale.view(shape)).to(w.dtype),
                                  requires_grad=w.requires_grad)
        new.bias = nn.Parameter(((b - bn.running_mean.to(torch.float64)) * scale + shift).to(w.dtype),
                                requires_grad=w.requires_grad)
    return new


class ClampActivation(nn.Module):
    """relu(bn(x[:, keep])) in the form the next conv can absorb: clamp(x[:, keep], lo, hi).

    With BN in eval mode, relu(s*x + b) = s * clamp(x, lo, hi) + relu(b)[s == 0]
    per channel (lo = -b/s, hi = inf where s > 0; lo = -inf, hi = -b/s where s < 0), so
    the scale and shift move into the next 1x1 conv's weight and bias and one clamp pass
    replaces the BN pass and the ReLU pass.
    """

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, keep_index: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.register_buffer("lo", lo)
        self.register_buffer("hi", hi)
        self.register_buffer("keep_index", keep_index)
        # One-sided when every factor has the same sign (the usual case): a clamp with one
        # broadcast bound is a fast kernel in NCHW too, one with two bounds is not (~2x).
        self.sides = "min" if bool(torch.isinf(hi).all()) else "max" if bool(torch.isinf(lo).all()) else "both"

    def extra_repr(self) -> str:
        reads = f", reads {self.keep_index.numel()} input channels" if self.keep_index is not None else ""
        return f"{self.lo.numel()}, {self.sides}{reads}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        lo = self.lo.view(shape) if self.sides != "max" else None
        hi = self.hi.view(shape) if self.sides != "min" else None
        if self.keep_index is not None:
            return gather_channels(x, self.keep_index).clamp_(lo, hi)  # the gather is fresh
        return torch.clamp(x, lo, hi)


def _bn_affine(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in float64 with bn(x) = scale * x + shift in eval mode."""
    var = bn.running_var.detach().to(torch.float64)
    gamma = bn.weight.detach().to(torch.float64) if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - bn.running_mean.detach().to(torch.float64) * scale


def preactivation_fold(bn: _BatchNorm, conv: nn.Conv2d) -> tuple[ClampActivation, nn.Conv2d]:
    """(act, conv2) with conv2(act(x)) == conv(relu(bn(x))), bn in eval mode, conv 1x1 unpadded."""
    scale, shift = _bn_affine(bn)
    pos, neg = scale > 0, scale < 0
    bound = torch.where(scale != 0, -shift / torch.where(scale != 0, scale, 1), 0)
    inf = torch.full_like(scale, float("inf"))
    lo = torch.where(pos, bound, -inf)
    hi = torch.where(neg, bound, inf)
    # s == 0: the channel is the constant relu(shift); elsewhere the shift is the constant
    const = torch.where(scale == 0, shift.clamp_min(0), shift)
    new = copy.deepcopy(conv)
    with torch.no_grad():
        w = conv.weight.detach().to(torch.float64)                   # [out, in, 1, 1]
        b = (w.flatten(1) * const).sum(1)                            # [out]
        if conv.bias is not None:
            b = b + conv.bias.detach().to(torch.float64)
        new.weight = nn.Parameter((w * scale.view(1, -1, 1, 1)).to(conv.weight.dtype),
                                  requires_grad=conv.weight.requires_grad)
        new.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    dtype = bn.running_mean.dtype
    keep = bn.keep_index.clone() if is_indexed_bn(bn) else None
    return ClampActivation(lo.to(dtype), hi.to(dtype), keep), new


class MaxPool2x2(nn.Module):
    """nn.MaxPool2d(2) as two elementwise maxima over strided views (same values, NaN too).

    aten's CPU max_pool2d always computes argmax indices too and vectorises poorly in NCHW:
    at batch 64 it takes ~2 ms (channels-last) to ~26 ms (NCHW) on a 64x64x32x32 input
    where the two maxima take ~2 ms, and channels-last it barely shrinks for narrow layers.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2          # floor mode drops a last odd row
        rows = torch.maximum(x[..., 0:h:2, :w], x[..., 1:h:2, :w])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def _is_maxpool2x2(m: nn.Module) -> bool:
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return (type(m) is nn.MaxPool2d and pair(m.kernel_size) == (2, 2) and pair(m.stride or m.kernel_size) == (2, 2)
            and pair(m.padding) == (0, 0) and pair(m.dilation) == (1, 1) and not m.ceil_mode
            and not m.return_indices)


# ----------------------------------------------------------------------------------------
# The graph rewrite

def _single_use_module(gm: fx.GraphModule, node: fx.Node, types) -> Optional[nn.Module]:
    """The module `node` calls if it is of `types`, called nowhere else, and `node` has one user."""
    if node.op != "call_module" or len(node.users) != 1:
        return None
    m = gm.get_submodule(node.target)
    if not isinstance(m, types):
        return None
    calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target)
    return m if calls == 1 else None


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and not node.kwargs
    return node.op == "call_method" and node.target in _RELU_METHODS and len(node.args) == 1


def _set(gm: fx.GraphModule, name: str, m: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, child, m)


def _fusable_conv(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Conv2d]:
    m = _single_use_module(gm, node, nn.Conv2d)
    if m is None or isinstance(m, FusedConv2d) or m.padding_mode != "zeros" or isinstance(m.padding, str):
        return None
    return m


def _fold_pass(gm: fx.GraphModule) -> int:
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        bn = gm.get_submodule(node.target)
        prev = node.args[0]
        producer = _single_use_module(gm, prev, _FOLDABLE)
        if producer is None or not _can_fold(producer, bn) or len(node.args) != 1:
            continue
        if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target) != 1:
            continue  # a BN module applied at several places: leave it
        _set(gm, prev.target, fold_bn(producer, bn))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded += 1
    return folded


def _pool_pass(gm: fx.GraphModule) -> int:
    done = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and len(node.args) == 1 and not node.kwargs \
                and _is_maxpool2x2(gm.get_submodule(node.target)):
            _set(gm, node.target, MaxPool2x2())
            done += 1
    return done


def _preactivation_pass(gm: fx.GraphModule) -> int:
    """BN -> ReLU -> 1x1 conv (pre-activation): ClampActivation -> conv with the BN inside."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or len(node.users) != 1:
            continue
        bn = gm.get_submodule(node.target)
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None:
            continue
        relu_node = next(iter(node.users))
        if not _is_relu(gm, relu_node) or relu_node.args[0] is not node or len(relu_node.users) != 1:
            continue
        conv_node = next(iter(relu_node.users))
        conv = _single_use_module(gm, conv_node, nn.Conv2d)
        if conv is None or isinstance(conv, FusedConv2d) or conv.groups != 1 or len(conv_node.args) != 1 \
                or tuple(conv.kernel_size) != (1, 1) or isinstance(conv.padding, str) \
                or tuple(conv.padding) != (0, 0) or conv.in_channels != bn.num_features:
            continue
        if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target) != 1:
            continue
        act, new_conv = preactivation_fold(bn, conv)
        _set(gm, node.target, act)
        _set(gm, conv_node.target, new_conv)
        relu_node.replace_all_uses_with(node)
        gm.graph.erase_node(relu_node)
        done += 1
    return done


def _fuse_pass(gm: fx.GraphModule, add: bool) -> int:
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), FusedConv2d):
            continue
        # conv -> add(other) [-> relu]
        if add and node.op == "call_function" and node.target in _ADD_FUNCTIONS and len(node.args) == 2 \
                and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args):
            # `a += conv(x)` mutates a: only `conv(x) += a` (or a plain add) may be rewritten
            for i in ((0,) if node.target is operator.iadd else (0, 1)):
                conv_node, other = node.args[i], node.args[1 - i]
                conv = _fusable_conv(gm, conv_node)
                if conv is None or other is conv_node or _shape(conv_node) is None \
                        or _shape(conv_node) != _shape(other):
                    continue
                relu_node = next(iter(node.users)) if len(node.users) == 1 else None
                relu = relu_node is not None and _is_relu(gm, relu_node)
                inplace = _dead_after(gm, other, node)
                _set(gm, conv_node.target, FusedConv2d(conv, relu=relu, add=True, inplace=inplace))
                # other must exist before the conv runs: move the conv call to the add's place
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_module(conv_node.target, (conv_node.args[0], other))
                new.meta = dict(conv_node.meta)
                end = relu_node if relu else node
                end.replace_all_uses_with(new)
                if relu:
                    gm.graph.erase_node(relu_node)
                gm.graph.erase_node(node)
                gm.graph.erase_node(conv_node)
                fused += 1
                break
            continue
        # conv -> relu
        if _is_relu(gm, node) and node.args and isinstance(node.args[0], fx.Node):
            conv_node = node.args[0]
            conv = _fusable_conv(gm, conv_node)
            if conv is None or len(conv_node.args) != 1:
                continue
            _set(gm, conv_node.target, FusedConv2d(conv, relu=True))
            node.replace_all_uses_with(conv_node)
            gm.graph.erase_node(node)
            fused += 1
    return fused


_FRESH_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, _BatchNorm)


def _alias_root(gm: fx.GraphModule, node: fx.Node) -> Optional[fx.Node]:
    """The node that allocated `node`'s storage, following our in-place convs and in-place
    ReLUs; None when that is unknown (a view, a graph input, an op we do not know)."""
    while True:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, FusedConv2d) and m.inplace:
                node = node.args[1]
                continue
            if type(m) is nn.ReLU and m.inplace:
                node = node.args[0]
                continue
            return node if isinstance(m, _FRESH_MODULES) else None
        if node.op == "call_method" and node.target == "relu_" or \
                node.op == "call_function" and node.target in (torch.relu_, F.relu_):
            node = node.args[0]
            continue
        if node.op == "call_function" and node.target in (operator.add, torch.add, torch.cat):
            return node
        return None


def _dead_after(gm: fx.GraphModule, other: fx.Node, at: fx.Node) -> bool:
    """May `at` overwrite `other`'s storage: is every tensor sharing it unused after `at`?"""
    root = _alias_root(gm, other)
    if root is None:
        return False
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    group = [n for n in gm.graph.nodes if n is root or _alias_root(gm, n) is root]
    return all(order[u] < order[at] or u is at for n in group for u in n.users)


def _shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _propagate_shapes(gm: fx.GraphModule, example_input: torch.Tensor) -> None:
    """Tensor shapes on every node: from shapes alone (fake tensors), else a real forward."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with torch.no_grad():
            ShapeProp(gm, fake_mode=mode).propagate(mode.from_tensor(example_input))
        return
    except Exception:  # noqa: BLE001 - any failure of the shape-only path: run it for real
        pass
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)


def optimize_for_inference(model: nn.Module, example_input: Optional[torch.Tensor] = None, *,
                           fold: bool = True, preactivation: bool = True, fuse: bool = True,
                           fuse_add: bool = True, pool: bool = True,
                           channels_last: bool = False) -> fx.GraphModule:
    """An eval-mode copy of `model` with BNs folded into convs and conv post-ops fused.

    `example_input` (default: a zero example of the model's input size) gives the tensor
    shapes (traced on fake tensors), so an add is fused only where nothing broadcasts.
    fold / preactivation / fuse / fuse_add / pool switch the rewrites (module doc) on and off.
    `channels_last` also stores 4-d weights channels-last (run inputs as
    x.contiguous(memory_format=torch.channels_last), or let the first conv convert them).
    `model` is not changed. Outputs equal model.eval()'s up to float rounding.
    """
    from .engine.trace import example_input as make_example

    src = copy.deepcopy(model).eval()
    meta = dict(getattr(model, "netslim_meta", {}) or {})
    if example_input is None:
        example_input = make_example(meta.get("input_size"), src)
    param = next(src.parameters(), None)
    if param is not None:
        example_input = example_input.to(device=param.device, dtype=param.dtype)
    gm = fx.GraphModule(src, Tracer(set()).trace(src), class_name=type(model).__name__ + "Inference")
    gm.eval()
    if fold:
        _fold_pass(gm)
    if preactivation:
        _preactivation_pass(gm)
    if pool:
        _pool_pass(gm)
    if fuse:
        _propagate_shapes(gm, example_input)
        _fuse_pass(gm, add=fuse_add)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    if channels_last:
        gm = gm.to(memory_format=torch.channels_last)
    gm.netslim_meta = meta
    return gm
