"""What each op does to channels: one rule per op, for module, function and method forms.

A rule is data (`Rule`). Its `kind` names the step the slot walk runs for the op
(slots.py: `MODULE_STEPS` for modules, `CALL_STEPS` for functions and methods); for a module
with per-channel weights that step records a use whose kind says how `apply_plan` slices it
(slim.py, `SLICERS`). The built-in ops are registered below the same way a user registers a module
type of their own:

    netslim.register_module(LearnedLeaky, netslim.rules.channelwise(params=("slope",)))

Rules a user may register: `passthrough()`, `channelwise(params, dim)`, `keeps_channels(why)`.
An op without a rule on a BatchNorm's channel path is an error naming the op and the ways
out (exclude, or register_module), never a guess.

"Zero-preserving" matters: a pruned (masked) channel is all zeros, and the slim model
simply drops it, so every op between a BN and the next conv must map 0 to 0.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """How one op treats channels. Build one with the functions below, not directly."""
    kind: str
    params: tuple[str, ...] = ()   # channelwise: per-channel parameters / buffers to slice
    dim: int = 0                   # channelwise: their dimension that holds the channels
    reason: str = ""               # keeps_channels, nonzero: why (reads after the op's name)


def passthrough() -> Rule:
    """Keeps every channel in place and maps 0 to 0, with no per-channel weights
    (an activation, a pooling, a dropout)."""
    return Rule("passthrough")


def channelwise(params: Sequence[str] = (), dim: int = 0) -> Rule:
    """Output channel j is computed from input channel j alone, with per-channel parameters
    or buffers `params` (their `dim` holds the channels; they are sliced with them).

    Before trusting it the engine runs the module once on zeros: a channel it maps 0 to a
    non-zero value (a shift) keeps its width, so the slim model still equals the masked one.
    """
    if isinstance(params, str):
        params = (params,)
    if not all(isinstance(p, str) and p for p in params) or not isinstance(dim, int) or isinstance(dim, bool):
        raise ConfigError(f"channelwise(params=...) takes attribute names and an integer dim, got "
                          f"params={params!r}, dim={dim!r}")
    return Rule("channelwise", params=tuple(params), dim=dim)


def keeps_channels(reason: str = "keeps its channels") -> Rule:
    """Its input and output channels keep their width (it mixes them, or is simply not to be
    sliced). The BatchNorms whose channels reach it are left unpruned and the report says
    `reason`; everything else is pruned as usual."""
    if not isinstance(reason, str) or not reason.strip():
        raise ConfigError(f"keeps_channels(reason) takes a non-empty string, got {reason!r}")
    return Rule("keeps_channels", reason=reason.strip())


# Kinds a user may register for a module type (the others need netslim's own module code).
USER_KINDS = ("passthrough", "channelwise", "keeps_channels")

MODULE_RULES: dict[type, Rule] = {}
FUNCTION_RULES: dict[Callable, Rule] = {}
METHOD_RULES: dict[str, Rule] = {}
_USER_MODULES: set[type] = set()   # registered by a user: traced as one call (a leaf)


def register_module(cls: type, rule: Rule) -> None:
    """Tell netslim what module type `cls` does with channels; it (and its subclasses) is
    then traced as one call and handled by `rule` wherever it sits on a channel path:

        netslim.register_module(LearnedLeaky, netslim.rules.channelwise(params=("slope",)))
        netslim.register_module(MyActivation, netslim.rules.passthrough())
        netslim.register_module(ChannelMixer, netslim.rules.keeps_channels("mixes channels"))

    Register before pruning, and before loading a checkpoint of a model that contains it
    (loading re-applies the plan through the same analysis). A later registration replaces
    an earlier one.
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ConfigError(f"register_module takes an nn.Module subclass, got {cls!r}")
    if not isinstance(rule, Rule) or rule.kind not in USER_KINDS:
        raise ConfigError(f"register_module takes a rule from netslim.rules "
                          f"({', '.join(k + '()' for k in USER_KINDS)}), got {rule!r}")
    MODULE_RULES[cls] = rule
    _USER_MODULES.add(cls)


def module_rule(m: nn.Module) -> Rule | None:
    """The rule of `m`'s class or of its nearest base class that has one."""
    return next((MODULE_RULES[c] for c in type(m).__mro__ if c in MODULE_RULES), None)


def function_rule(fn: Any) -> Rule | None:
    try:
        return FUNCTION_RULES.get(fn)
    except TypeError:  # an unhashable target
        return None


def method_rule(name: str) -> Rule | None:
    return METHOD_RULES.get(name)


