"""Classic CNNs at CIFAR size (32x32, 10 classes), tiny widths, each from its paper.

Written for the engine's tests, not for accuracy: the structure (how channels flow,
where tensors are added, concatenated, grouped, gated) follows the published design;
the widths are cut down so one forward costs milliseconds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pool_linear(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """Global average pool, then the classifier: every zoo model's head."""
    return linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout))


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(*conv_bn(cin, cout, k, stride, groups), nn.ReLU(inplace=True))


class VGG(nn.Module):
    """Simonyan & Zisserman 2014, VGG-11 layout ('M' = 2x2 max-pool), BN after every conv."""

    def __init__(self, cfg=(8, "M", 16, "M", 16, 16, "M", 32, 32, "M", 32, 32, "M"), num_classes=10):
        super().__init__()
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [*conv_bn_relu(c, v)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """He et al. 2016: post-activation basic block, relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut)."""
    expansion = 1

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = conv_bn(cin, planes, 1, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """He et al. 2016: 1x1 reduce, 3x3, 1x1 expand (x4), post-activation add."""
    expansion = 4

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        out = planes * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, out, 1, bias=False), nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != out:
            self.shortcut = conv_bn(cin, out, 1, stride)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem, four stages (strides 1, 2, 2, 2), global pool, linear."""

    def __init__(self, block, num_blocks=(1, 1, 1, 1), widths=(8, 16, 32, 32), num_classes=10):
        super().__init__()
        self.stem = conv_bn_relu(3, widths[0])
        c, stages = widths[0], []
        for i, (n, w) in enumerate(zip(num_blocks, widths)):
            for b in range(n):
                stages.append(block(c, w, 2 if (b == 0 and i > 0) else 1))
                c = w * block.expansion
        self.layers = nn.Sequential(*stages)
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x):
        out = self.layers(self.stem(x))
        return pool_linear(out, self.linear)


class PreActBlock(nn.Module):
    """He et al. 2016b (identity mappings): BN-ReLU-conv twice, the shortcut reads the raw stream."""

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(planes), nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != planes:
            self.shortcut = nn.Conv2d(cin, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, num_blocks=(2, 1, 1), widths=(8, 16, 32), num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        c, blocks = widths[0], []
        for i, (n, w) in enumerate(zip(num_blocks, widths)):
            for b in range(n):
                blocks.append(PreActBlock(c, w, 2 if (b == 0 and i > 0) else 1))
                c = w
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return pool_linear(out, self.linear)


class DenseLayer(nn.Module):
    """Huang et al. 2017, DenseNet-BC layer: BN-ReLU-1x1 (4k) - BN-ReLU-3x3 (k), concatenated to x."""

    def __init__(self, cin, growth):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    """imagenet_stem: the 7x7/2 conv + 3x3/2 max-pool stem (DenseNet-121 at 224x224)."""

    def __init__(self, blocks=(2, 2, 2), growth=4, reduction=0.5, num_classes=10, imagenet_stem=False):
        super().__init__()
        c = 2 * growth
        self.conv1 = (nn.Sequential(nn.Conv2d(3, c, 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1)) if imagenet_stem
                      else nn.Conv2d(3, c, 3, 1, 1, bias=False))
        layers = []
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            if i < len(blocks) - 1:
                out = int(c * reduction)
                layers.append(Transition(c, out))
                c = out
        self.dense = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(c)
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.dense(self.conv1(x))))
        return pool_linear(out, self.linear)


class Inception(nn.Module):
    """Szegedy et al. 2015: 1x1 | 1x1-3x3 | 1x1-3x3-3x3 (the 5x5 as two 3x3s) | pool-1x1, concat."""

    def __init__(self, cin, n1, n3r, n3, n5r, n5, pool_planes):
        super().__init__()
        self.b1 = conv_bn_relu(cin, n1, 1)
        self.b2 = nn.Sequential(*conv_bn_relu(cin, n3r, 1), *conv_bn_relu(n3r, n3))
        self.b3 = nn.Sequential(*conv_bn_relu(cin, n5r, 1), *conv_bn_relu(n5r, n5), *conv_bn_relu(n5, n5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), *conv_bn_relu(cin, pool_planes, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.pre = conv_bn_relu(3, 16)
        self.a3 = Inception(16, 8, 8, 12, 4, 4, 4)       # -> 28
        self.b3 = Inception(28, 12, 8, 16, 4, 8, 8)      # -> 44
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.a4 = Inception(44, 16, 8, 16, 4, 8, 8)      # -> 48
        self.linear = nn.Linear(48, num_classes)

    def forward(self, x):
        out = self.b3(self.a3(self.pre(x)))
        out = self.a4(self.pool(out))
        return pool_linear(out, self.linear)


class ResNeXtBlock(nn.Module):
    """Xie et al. 2017: 1x1 -> grouped 3x3 (cardinality groups) -> 1x1, post-activation add."""

    def __init__(self, cin, cardinality, bottleneck_width, stride=1):
        super().__init__()
        gw = cardinality * bottleneck_width
        self.conv1, self.bn1 = nn.Conv2d(cin, gw, 1, bias=False), nn.BatchNorm2d(gw)
        self.conv2 = nn.Conv2d(gw, gw, 3, stride, 1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(gw)
        self.conv3, self.bn3 = nn.Conv2d(gw, 2 * gw, 1, bias=False), nn.BatchNorm2d(2 * gw)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != 2 * gw:
            self.shortcut = conv_bn(cin, 2 * gw, 1, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNeXt29(nn.Module):
    def __init__(self, num_blocks=(1, 1, 1), cardinality=4, bottleneck_width=2, num_classes=10):
        super().__init__()
        self.stem = conv_bn_relu(3, 16, 1)
        c, bw, blocks = 16, bottleneck_width, []
        for i, n in enumerate(num_blocks):
            for b in range(n):
                blocks.append(ResNeXtBlock(c, cardinality, bw, 2 if (b == 0 and i > 0) else 1))
                c = 2 * cardinality * bw
            bw *= 2
        self.layers = nn.Sequential(*blocks)
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x):
        out = self.layers(self.stem(x))
        return pool_linear(out, self.linear)


class SEBlock(nn.Module):
    """Hu et al. 2018 (SENet): a basic residual block whose branch is rescaled per channel by
    sigmoid(fc2(relu(fc1(avgpool x)))) (1x1 convs as the FC layers) before the add."""

    def __init__(self, cin, planes, stride=1, reduction=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
        self.fc1 = nn.Conv2d(planes, max(planes // reduction, 2), 1)
        self.fc2 = nn.Conv2d(max(planes // reduction, 2), planes, 1)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = conv_bn(cin, planes, 1, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        w = F.adaptive_avg_pool2d(out, 1)
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(w))))
        out = out * w
        return F.relu(out + self.shortcut(x))


class SENet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.layers = nn.Sequential(SEBlock(8, 8), SEBlock(8, 16, 2), SEBlock(16, 32, 2))
        self.linear = nn.Linear(32, num_classes)

    def forward(self, x):
        out = self.layers(self.stem(x))
        return pool_linear(out, self.linear)


class Root(nn.Module):
    """DLA's aggregation node: conv-BN-ReLU over the concatenation of its children."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)

    def forward(self, xs):
        return F.relu(self.bn(self.conv(torch.cat(xs, 1))))


class Tree(nn.Module):
    """Yu et al. 2018 (Deep Layer Aggregation), the CIFAR form: a binary tree whose two
    subtrees (residual blocks at level 1) are aggregated by a Root; level > 1 nests trees."""

    def __init__(self, cin, cout, level=1, stride=1):
        super().__init__()
        self.root = Root(2 * cout, cout)
        if level == 1:
            self.left, self.right = BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)
        else:
            self.left, self.right = Tree(cin, cout, level - 1, stride), Tree(cout, cout, level - 1, 1)

    def forward(self, x):
        o1 = self.left(x)
        return self.root([o1, self.right(o1)])


