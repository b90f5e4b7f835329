"""Network Slimming of a YOLOv8-style detector inside your own training loop.

    python examples/detector_own_loop.py [--steps 300] [--percent 0.5]

The detector is written from YOLOv8's published description, scaled down: Conv-BN-SiLU
blocks, C2f (`y = list(self.cv1(x).chunk(2, 1)); y.extend(m(y[-1]) for m in self.m)`),
SPPF, nearest upsampling and concatenation across scales (a PAN neck), and a decoupled
head per scale (box and class branches), returned as a list of three maps. The task is
synthetic: one bright square or cross per 64x64 image; the stride-8 map predicts, at the
cell holding the object's centre, its class and its box.

The loop is the user's: netslim contributes one line during training (`bn_l1_` after
`backward`), `prune`, and a check that the slim detector computes what the masked one
does. The heads' final convs are model outputs, so their widths never change.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import netslim


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm -> SiLU: YOLOv8's basic block."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool):
        super().__init__()
        self.cv1, self.cv2 = Conv(c, c, 3), Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """Split cv1's output in two, run bottlenecks on the last part, concatenate every part."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools, all four maps concatenated."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1, self.cv2 = Conv(c1, c_, 1), Conv(4 * c_, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class DetectHead(nn.Module):
    """Decoupled head per scale: a box branch (4 numbers) and a class branch (nc logits)."""

    def __init__(self, nc: int, channels: tuple[int, ...], hidden: int = 16):
        super().__init__()
        self.box = nn.ModuleList(nn.Sequential(Conv(c, hidden, 3), Conv(hidden, hidden, 3), nn.Conv2d(hidden, 4, 1))
                                 for c in channels)
        self.cls = nn.ModuleList(nn.Sequential(Conv(c, hidden, 3), Conv(hidden, hidden, 3), nn.Conv2d(hidden, nc, 1))
                                 for c in channels)

    def forward(self, feats):
        return [torch.cat([b(x), c(x)], 1) for x, b, c in zip(feats, self.box, self.cls)]


class TinyYOLO(nn.Module):
    """Backbone (P3/8, P4/16, P5/32) -> SPPF -> PAN neck -> three-scale decoupled head."""

    def __init__(self, nc: int = 2, w: int = 8):
        super().__init__()
        self.b0, self.b1 = Conv(3, w, 3, 2), Conv(w, 2 * w, 3, 2)
        self.b2 = C2f(2 * w, 2 * w, 1, True)
        self.b3, self.b4 = Conv(2 * w, 4 * w, 3, 2), C2f(4 * w, 4 * w, 2, True)          # P3
        self.b5, self.b6 = Conv(4 * w, 8 * w, 3, 2), C2f(8 * w, 8 * w, 2, True)          # P4
        self.b7, self.b8 = Conv(8 * w, 8 * w, 3, 2), C2f(8 * w, 8 * w, 1, True)          # P5
        self.sppf = SPPF(8 * w, 8 * w)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n1 = C2f(16 * w, 8 * w)          # P5 up + P4
        self.n2 = C2f(12 * w, 4 * w)          # up + P3 -> out P3
        self.d1, self.n3 = Conv(4 * w, 4 * w, 3, 2), C2f(12 * w, 8 * w)   # -> out P4
        self.d2, self.n4 = Conv(8 * w, 8 * w, 3, 2), C2f(16 * w, 8 * w)   # -> out P5
        self.head = DetectHead(nc, (4 * w, 8 * w, 8 * w))

    def forward(self, x):
        p3 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
        p4 = self.b6(self.b5(p3))
        p5 = self.sppf(self.b8(self.b7(p4)))
        t4 = self.n1(torch.cat([self.up(p5), p4], 1))
        o3 = self.n2(torch.cat([self.up(t4), p3], 1))
        o4 = self.n3(torch.cat([self.d1(o3), t4], 1))
        o5 = self.n4(torch.cat([self.d2(o4), p5], 1))
        return self.head([o3, o4, o5])


# ---------------------------------------------------------------------------------------
# A synthetic detection task

