"""Network Slimming of a CNN netslim has never seen, through the library API, on Fashion-MNIST.

    python examples/slim_your_own_cnn.py [--epochs 3] [--percent 0.5] [--save runs/own-cnn]

The model below is written the way users write theirs: ShuffleNet-v2-style units (half of
the channels through a branch with a grouped conv, `x.chunk(2, dim=1)`, `torch.cat`), a
post-activation residual add, functional calls in `forward`. Nothing in netslim knows it;
the engine traces it and works out what each BatchNorm's channels are tied to.

Steps: train with the L1 penalty on BN factors -> prune with one global threshold ->
check the slim model against the masked one -> fine-tune -> report widths, top-1,
params and FLOPs at every stage.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

import netslim


class Unit(nn.Module):
    """Half the channels pass through, half go through 1x1 -> grouped 3x3 -> 1x1."""

    def __init__(self, channels: int, groups: int = 4):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))

    def forward(self, x):
        keep, work = x.chunk(2, dim=1)
        return torch.cat([keep, self.branch(work)], dim=1)


class OwnNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 48):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.stage1 = nn.Sequential(Unit(width), Unit(width))
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(2 * width)
        self.shortcut = nn.Sequential(nn.Conv2d(width, 2 * width, 1, stride=2, bias=False),
                                      nn.BatchNorm2d(2 * width))
        self.stage2 = nn.Sequential(Unit(2 * width), Unit(2 * width))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.stage1(x)
        x = F.relu(self.down_bn(self.down(x)) + self.shortcut(x))  # post-activation residual
        x = F.max_pool2d(self.stage2(x), 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def widths(model: nn.Module) -> str:
    return " ".join(str(m.num_features) for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=3, help="epochs of sparsity training and of fine-tuning")
    ap.add_argument("--percent", type=float, default=0.5)
    ap.add_argument("--s", type=float, default=1e-3, help="sparsity strength")
    ap.add_argument("--save", default=None, help="folder for the checkpoints (default: none written)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None, help="where the Fashion-MNIST files are (default: search)")
    ap.add_argument("--train-subset", type=int, default=None, help="train on the first N images only")
    args = ap.parse_args(argv)

    data = netslim.load_dataset("fashion-mnist", data_dir=args.data_dir, train_subset=args.train_subset)
    spec = data.spec
    size = (spec.in_channels, spec.image_size, spec.image_size)
    torch.manual_seed(args.seed)
    model = OwnNet(spec.in_channels, spec.num_classes)
    meta = {"dataset": spec.as_dict(), "input_size": list(size)}

    def stage_dir(name: str):
        return f"{args.save}/{name}" if args.save else None

    cfg = netslim.TrainConfig(epochs=args.epochs, batch_size=128, sr=True, s=args.s, seed=args.seed)
    sparse = netslim.fit(model, data, cfg, stage_dir("sparsity"), meta=meta)
    before = netslim.count(model, size)
    print(f"sparsity training: top-1 {sparse['final_top1']:.2f}%  {before['params']:,} params  "
          f"{before['flops'] / 1e6:.1f} MFLOPs  BN widths {widths(model)}")

    model.eval()
    x = torch.randn(8, *size)
    slim, report = netslim.prune(model, args.percent, example_input=x[:1])
    masked, _ = netslim.prune(model, args.percent, mode="mask", example_input=x[:1])
    with torch.no_grad():
        gap = (slim.eval()(x) - masked.eval()(x)).abs().max().item()
    _, top1 = netslim.evaluate(slim, data.test_x, data.test_y, spec)
    after = report["after"]
    print(f"pruned {args.percent:.0%}: top-1 {top1:.2f}% before fine-tuning  {after['params']:,} params  "
          f"{after['flops'] / 1e6:.1f} MFLOPs  BN widths {widths(slim)}")
    print(f"  slim vs masked model: max |difference| {gap:.2e}; coupled groups {len(report['coupled'])}; "
          f"unprunable {report['unprunable'] or 'none'}")
    grouped = [m for m in slim.modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels]
    print("  grouped convs (in, out, groups): " + ", ".join(f"({m.in_channels}, {m.out_channels}, {m.groups})"
                                                         for m in grouped))

    tune = dataclasses.replace(cfg, sr=False)  # the same recipe without the L1 term
    done = netslim.fit(slim, data, tune, stage_dir("finetune"), meta=meta)
    print(f"fine-tuned: top-1 {done['final_top1']:.2f}% (sparsity-trained model: {sparse['final_top1']:.2f}%), "
          f"params -{1 - after['params'] / before['params']:.1%}, FLOPs -{1 - after['flops'] / before['flops']:.1%}")


if __name__ == "__main__":
    main()
