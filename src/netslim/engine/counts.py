"""The report's counts (profile.count's params and MACs) read off the analysis's traced graph.

profile.count runs a forward (on meta) with module hooks and an aten-level op counter. The
analysis already traced the model and recorded every node's output shape, and a pruned
model differs from the dense one only in channel counts, which the slot walk knows per node
(`Analysis.chans`). So the dense count is profile.py's own module rules (`_MODULE_RULES`)
applied to the graph's shapes, and a slim model's count the same rules on the same graph
with each node's channel dim cut to its kept slots, read against the slim modules (their
weights, in_features). No forward at all.

Exactness with profile.count is the invariant, so this is a whitelist: `GraphCount.of`
returns None (the caller runs profile.count) unless every node of the graph is one whose
count it can prove equal:

- a rule module (conv, linear, norm, average pool) called as one leaf without submodules,
  its first argument a tensor, its output one tensor whose shape agrees with the module
  (out_channels, num_features...: checked on every count, dense and slim);
- a module, function or method known to issue no conv, matmul or attention aten op
  (activations, max pools, dropout, reshapes, cat, +, *): 0, as profile.count counts it;
- every rule module of the model is such a leaf (a user's AvgPool2d subclass is traced
  through: profile.count hooks it, the graph only sees F.avg_pool2d);
- no forward hook but the mask's (mask._hold_masked_factors, which issues no op), no global
  forward hook;
- the trace matches an eval forward: a module still in training mode whose class reads
  `self.training` may have been traced down another branch than profile.count's eval run.

Anything else (a module traced as one opaque call, a registered leaf, F.conv2d or x @ w in
a forward, a Linear on a 3-d tensor...) counts with profile.count.
"""
from __future__ import annotations

import math
import operator
import types
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_hooks
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.pooling import _AdaptiveAvgPoolNd, _AvgPoolNd

from ..profile import (_adaptive_avgpool_macs, _avgpool_macs, _conv_macs, _conv_transpose_macs, _linear_macs,
                       _module_rule, _norm_macs, count_params)
from .channels import ChannelInfo, SlotArrays
from .mask import _hold_masked_factors
from .trace import node_shape

# Exact types (a subclass may do more in its forward). None has submodules or issues a conv,
# matmul-family or attention aten op, even decomposed: profile.count counts them 0.
_ZERO_MAC_MODULES = frozenset({
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.GELU, nn.LeakyReLU,
    nn.ELU, nn.Mish, nn.Softmax, nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d, nn.Upsample, nn.ZeroPad2d, nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle,
})
_ZERO_MAC_FUNCTIONS = frozenset({
    operator.add, operator.iadd, operator.sub, operator.mul, operator.imul, operator.truediv,
    operator.floordiv, operator.neg, operator.getitem, getattr,
    torch.add, torch.mul, torch.cat, torch.flatten, torch.reshape, torch.sigmoid, torch.relu, torch.tanh,
    torch.chunk, torch.split, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze, torch.mean,
    torch.channel_shuffle,
    F.relu, F.relu6, F.silu, F.hardswish, F.hardsigmoid, F.gelu, F.sigmoid, F.dropout,
    F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, F.interpolate, F.pad,
})
_ZERO_MAC_METHODS = frozenset({
    "view", "reshape", "flatten", "size", "dim", "chunk", "split", "transpose", "permute", "contiguous",
    "unsqueeze", "squeeze", "expand", "expand_as", "mean", "sum", "relu", "sigmoid", "tanh", "add", "mul",
})


class _Shape:
    """What profile's MAC rules read of a tensor: its shape and numel()."""
    __slots__ = ("shape",)

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape

    def numel(self) -> int:
        return math.prod(self.shape)


# Per rule of profile._MODULE_RULES: do the input and output shapes agree with the module (the
# slim one for a slim count)? Also the proof that the derived channel widths are the slim
# model's: a rule without an entry here is never counted from the graph.
def _conv_agrees(m: Any, x: tuple, y: tuple) -> bool:
    return len(x) == len(y) >= 3 and x[1] == m.in_channels and y[1] == m.out_channels


def _linear_agrees(m: Any, x: tuple, y: tuple) -> bool:
    return len(x) == len(y) == 2 and x[1] == m.in_features and y[1] == m.out_features


def _norm_agrees(m: Any, x: tuple, y: tuple) -> bool:
    if isinstance(m, nn.LayerNorm):
        ns = tuple(m.normalized_shape)
        return len(y) > len(ns) and y[-len(ns):] == ns and x == y
    width = m.num_channels if isinstance(m, nn.GroupNorm) else m.num_features
    # an IndexedBatchNorm gathers its channels from a wider input: only its output has its width
    return len(y) >= 2 and y[1] == width and x[0] == y[0] and x[2:] == y[2:] and \
        (x[1] == y[1] or isinstance(m, _BatchNorm))


def _pool_agrees(m: Any, x: tuple, y: tuple) -> bool:
    return len(x) == len(y) >= 3 and x[:2] == y[:2]


_AGREES: dict[Callable, Callable[[Any, tuple, tuple], bool]] = {
    _conv_transpose_macs: _conv_agrees,
    _conv_macs: _conv_agrees,
    _linear_macs: _linear_agrees,
    _norm_macs: _norm_agrees,
    _avgpool_macs: _pool_agrees,
    _adaptive_avgpool_macs: _pool_agrees,
}

_training_readers: dict[type, bool] = {}