def make_batch(n: int, gen: torch.Generator, size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images with one object each: class 0 a filled square, class 1 a cross.
    Returns images [n, 3, size, size], classes [n], boxes [n, 4] (cx, cy, w, h in pixels)."""
    x = 0.1 * torch.randn(n, 3, size, size, generator=gen)
    cls = torch.randint(0, 2, (n,), generator=gen)
    half = torch.randint(4, 10, (n,), generator=gen)
    cx = torch.randint(10, size - 10, (n,), generator=gen)
    cy = torch.randint(10, size - 10, (n,), generator=gen)
    for i in range(n):
        h, u, v = int(half[i]), int(cx[i]), int(cy[i])
        if cls[i] == 0:
            x[i, :, v - h:v + h, u - h:u + h] += 1.0
        else:
            x[i, :, v - 1:v + 2, u - h:u + h] += 1.0
            x[i, :, v - h:v + h, u - 1:u + 2] += 1.0
    boxes = torch.stack([cx, cy, 2 * half, 2 * half], 1).float()
    return x, cls, boxes


def detection_loss(outputs: list[torch.Tensor], cls: torch.Tensor, boxes: torch.Tensor, stride: int = 8):
    """On the stride-8 map: class BCE everywhere (1 at the centre cell), L1 box at the centre cell."""
    p3 = outputs[0]                                  # [n, 4 + nc, H, W]
    n, _, h, w = p3.shape
    gx = (boxes[:, 0] / stride).long().clamp(0, w - 1)
    gy = (boxes[:, 1] / stride).long().clamp(0, h - 1)
    target = torch.zeros_like(p3[:, 4:])
    target[torch.arange(n), cls, gy, gx] = 1.0
    cls_loss = F.binary_cross_entropy_with_logits(p3[:, 4:], target, reduction="sum") / n
    box_target = torch.stack([boxes[:, 0] / stride - gx, boxes[:, 1] / stride - gy,
                              boxes[:, 2] / stride, boxes[:, 3] / stride], 1)
    box_loss = F.l1_loss(p3[torch.arange(n), :4, gy, gx], box_target)
    return cls_loss + box_loss, gx, gy


@torch.no_grad()
def accuracy(model: nn.Module, x, cls, boxes, stride: int = 8) -> float:
    """Share of images whose most confident (cell, class) is the object's cell and class."""
    p3 = model.eval()(x)[0][:, 4:]
    n, nc, h, w = p3.shape
    best = p3.flatten(1).argmax(1)
    pred_cls, cell = best // (h * w), best % (h * w)
    gx = (boxes[:, 0] / stride).long().clamp(0, w - 1)
    gy = (boxes[:, 1] / stride).long().clamp(0, h - 1)
    return float(((pred_cls == cls) & (cell == gy * w + gx)).float().mean()) * 100


def train(model: nn.Module, steps: int, gen: torch.Generator, lr: float, sparsity: float = 0.0,
          batch: int = 16) -> float:
    """The user's own loop; netslim adds one line (bn_l1_) for sparsity training."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        x, cls, boxes = make_batch(batch, gen)
        loss, _, _ = detection_loss(model(x), cls, boxes)
        opt.zero_grad()
        loss.backward()
        if sparsity:
            netslim.bn_l1_(model, sparsity)     # Network Slimming's L1 on the BN factors
        opt.step()
        sched.step()
    return float(loss.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="sparsity-training steps (fine-tuning: half)")
    ap.add_argument("--percent", type=float, default=0.5)
    ap.add_argument("--s", type=float, default=1e-3, help="sparsity strength")
    args = ap.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    test = make_batch(128, torch.Generator().manual_seed(1))

    model = TinyYOLO()
    loss = train(model, args.steps, gen, lr=0.05, sparsity=args.s)
    print(f"sparsity training: loss {loss:.3f}, top-1 at the centre cell {accuracy(model, *test):.1f}%")

    example = test[0][:1]
    slim, report = netslim.prune(model, args.percent, example_input=example)
    masked, _ = netslim.prune(model, args.percent, mode="mask", example_input=example)
    with torch.no_grad():
        gap = max(float((a - b).abs().max()) for a, b in zip(slim.eval()(test[0]), masked.eval()(test[0])))
    b, a = report["before"], report["after"]
    print(f"pruned {report['removed_share']:.1%} of BN channels: params {b['params']:,} -> {a['params']:,}, "
          f"FLOPs {b['flops']:,} -> {a['flops']:,}; slim vs masked: max |difference| {gap:.2e}")
    heads = [m.out_channels for m in slim.head.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    print(f"head output channels: {heads}")
    print(f"right after pruning: top-1 {accuracy(slim, *test):.1f}%")
    loss = train(slim, max(args.steps // 2, 1), gen, lr=0.02)
    print(f"fine-tuned: loss {loss:.3f}, top-1 {accuracy(slim, *test):.1f}%")


if __name__ == "__main__":
    main()
