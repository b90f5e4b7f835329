"""Network Slimming inside your own training loop: plain PyTorch, bf16 autocast, optionally DDP.

    python examples/own_loop.py [--epochs 2] [--percent 0.5] [--save runs/own-loop]
    torchrun --nproc-per-node 2 examples/own_loop.py ...        # the same code, data parallel

netslim adds three calls to a loop you already have (docs/own-loop.md walks through them):
  1. sparsity training: `sparsity()` (a netslim.SparsityCallback) after loss.backward(),
     before optimizer.step();
  2. pruning: `netslim.prune(model, percent)` returns a physically smaller copy;
  3. saving: `netslim.save_checkpoint(path, slim)` writes a file that rebuilds the slim
     model by itself (`netslim.load_checkpoint(path)`).
Fine-tuning is the same loop on the slim model, without the sparsity term.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import netslim


def batches(x_uint8: torch.Tensor, y: torch.Tensor, spec, batch_size: int, train: bool) -> DataLoader:
    """A plain DataLoader of normalised float images; under DDP each process trains on its share."""
    data = TensorDataset(netslim.data.normalize(x_uint8, spec), y)
    if train and dist.is_initialized():
        return DataLoader(data, batch_size=batch_size, sampler=DistributedSampler(data, seed=0))
    return DataLoader(data, batch_size=batch_size, shuffle=train)


def train(model: torch.nn.Module, loader: DataLoader, epochs: int, lr: float, s: float = 0.0) -> None:
    """SGD with bf16 autocast; with s > 0 the L1 term on every BN gamma (Network Slimming)."""
    if dist.is_initialized():
        # DDP's one rule for the L1 step: call it after backward() (which has all-reduced the
        # gradients) on the parameters DDP trains; then every rank adds the same term.
        model = DDP(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sparsity = netslim.SparsityCallback(model, s)   # finds the BN gammas inside the DDP wrapper too
    for epoch in range(epochs):
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        model.train()
        for x, y in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16):  # "cuda" on a GPU
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sparsity()  # the sparsity step: after backward, before the optimizer step
            optimizer.step()


@torch.no_grad()
def top1(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return 100.0 * hits / len(loader.dataset)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=5000)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--percent", type=float, default=0.5)
    p.add_argument("--s", type=float, default=1e-3, help="sparsity strength")
    p.add_argument("--save", default="runs/own-loop")
    args = p.parse_args()

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun
        dist.init_process_group("gloo")             # "nccl" on GPUs
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)  # every rank builds the same initial weights

    data = netslim.load_dataset("fashion-mnist", data_dir=args.data_dir, train_subset=args.train_subset)
    spec = data.spec
    # under DDP the global batch stays 64: each of the W processes takes 64 / W
    world = dist.get_world_size() if dist.is_initialized() else 1
    train_batches = batches(data.train_x, data.train_y, spec, 64 // world, train=True)
    test_batches = batches(data.test_x, data.test_y, spec, 256, train=False)
    model = netslim.build_model("vgg", depth=11, width=0.25, num_classes=spec.num_classes,
                                in_channels=spec.in_channels)

    train(model, train_batches, args.epochs, lr=0.1, s=args.s)              # 1. sparsity training
    slim, report = netslim.prune(model, args.percent)                       # 2. prune (same on every rank)
    pruned_top1 = top1(slim, test_batches)
    train(slim, train_batches, args.epochs, lr=0.01)                        # fine-tune: the same loop
    if rank == 0:
        path = os.path.join(args.save, "slim.pt")
        netslim.save_checkpoint(path, slim, dataset=spec.as_dict())         # 3. save
        again, _ = netslim.load_checkpoint(path)                            # rebuilt from the file alone
        before, after = report["before"], report["after"]
        print(f"sparsity training: top-1 {top1(model, test_batches):.2f}%")
        print(f"pruned {args.percent:.0%} of the BN channels: params {before['params']:,} -> {after['params']:,}, "
              f"FLOPs {before['flops']:,} -> {after['flops']:,}; top-1 {pruned_top1:.2f}% before fine-tuning")
        print(f"fine-tuned: top-1 {top1(slim, test_batches):.2f}%; reloaded from {path}: "
              f"top-1 {top1(again, test_batches):.2f}%")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