def is_registered_leaf(m: nn.Module) -> bool:
    """Registered by a user: the tracer records one call instead of tracing its forward."""
    return bool(_USER_MODULES) and any(c in _USER_MODULES for c in type(m).__mro__)


# ----------------------------------------------------------------------------------------
# The built-in rules

def _nonzero() -> Rule:
    """Channel-wise but f(0) != 0 (sigmoid): fine as a gate of a product, else it keeps channels."""
    return Rule("nonzero", reason="maps 0 to a non-zero value")


def _builtin(kind: str, reason: str = "") -> Rule:
    return Rule(kind, reason=reason)


def _add(table: dict, ops: Iterable, rule: Rule) -> None:
    for op in ops:
        table[op] = rule


# Zero-preserving, channel-wise, no weights. AlphaDropout maps 0 to non-zero values in
# training only; the invariant (slim == masked) is about eval, where every dropout is the identity.
PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.RReLU,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
)
NONZERO_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid)
# Norms whose statistics span several channels: their inputs and outputs keep their width.
CHANNEL_MIXING_NORMS = (nn.GroupNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d)

_add(MODULE_RULES, (nn.Conv1d, nn.Conv2d, nn.Conv3d), _builtin("conv"))
_add(MODULE_RULES, (nn.Linear,), _builtin("linear"))
_add(MODULE_RULES, (_BatchNorm,), _builtin("batchnorm"))
_add(MODULE_RULES, (_InstanceNorm,), _builtin("instancenorm"))
_add(MODULE_RULES, (nn.LayerNorm,), _builtin("layernorm"))
_add(MODULE_RULES, (nn.Flatten,), _builtin("flatten"))
_add(MODULE_RULES, (nn.PReLU,), channelwise(params=("weight",)))
_add(MODULE_RULES, CHANNEL_MIXING_NORMS, keeps_channels("normalises across channels"))
_add(MODULE_RULES, PASS_MODULES, passthrough())
_add(MODULE_RULES, NONZERO_MODULES, _nonzero())

PASS_FUNCTIONS = (
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu, F.gelu,
    F.silu, F.mish, F.hardswish, F.hardtanh, torch.tanh, F.tanh, F.softsign,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
    torch.clone, torch.Tensor.contiguous,
)
NONZERO_FUNCTIONS = (torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, torch.exp)
CHANNEL_MIXING_FUNCTIONS = (F.batch_norm, F.instance_norm, F.group_norm, F.layer_norm,
                            F.local_response_norm, F.normalize)

_add(FUNCTION_RULES, PASS_FUNCTIONS, passthrough())
_add(FUNCTION_RULES, NONZERO_FUNCTIONS, _nonzero())
# functional norms: their weights come as tensors netslim does not slice
_add(FUNCTION_RULES, CHANNEL_MIXING_FUNCTIONS, keeps_channels("normalises with tensors netslim does not slice"))
_add(FUNCTION_RULES, (operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub),
     _builtin("add"))
_add(FUNCTION_RULES, (operator.mul, operator.imul, torch.mul), _builtin("mul"))
_add(FUNCTION_RULES, (operator.truediv, operator.itruediv, torch.div), _builtin("div"))
_add(FUNCTION_RULES, (torch.cat, torch.concat), _builtin("cat"))
_add(FUNCTION_RULES, (torch.flatten,), _builtin("flatten"))
_add(FUNCTION_RULES, (torch.mean, torch.sum, torch.amax, torch.amin), _builtin("reduce"))
_add(FUNCTION_RULES, (operator.getitem,), _builtin("getitem"))
_add(FUNCTION_RULES, (torch.split, torch.chunk), _builtin("split"))

PASS_METHODS = ("relu", "relu_", "contiguous", "clone", "detach", "float", "half", "bfloat16",
                "double", "to", "tanh", "tanh_")
NONZERO_METHODS = ("sigmoid", "sigmoid_", "exp")

_add(METHOD_RULES, PASS_METHODS, passthrough())
_add(METHOD_RULES, NONZERO_METHODS, _nonzero())
_add(METHOD_RULES, ("add", "add_", "sub", "sub_"), _builtin("add"))
_add(METHOD_RULES, ("mul", "mul_"), _builtin("mul"))
_add(METHOD_RULES, ("div", "div_"), _builtin("div"))
_add(METHOD_RULES, ("mean", "sum", "amax", "amin"), _builtin("reduce"))
_add(METHOD_RULES, ("view", "reshape", "flatten"), _builtin("reshape"))
_add(METHOD_RULES, ("split", "chunk"), _builtin("split"))

# What netslim itself knows, before any user registration (tests/test_engine_ops.py covers each).
BUILTIN_MODULE_RULES = dict(MODULE_RULES)
