"""What each op does to channels: the tables the slot walk (slots.py) dispatches on.

"Zero-preserving" matters: a pruned (masked) channel is all zeros, and the slim model
simply drops it, so every op between a BN and the next conv must map 0 to 0.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

_PASS_MODULES = (
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
# AlphaDropout maps 0 to non-zero values in training only; the invariant (slim == masked)
# is about eval, where every dropout is the identity.
# Channel-preserving but f(0) != 0: a masked channel would not stay zero behind them.
_NONZERO_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid)

_PASS_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu, F.gelu,
    F.silu, F.mish, F.hardswish, F.hardtanh, torch.tanh, F.tanh, F.softsign,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
    torch.clone, torch.Tensor.contiguous,
}
_PASS_METHODS = {"relu", "relu_", "contiguous", "clone", "detach", "float", "half", "bfloat16",
                 "double", "to", "tanh", "tanh_"}
# Norms whose statistics span several channels: their inputs and outputs keep their width.
_CHANNEL_MIXING_NORMS = (nn.GroupNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d)
_CHANNEL_MIXING_FUNCTIONS = {F.batch_norm, F.instance_norm, F.group_norm, F.layer_norm,
                             F.local_response_norm, F.normalize}
_NONZERO_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, torch.exp}
_NONZERO_METHODS = {"sigmoid", "sigmoid_", "exp"}

_ADD_OPS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_MUL_OPS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_"}
_DIV_OPS = {operator.truediv, operator.itruediv, torch.div}
_DIV_METHODS = {"div", "div_"}
_CAT_OPS = {torch.cat, torch.concat}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_SPLIT_FUNCTIONS = {torch.split, torch.chunk}
_SPLIT_METHODS = {"split", "chunk"}