def _reads_training(cls: type) -> bool:
    """Does any function of `cls` (its own classes, not nn.Module's) read an attribute named
    `training`? Cached per class."""
    if cls not in _training_readers:
        def codes(obj: Any):
            for f in (getattr(obj, "__func__", obj), getattr(obj, "fget", None)):
                if isinstance(f, types.FunctionType):
                    yield f.__code__

        def reads(code: types.CodeType) -> bool:
            return "training" in code.co_names or \
                any(isinstance(c, types.CodeType) and reads(c) for c in code.co_consts)

        _training_readers[cls] = any(reads(code) for k in cls.__mro__ if k not in (nn.Module, object)
                                     for v in vars(k).values() for code in codes(v))
    return _training_readers[cls]


def _forward_hooks_ok(modules: Iterable[nn.Module]) -> bool:
    """No forward hook that could issue ops: none global, per module only the mask's."""
    if _module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks:
        return False
    for m in modules:
        if m._forward_hooks or any(h is not _hold_masked_factors for h in m._forward_pre_hooks.values()):
            return False
    return True


class GraphCount:
    """profile.count of the traced model and of its slim copies, from the graph (see the
    module docstring). Made by `of`, which proves the graph countable."""

    def __init__(self, calls: list[tuple[str, Callable, fx.Node, fx.Node]], chans: dict[fx.Node, Any],
                 types_by_name: dict[str, type], slot_array: SlotArrays):
        self._calls = calls      # every rule module's call: (name, rule, input node, output node)
        self._chans = chans      # the slot walk's channel info per node
        self._types = types_by_name
        self._slot_array = slot_array  # the analysis's: its slot lists as index arrays

    @staticmethod
    def of(model: nn.Module, analysis: Any, modules: dict[str, nn.Module] | None = None) -> GraphCount | None:
        """A counter for `model`, or None when its graph holds anything whose count it cannot
        prove equal to profile.count's (the caller runs profile.count then). `modules`:
        dict(model.named_modules()) if the caller has it."""
        gm = analysis.graph
        mods = dict(model.named_modules()) if modules is None else modules
        if gm is None or not analysis.chans or not _forward_hooks_ok(mods.values()):
            return None
        calls, leaves = [], set()
        for node in gm.graph.nodes:
            op = node.op
            if op == "call_module":
                m = mods.get(node.target)
                rule = _module_rule(m) if m is not None else None
                leaves.add(node.target)
                if rule is None:
                    if type(m) not in _ZERO_MAC_MODULES:
                        return None
                    continue
                x = node.args[0] if node.args else None
                if rule not in _AGREES or node.kwargs or next(m.children(), None) is not None or \
                        node_shape(x) is None or node_shape(node) is None:
                    return None
                calls.append((node.target, rule, x, node))
            elif (op == "call_function" and node.target not in _ZERO_MAC_FUNCTIONS) or \
                    (op == "call_method" and node.target not in _ZERO_MAC_METHODS):
                return None
        for name, m in mods.items():
            if name in leaves:
                continue
            if _module_rule(m) is not None:  # traced through: profile.count would hook it
                return None
            if m.training and _reads_training(type(m)):  # traced on its training branch
                return None
        return GraphCount(calls, analysis.chans, {n: type(m) for n, m in mods.items()}, analysis.slot_array)

    def count(self, model: nn.Module, kept_slot: np.ndarray | None = None,
              modules: dict[str, nn.Module] | None = None) -> dict[str, int] | None:
        """profile.count(model, example_input) of the traced model (kept_slot None) or of a
        copy of it sliced to the slots where `kept_slot` is True, or None if that copy's
        modules or shapes do not agree with the graph (e.g. blocks removed). `modules`:
        dict(model.named_modules()) if the caller has it."""
        mods = dict(model.named_modules()) if modules is None else modules
        if mods.keys() != self._types.keys() or not _forward_hooks_ok(mods.values()):
            return None
        for name, m in mods.items():  # the forward the graph traced: the same classes (a BN may gather)
            if type(m) is not self._types[name] and not \
                    (isinstance(m, _BatchNorm) and issubclass(self._types[name], _BatchNorm)):
                return None
        macs = 0
        kept_widths: dict[int, int] = {}  # per ChannelInfo (passthrough ops share their input's)
        for name, rule, x_node, y_node in self._calls:
            m = mods[name]
            x, y = self._shape(x_node, kept_slot, kept_widths), self._shape(y_node, kept_slot, kept_widths)
            if x is None or y is None or _module_rule(m) is not rule or not _AGREES[rule](m, x, y):
                return None
            macs += int(rule(m, _Shape(x), _Shape(y)))
        return {"params": count_params(model, mods), "macs": macs, "flops": 2 * macs}

    def _shape(self, node: fx.Node, kept_slot: np.ndarray | None, kept_widths: dict[int, int]
               ) -> tuple[int, ...] | None:
        """`node`'s output shape in the model sliced to `kept_slot` (the traced one if None);
        kept_widths caches the kept width of each ChannelInfo (by id) for one count."""
        shape = node_shape(node)
        if kept_slot is None or shape is None:
            return shape
        info = self._chans.get(node)
        if len(shape) < 2 or not isinstance(info, ChannelInfo) or len(info.slots) * info.block != shape[1]:
            return None
        kept = kept_widths.get(id(info))
        if kept is None:
            kept = kept_widths[id(info)] = \
                int(np.count_nonzero(kept_slot[self._slot_array(info.slots)])) * info.block
        return (shape[0], kept, *shape[2:])