class DLA(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.base = conv_bn_relu(3, 8)
        self.layer1 = conv_bn_relu(8, 8)
        self.layer2 = Tree(8, 16, level=1, stride=2)
        self.layer3 = Tree(16, 16, level=2, stride=2)
        self.linear = nn.Linear(16, num_classes)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(self.base(x))))
        return pool_linear(out, self.linear)


class RepVGGBlock(nn.Module):
    """Ding et al. 2021, training-time form: relu(BN(3x3 x) + BN(1x1 x) + BN(x)), the identity
    branch only where the shape allows. Three BNs meet in one add: a large coupled group."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.dense = conv_bn(cin, cout, 3, stride)
        self.one = conv_bn(cin, cout, 1, stride)
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None

    def forward(self, x):
        out = self.dense(x) + self.one(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return F.relu(out)


class RepVGG(nn.Module):
    def __init__(self, widths=(8, 16, 16, 32), depths=(1, 2, 2, 1), num_classes=10):
        super().__init__()
        blocks, c = [], 3
        for w, d in zip(widths, depths):
            for i in range(d):
                blocks.append(RepVGGBlock(c, w, 2 if i == 0 else 1))
                c = w
        self.stages = nn.Sequential(*blocks)
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x):
        return pool_linear(self.stages(x), self.linear)


class DeepResidualStack(nn.Module):
    """A deep plain stack of 24 post-activation basic blocks at one width: one residual
    stream 25 BNs wide in a single coupled group (the p^k problem at its worst)."""

    def __init__(self, width=8, depth=24, num_classes=10):
        super().__init__()
        self.stem = conv_bn_relu(3, width)
        self.blocks = nn.Sequential(*[BasicBlock(width, width) for _ in range(depth)])
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x):
        out = self.blocks(self.stem(F.avg_pool2d(x, 4)))
        return pool_linear(out, self.linear)


ARCHS = {
    "vgg11": VGG,
    "resnet18-basic": lambda: ResNet(BasicBlock, (2, 1, 1, 1)),
    "resnet-bottleneck": lambda: ResNet(Bottleneck, (1, 2, 1, 1), (4, 8, 8, 16)),
    "preact-resnet": PreActResNet,
    "densenet-bc": DenseNet,
    "googlenet": GoogLeNet,
    "resnext29": ResNeXt29,
    "senet": SENet,
    "dla": DLA,
    "repvgg": RepVGG,
    "deep-residual-stack": DeepResidualStack,
}
