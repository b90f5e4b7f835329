"""More CNNs at CIFAR size, tiny widths, each from its paper: RegNet X/Y, dual-path
networks (slicing, add + concat), PNASNet cells, ConvNeXt-style layer scale, and a model
with a submodule torch.fx cannot trace."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .classic import BasicBlock, conv_bn, conv_bn_relu, pool_linear
from .mobile import SqueezeExcite


class RegNetBlock(nn.Module):
    """Radosavovic et al. 2020: X block = 1x1, grouped 3x3 (group width gw), 1x1, residual;
    the Y block adds SE (reduction w.r.t. the block's input width) after the 3x3."""

    def __init__(self, cin, cout, stride, group_width, se_ratio=0.0):
        super().__init__()
        groups = cout // group_width
        self.a = conv_bn_relu(cin, cout, 1)
        self.b = conv_bn_relu(cout, cout, 3, stride, groups=groups)
        self.se = SqueezeExcite(cout, max(1, int(cin * se_ratio)), gate=nn.Sigmoid) if se_ratio else None
        self.c = conv_bn(cout, cout, 1)
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        y = self.b(self.a(x))
        if self.se is not None:
            y = self.se(y)
        y = self.c(y)
        return F.relu(y + (self.shortcut(x) if self.shortcut is not None else x))


class RegNet(nn.Module):
    def __init__(self, se_ratio=0.0, depths=(1, 2, 2), widths=(8, 16, 32), group_width=4, num_classes=10):
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        blocks, c = [], 8
        for i, (d, w) in enumerate(zip(depths, widths)):
            for j in range(d):
                blocks.append(RegNetBlock(c, w, 2 if (j == 0 and i > 0) else 1, group_width, se_ratio))
                c = w
        self.stages = nn.Sequential(*blocks)
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x):
        return pool_linear(self.stages(self.stem(x)), self.linear)


class DualPathBlock(nn.Module):
    """Chen et al. 2017 (DPN): 1x1 -> grouped 3x3 -> 1x1 producing out + dense channels; the
    first `out_planes` are added to the residual path, the rest concatenated to the dense
    path, both cut with x[:, :d] / x[:, d:]."""

    def __init__(self, last_planes, in_planes, out_planes, dense_depth, stride, first):
        super().__init__()
        self.out_planes, self.dense_depth = out_planes, dense_depth
        self.conv1 = conv_bn_relu(last_planes, in_planes, 1)
        self.conv2 = conv_bn_relu(in_planes, in_planes, 3, stride, groups=4)
        self.conv3 = conv_bn(in_planes, out_planes + dense_depth, 1)
        self.shortcut = conv_bn(last_planes, out_planes + dense_depth, 1, stride) if first else None

    def forward(self, x):
        out = self.conv3(self.conv2(self.conv1(x)))
        x = self.shortcut(x) if self.shortcut is not None else x
        d = self.out_planes
        out = torch.cat([x[:, :d] + out[:, :d], x[:, d:], out[:, d:]], 1)
        return F.relu(out)


