"""Mobile CNNs at CIFAR size, tiny widths, each from its paper: depthwise and grouped
convs, inverted residuals, squeeze-excitation gates, hard-swish, channel shuffles."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .classic import conv_bn, conv_bn_relu, pool_linear


class MobileNetV1(nn.Module):
    """Howard et al. 2017: depthwise 3x3 -> BN-ReLU -> pointwise 1x1 -> BN-ReLU, repeated."""

    def __init__(self, cfg=(16, (32, 2), 32, (64, 2), 64), num_classes=10):
        super().__init__()
        layers, c = [*conv_bn_relu(3, 8)], 8
        for v in cfg:
            out, stride = v if isinstance(v, tuple) else (v, 1)
            layers += [*conv_bn_relu(c, c, 3, stride, groups=c), *conv_bn_relu(c, out, 1)]
            c = out
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x):
        return pool_linear(self.features(x), self.linear)


class InvertedResidual(nn.Module):
    """Sandler et al. 2018: 1x1 expand -> ReLU6 -> depthwise 3x3 -> ReLU6 -> 1x1 project
    (linear bottleneck), added to the input when stride 1 and widths match."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers += [*conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True),
                   *conv_bn(hidden, cout, 1)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    # (expand t, out c, repeats n, stride s), the paper's table cut down
    CFG = ((1, 8, 1, 1), (4, 12, 2, 1), (4, 16, 2, 2), (4, 24, 2, 2))

    def __init__(self, num_classes=10):
        super().__init__()
        layers, c = [*conv_bn(3, 16), nn.ReLU6(inplace=True)], 16
        for t, out, n, s in self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        layers += [*conv_bn(c, 64, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        return pool_linear(self.features(x), self.linear)


class SqueezeExcite(nn.Module):
    """x * gate(fc2(act(fc1(avgpool x)))): the gate's 1x1 convs act as the FC layers."""

    def __init__(self, c, squeeze, act=nn.ReLU, gate=nn.Hardsigmoid):
        super().__init__()
        self.fc1, self.act = nn.Conv2d(c, squeeze, 1), act(inplace=True)
        self.fc2, self.gate = nn.Conv2d(squeeze, c, 1), gate()

    def forward(self, x):
        w = self.gate(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * w


class MobileV3Block(nn.Module):
    """Howard et al. 2019 (MobileNetV3) bneck: expand, depthwise, optional SE (hard-sigmoid),
    h-swish or ReLU, linear project, residual when shapes match."""

    def __init__(self, cin, hidden, cout, k, stride, use_se, hs):
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        self.use_res = stride == 1 and cin == cout
        layers = [] if hidden == cin else [*conv_bn(cin, hidden, 1), act()]
        layers += [*conv_bn(hidden, hidden, k, stride, groups=hidden), act()]
        if use_se:
            layers.append(SqueezeExcite(hidden, max(hidden // 4, 4)))
        layers += [*conv_bn(hidden, cout, 1)]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


class MobileNetV3Small(nn.Module):
    # (kernel, expanded, out, SE, h-swish, stride), the published "small" table cut down
    CFG = ((3, 8, 8, True, False, 2), (3, 24, 12, False, False, 2), (3, 32, 12, False, False, 1),
           (5, 48, 16, True, True, 2), (5, 64, 16, True, True, 1))

    def __init__(self, num_classes=10):
        super().__init__()
        layers, c = [*conv_bn(3, 8, 3, 1), nn.Hardswish()], 8
        for k, e, out, se, hs, s in self.CFG:
            layers.append(MobileV3Block(c, e, out, k, s, se, hs))
            c = out
        layers += [*conv_bn(c, 48, 1), nn.Hardswish()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(48, 64), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def shuffle_view_transpose(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Zhang et al. 2018: reshape to (N, g, C/g, H, W), swap the group axes, flatten back."""
    n, c, h, w = x.size()
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def shuffle_permute(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The same shuffle written with permute (as several public implementations do)."""
    n, c, h, w = x.size()
    return x.reshape(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class ShuffleV1Unit(nn.Module):
    """ShuffleNet v1 unit: grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1; stride 2
    concatenates an avg-pooled shortcut, stride 1 adds the input."""

    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        self.stride, self.groups = stride, groups
        mid = cout // 4
        out = cout - cin if stride == 2 else cout
        g1 = 1 if cin == 8 else groups  # the paper keeps the first 1x1 ungrouped (narrow input)
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, groups=g1, bias=False), nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, out, 1, groups=groups, bias=False), nn.BatchNorm2d(out)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = shuffle_view_transpose(out, self.groups)
        out = self.bn2(self.conv2(out))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    def __init__(self, groups=2, num_classes=10):
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.layers = nn.Sequential(ShuffleV1Unit(8, 24, 2, groups), ShuffleV1Unit(24, 24, 1, groups),
                                    ShuffleV1Unit(24, 48, 2, groups), ShuffleV1Unit(48, 48, 1, groups))
        self.linear = nn.Linear(48, num_classes)

    def forward(self, x):
        return pool_linear(self.layers(self.stem(x)), self.linear)


class ShuffleV2Unit(nn.Module):
    """Ma et al. 2018 (ShuffleNet v2): stride 1 splits the channels in half, transforms one
    half (1x1, dw 3x3, 1x1), concatenates and shuffles; stride 2 transforms both copies."""

    def __init__(self, cin, cout, stride, shuffle):
        super().__init__()
        self.stride, self.shuffle = stride, shuffle
        branch = cout // 2
        if stride == 2:
            self.left = nn.Sequential(*conv_bn(cin, cin, 3, 2, groups=cin), *conv_bn_relu(cin, branch, 1))
        bin_ = cin if stride == 2 else branch
        self.right = nn.Sequential(*conv_bn_relu(bin_, branch, 1), *conv_bn(branch, branch, 3, stride, groups=branch),
                                   *conv_bn_relu(branch, branch, 1))

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.right(b)], 1)
        else:
            out = torch.cat([self.left(x), self.right(x)], 1)
        return self.shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, shuffle=shuffle_view_transpose, num_classes=10):
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.layers = nn.Sequential(ShuffleV2Unit(8, 16, 2, shuffle), ShuffleV2Unit(16, 16, 1, shuffle),
                                    ShuffleV2Unit(16, 32, 2, shuffle), ShuffleV2Unit(32, 32, 1, shuffle))
        self.conv_last = conv_bn_relu(32, 64, 1)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        return pool_linear(self.conv_last(self.layers(self.stem(x))), self.linear)


class SwishSE(nn.Module):
    """EfficientNet's SE: reduce to in/4 (of the block's input width), SiLU, expand, sigmoid."""

    def __init__(self, c, squeeze):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = self.reduce(s)
        s = s * s.sigmoid()            # hand-written SiLU, as the original TF port does
        return x * self.expand(s).sigmoid()


class MBConv(nn.Module):
    """Tan & Le 2019 (EfficientNet-B0): expand 1x1 -> dw kxk -> SE -> project 1x1, swish
    written as x * x.sigmoid(), identity skip when shapes match."""

    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self.expand_conv, self.bn0 = nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden)
        self.dw, self.bn1 = nn.Conv2d(hidden, hidden, k, stride, k // 2, groups=hidden, bias=False), nn.BatchNorm2d(hidden)
        self.se = SwishSE(hidden, max(1, cin // 4))
        self.project, self.bn2 = nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        out = x
        if self.has_expand:
            out = self.bn0(self.expand_conv(out))
            out = out * out.sigmoid()
        out = self.bn1(self.dw(out))
        out = out * out.sigmoid()
        out = self.se(out)
        out = self.bn2(self.project(out))
        return out + x if self.skip else out


class EfficientNetB0(nn.Module):
    # (expand, kernel, out, repeats, stride): B0's table cut down
    CFG = ((1, 3, 8, 1, 1), (6, 3, 12, 2, 2), (6, 5, 16, 2, 2), (6, 3, 24, 1, 2))

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem, self.bn_stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        blocks, c = [], 16
        for e, k, out, n, s in self.CFG:
            for i in range(n):
                blocks.append(MBConv(c, out, k, s if i == 0 else 1, e))
                c = out
        self.blocks = nn.Sequential(*blocks)
        self.head, self.bn_head = nn.Conv2d(c, 64, 1, bias=False), nn.BatchNorm2d(64)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.bn_stem(self.stem(x))
        x = x * x.sigmoid()
        x = self.blocks(x)
        x = self.bn_head(self.head(x))
        x = x * x.sigmoid()
        return pool_linear(x, self.linear)


class GhostModule(nn.Module):
    """Han et al. 2020: a primary 1x1 makes half the outputs, a cheap depthwise 3x3 makes the
    other half from them ("ghost" features), concatenated and cut to `cout`."""

    def __init__(self, cin, cout, relu=True):
        super().__init__()
        self.cout = cout
        init = -(-cout // 2)
        act = [nn.ReLU(inplace=True)] if relu else []
        self.primary = nn.Sequential(*conv_bn(cin, init, 1), *act)
        self.cheap = nn.Sequential(*conv_bn(init, init, 3, 1, groups=init), *act)

    def forward(self, x):
        x1 = self.primary(x)
        x2 = self.cheap(x1)
        return torch.cat([x1, x2], 1)[:, :self.cout]  # the published code's cut (odd cout)


class GhostBottleneck(nn.Module):
    def __init__(self, cin, mid, cout, stride, use_se):
        super().__init__()
        self.ghost1 = GhostModule(cin, mid)
        self.dw = conv_bn(mid, mid, 3, stride, groups=mid) if stride > 1 else None
        self.se = SqueezeExcite(mid, max(mid // 4, 4), gate=nn.Sigmoid) if use_se else None
        self.ghost2 = GhostModule(mid, cout, relu=False)
        if stride == 1 and cin == cout:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(*conv_bn(cin, cin, 3, stride, groups=cin), *conv_bn(cin, cout, 1))

    def forward(self, x):
        y = self.ghost1(x)
        if self.dw is not None:
            y = self.dw(y)
        if self.se is not None:
            y = self.se(y)
        return self.ghost2(y) + self.shortcut(x)


class GhostNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.blocks = nn.Sequential(GhostBottleneck(8, 16, 8, 1, False), GhostBottleneck(8, 24, 12, 2, False),
                                    GhostBottleneck(12, 36, 12, 1, True), GhostBottleneck(12, 48, 20, 2, True))
        self.head = conv_bn_relu(20, 64, 1)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        return pool_linear(self.head(self.blocks(self.stem(x))), self.linear)


ARCHS = {
    "mobilenet-v1": MobileNetV1,
    "mobilenet-v2": MobileNetV2,
    "mobilenet-v3-small": MobileNetV3Small,
    "shufflenet-v1": ShuffleNetV1,
    "shufflenet-v2": ShuffleNetV2,
    "shufflenet-v2-permute": lambda: ShuffleNetV2(shuffle_permute),
    "efficientnet-b0": EfficientNetB0,
    "ghostnet": GhostNet,
}
