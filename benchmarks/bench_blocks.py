"""What removing whole residual blocks buys in real speed (issue 13, item 3), side by side.

    python benchmarks/bench_blocks.py [--models resnet-164,resnet-cifar-56,mobilenetv2]
                                      [--dead 0.25] [--percent 0.4] [--batch 1,64] [--rounds 15] [--json OUT]

For each model: BN factors like a sparsity-trained model's (bench_inference.emulate_sparsity),
then every k-th residual branch silenced (its BN factors x 1e-4, betas unchanged: what the L1
penalty does to a branch it shuts), so a share `--dead` of the branches is dead. Then
`netslim.prune(model, percent)` twice: with block removal (the default: a dead branch goes
whole, the block becomes its shortcut) and with `remove_blocks=False` (each of its layers
keeps `min_channels`). Dense, kept-branches and removed-branches models are timed
interleaved, one thread (process CPU time, median of the rounds), in torch eager and in
onnxruntime (`netslim export --onnx`'s graph), at each batch size. The table prints MACs,
the conv layers each model runs, and the speed-up of each slim model over dense; the last
column is what removing the blocks adds: latency(kept) / latency(removed).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_deploy import INPUT, interleaved_ms, runner  # noqa: E402
from bench_inference import emulate_sparsity  # noqa: E402

from netslim.engine.blocks import find_branches  # noqa: E402
from netslim.engine.prune import prune  # noqa: E402
from netslim.models import build_model  # noqa: E402
from netslim.profile import count  # noqa: E402

MODELS = {  # label -> build_model arguments
    "resnet-164": ("resnet", {"depth": 164}),             # the seed's pre-activation bottlenecks
    "resnet-cifar-56": ("resnet-cifar", {"depth": 56}),   # post-activation basic blocks
    "mobilenetv2": ("mobilenetv2", {}),                   # inverted residuals
}


def with_dead_branches(model: nn.Module, share: float) -> tuple[nn.Module, int, int]:
    """(model, branches silenced, branches): every k-th removable branch's BNs scaled by 1e-4."""
    branches = find_branches(model, torch.zeros(1, *INPUT))
    step = max(round(1 / share), 1) if share > 0 else len(branches) + 1
    dead = branches[step - 1::step]
    mods = dict(model.named_modules())
    with torch.no_grad():
        for b in dead:
            for name in b.bns:
                if isinstance(mods[name], _BatchNorm):
                    mods[name].weight.mul_(1e-4)
    return model, len(dead), len(branches)


def conv_layers(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--dead", type=float, default=0.25, help="share of residual branches silenced")
    ap.add_argument("--percent", type=float, default=0.4)
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--runtimes", default="eager,onnxruntime")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    batches = [int(b) for b in args.batch.split(",")]
    runtimes = args.runtimes.split(",")
    rows = []
    print(f"one thread, process CPU time, median of {args.rounds} interleaved rounds; {args.dead:.0%} of the "
          f"residual branches silenced; netslim.prune(model, {args.percent})")
    print("| model | branches removed | conv layers dense / kept / removed | MACs dense / kept / removed | runtime, batch "
          "| speed-up kept | speed-up removed | removed vs kept |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        torch.manual_seed(args.seed)
        arch, options = MODELS[name]
        dense = emulate_sparsity(build_model(arch, num_classes=10, **options), args.seed).eval()
        dense, n_dead, n_branches = with_dead_branches(dense, args.dead)
        x = torch.zeros(1, *INPUT)
        kept, _ = prune(dense, args.percent, example_input=x, remove_blocks=False)
        removed, report = prune(dense, args.percent, example_input=x)
        macs = [count(m, example_input=x)["flops"] for m in (dense, kept, removed)]
        layers = [conv_layers(m) for m in (dense, kept, removed)]
        for runtime in runtimes:
            for batch in batches:
                ms = interleaved_ms([runner(m, runtime, batch) for m in (dense, kept, removed)], args.rounds,
                                    cpu_clock=True)
                row = {"model": name, "runtime": runtime, "batch": batch, "percent": args.percent,
                       "branches": n_branches, "silenced": n_dead, "removed_blocks": len(report["removed_blocks"]),
                       "conv_layers": layers, "macs": macs, "ms": ms}
                rows.append(row)
                print(f"| {name} | {row['removed_blocks']} of {n_branches} | {' / '.join(map(str, layers))} | "
                      f"{' / '.join(f'{m / 1e6:.1f}M' for m in macs)} | {runtime} b{batch} | {ms[0] / ms[1]:.2f}x | "
                      f"{ms[0] / ms[2]:.2f}x | {ms[1] / ms[2]:.2f}x |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