class DPN(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn_relu(3, 16)
        in_planes, out_planes, num_blocks, dense_depth = (8, 16), (16, 32), (2, 2), (4, 8)
        blocks, last = [], 16
        for i in range(2):
            for j in range(num_blocks[i]):
                blocks.append(DualPathBlock(last, in_planes[i], out_planes[i], dense_depth[i],
                                            2 if (i > 0 and j == 0) else 1, j == 0))
                last = out_planes[i] + (j + 2) * dense_depth[i]
        self.layers = nn.Sequential(*blocks)
        self.linear = nn.Linear(last, num_classes)

    def forward(self, x):
        return pool_linear(self.layers(self.stem(x)), self.linear)


class SepConv(nn.Module):
    """PNASNet's separable conv: depthwise kxk (stride) -> pointwise 1x1 -> BN."""

    def __init__(self, cin, cout, k, stride):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, k, stride, k // 2, groups=cin, bias=False)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.pw(self.dw(x)))


class CellA(nn.Module):
    """Liu et al. 2018 (PNASNet-A cell): sep 7x7 + max-pool 3x3 (projected when strided)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        self.sep = SepConv(cin, cout, 7, stride)
        if stride == 2:
            self.proj = conv_bn(cin, cout, 1)

    def forward(self, x):
        y1 = self.sep(x)
        y2 = F.max_pool2d(x, 3, self.stride, 1)
        if self.stride == 2:
            y2 = self.proj(y2)
        return F.relu(y1 + y2)


class CellB(nn.Module):
    """PNASNet-B cell: two sums of sep convs and a pool, concatenated, reduced by 1x1."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        self.sep1, self.sep2 = SepConv(cin, cout, 7, stride), SepConv(cin, cout, 3, stride)
        self.sep3 = SepConv(cin, cout, 5, stride)
        if stride == 2:
            self.proj = conv_bn(cin, cout, 1)
        self.reduce = conv_bn(2 * cout, cout, 1)

    def forward(self, x):
        y1, y2 = self.sep1(x), self.sep2(x)
        y3 = F.max_pool2d(x, 3, self.stride, 1)
        if self.stride == 2:
            y3 = self.proj(y3)
        y4 = self.sep3(x)
        b1, b2 = F.relu(y1 + y2), F.relu(y3 + y4)
        return F.relu(self.reduce(torch.cat([b1, b2], 1)))


class PNASNet(nn.Module):
    def __init__(self, cell, num_classes=10):
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.cells = nn.Sequential(cell(8, 8, 1), cell(8, 16, 2), cell(16, 16, 1), cell(16, 32, 2))
        self.linear = nn.Linear(32, num_classes)

    def forward(self, x):
        return pool_linear(self.cells(self.stem(x)), self.linear)


class ConvNeXtBlock(nn.Module):
    """Liu et al. 2022: depthwise 7x7 -> norm -> 1x1 (4x) -> GELU -> 1x1 -> layer scale
    gamma (a per-channel parameter, init 1e-6 in the paper) -> residual add. BN stands in
    for LayerNorm so the channels have scaling factors to slim."""

    def __init__(self, c, layer_scale=0.5):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, 1, 3, groups=c)
        self.norm = nn.BatchNorm2d(c)
        self.pw1, self.act, self.pw2 = nn.Conv2d(c, 4 * c, 1), nn.GELU(), nn.Conv2d(4 * c, c, 1)
        self.gamma = nn.Parameter(layer_scale * torch.ones(c))

    def forward(self, x):
        y = self.pw2(self.act(self.pw1(self.norm(self.dw(x)))))
        return x + self.gamma.view(1, -1, 1, 1) * y


class ConvNeXt(nn.Module):
    def __init__(self, widths=(8, 16, 32), num_classes=10):
        super().__init__()
        layers, c = [], 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 2 if i else 4, 2 if i else 4), nn.BatchNorm2d(w), ConvNeXtBlock(w)]
            c = w
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x):
        return pool_linear(self.features(x), self.linear)


class RatioSplitBlock(nn.Module):
    """A split block whose split point is computed in Python from the input's width, which
    torch.fx cannot trace (int() of a traced size): `int(x.size(1) * ratio)`."""

    def __init__(self, c, ratio=0.5):
        super().__init__()
        self.ratio = ratio
        left = int(c * ratio)
        self.branch = conv_bn_relu(c - left, c - left)

    def forward(self, x):
        left = int(x.size(1) * self.ratio)
        a, b = x[:, :left], x[:, left:]
        return torch.cat([a, self.branch(b)], 1)


class UntraceableNet(nn.Module):
    """Ordinary conv-BN layers around one RatioSplitBlock."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.head = nn.Sequential(*conv_bn_relu(3, 16), *conv_bn_relu(16, 16, 3, 2))
        self.block = RatioSplitBlock(16)
        self.tail = nn.Sequential(*conv_bn_relu(16, 32, 3, 2), BasicBlock(32, 32))
        self.linear = nn.Linear(32, num_classes)

    def forward(self, x):
        return pool_linear(self.tail(self.block(self.head(x))), self.linear)


ARCHS = {
    "regnetx": RegNet,
    "regnety": lambda: RegNet(se_ratio=0.25),
    "dpn": DPN,
    "pnasnet-a": lambda: PNASNet(CellA),
    "pnasnet-b": lambda: PNASNet(CellB),
    "convnext-bn": ConvNeXt,
    "untraceable-submodule": UntraceableNet,
}
