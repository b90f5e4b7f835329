"""Realised CPU inference speed-up of slim models against their MAC reduction, in one run.

    python benchmarks/bench_inference.py [--archs resnet-164,densenet-40,vgg-13] [--batch 64,1]
                                         [--repeats N] [--threads T] [--channels-last]
                                         [--round-to R] [--checkpoint CKPT] [--json OUT]

For each target (model, percent) it builds the dense model (3x32x32 input, 10 classes),
sets its BN factors like a sparsity-trained model's (below), prunes it with
`netslim.prune(model, percent)` (mode "slim") and times dense and slim forwards
*interleaved* (dense, slim, dense, slim, ... so load from other processes hits both
alike) in eval mode under torch.inference_mode, fp32; the figure is the median.

    speedup = latency(dense) / latency(slim)
    ratio   = speedup / (MACs(dense) / MACs(slim))      (1.0: time falls as fast as MACs)

Two variants per model, each with the dense model given the same treatment:
  eager  the models as netslim builds them (NCHW, or channels-last with --channels-last);
  fused  netslim.fuse.optimize_for_inference(model, channels_last=True): BNs folded into
         convs, pre-activation BN+ReLU before a 1x1 conv turned into one clamp, conv+ReLU
         and conv+residual-add run as single oneDNN kernels, NHWC throughout.

Emulated sparsity training (no trained checkpoints yet; --checkpoint takes a real one):
every BN gets gamma = 0.5 * s_layer * |z|**3 with z ~ N(0, 1) per channel and
s_layer = exp(0.5 * N(0, 1)) per layer (--layer-spread; 0 gives the plain heavy-tailed
0.5*|z|**3), beta ~ N(0, 0.1), running mean ~ N(0, 0.1), running var ~ U(0.5, 1.5), from
a fixed seed (--seed). Heavy tails put about half of all factors below 0.15; the per-layer
spread makes the one global threshold prune some layers much harder than others, as it
does on trained models. (The realised MAC ratios land near the seed's: vgg-13 40% ~3.0x
vs the seed's 2.7x, resnet-164 40% 2.25x vs 2.26x, densenet-40 40% 1.65x vs 1.61x.)

Process settings (printed in the header; both are process-wide, so they are the
benchmark's choice, not the library's):
  --malloc tuned (default): glibc keeps freed memory (mallopt: no mmap, no trim). With the
      default glibc settings every large activation is a fresh mmap, and this VM pays
      ~0.1-0.2 M page faults per resnet-164 forward at batch 64: the eager models run
      ~1.6x slower, dense and slim alike (the ratios move by ~0.01). jemalloc/tcmalloc
      do the same job.
  ONEDNN_PRIMITIVE_CACHE_CAPACITY=8192 (unless set): a slim model has a distinct conv
      shape per layer; with several models in one process oneDNN's default cache (1024)
      thrashes and re-JITs kernels inside the timed region.
"""
from __future__ import annotations

import os

os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")  # before torch loads oneDNN

import argparse
import copy
import ctypes
import json
import math
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from netslim.fuse import optimize_for_inference
from netslim.models import build_model
from netslim.profile import count
from netslim.engine.prune import prune

# (label, arch, depth, percent, target ratio): the targets
TARGETS = [
    ("resnet-164", "resnet", 164, 0.4, 0.85),
    ("densenet-40", "densenet", 40, 0.4, 0.85),
    ("vgg-13", "vgg", 13, 0.4, 0.85),
    ("vgg-13", "vgg", 13, 0.5, 0.85),
    ("vgg-13", "vgg", 13, 0.7, 0.70),
]
INPUT = (3, 32, 32)


def tune_malloc() -> bool:
    """Keep freed heap memory in the process (glibc): no page faults on re-allocation."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold, m_mmap_max = -1, -2, -3, -4
    ok = [libc.mallopt(m_mmap_max, 0),                  # large blocks from the heap, not mmap
          libc.mallopt(m_mmap_threshold, 32 << 20),
          libc.mallopt(m_trim_threshold, 2**31 - 1),    # never give the heap top back
          libc.mallopt(m_top_pad, 64 << 20)]
    return all(r == 1 for r in ok)


def emulate_sparsity(model: nn.Module, seed: int = 0, layer_spread: float = 0.5) -> nn.Module:
    """Set BN factors and statistics like a sparsity-trained model's (see the module doc)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.weight is not None:
                n = m.num_features
                s = math.exp(layer_spread * float(torch.randn((), generator=g)))
                m.weight.copy_(torch.randn(n, generator=g).abs() ** 3 * 0.5 * s)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def interleaved(fns: list[Callable[[], Any]], repeats: int, warmup: int = 2) -> tuple[list[list[float]], list[list[float]]]:
    """(wall seconds, process CPU seconds) per call of each fn, `repeats` round-robin rounds.

    CPU time leaves out the time the process waited for a core, which on a shared machine
    is most of the noise; with one thread it is what the wall time would be on an idle one.
    """
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    with torch.inference_mode():
        for f in fns:
            for _ in range(warmup):
                f()
        for _ in range(repeats):
            for i, f in enumerate(fns):
                c0, t0 = time.process_time(), time.perf_counter()
                f()
                wall[i].append(time.perf_counter() - t0)
                cpu[i].append(time.process_time() - c0)
    return wall, cpu


def _layout(model: nn.Module, channels_last: bool) -> nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last) if channels_last else model


def _input(batch: int, channels_last: bool) -> torch.Tensor:
    x = torch.randn(batch, *INPUT, generator=torch.Generator().manual_seed(batch))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def bench_one(dense: nn.Module, slim: nn.Module, batches: list[int], repeats: int, variants: list[str],
              channels_last: bool, fused_layout: str) -> dict:
    """{variant: {batch: figures}} for one dense/slim pair, each variant applied to both."""
    def fused(cl: bool) -> tuple[nn.Module, nn.Module]:
        return (optimize_for_inference(dense, channels_last=cl), optimize_for_inference(slim, channels_last=cl))

    made: dict[bool, tuple[nn.Module, nn.Module]] = {}
    out: dict[str, dict] = {v: {} for v in variants}
    for bs in batches:
        pairs: dict[str, tuple[nn.Module, nn.Module, bool]] = {}
        if "eager" in variants:
            pairs["eager"] = (*((_layout(dense, True), _layout(slim, True)) if channels_last else (dense, slim)),
                              channels_last)
        if "fused" in variants:
            # channels-last pays off from a few images up; for one image PyTorch's im2col conv
            # (NCHW) wins, and FusedConv2d hands small convs to it
            cl = fused_layout == "cl" or (fused_layout == "auto" and bs >= 16)
            if cl not in made:
                made[cl] = fused(cl)
            pairs["fused"] = (*made[cl], cl)
        fns, keys = [], []
        for v, (d, s, cl) in pairs.items():
            x = _input(bs, cl)
            fns += [lambda d=d, x=x: d(x), lambda s=s, x=x: s(x)]
            keys.append(v)
        # batch-1 forwards take milliseconds: more rounds for a stable median
        wall, cpu = interleaved(fns, repeats if bs > 8 else repeats * 5)
        for i, v in enumerate(keys):
            (td, ts), (cd, cs) = wall[2 * i:2 * i + 2], cpu[2 * i:2 * i + 2]
            md, ms = statistics.median(td), statistics.median(ts)
            # spread of the per-round ratio: how much the machine's load moved the figure
            rr = sorted(a / b for a, b in zip(td, ts))
            q = len(rr) // 4
            out[v][bs] = {"layout": "channels_last" if pairs[v][2] else "NCHW",
                          "dense_ms": md * 1e3, "slim_ms": ms * 1e3, "rounds": len(td),
                          "speedup": md / ms, "speedup_iqr": [rr[q], rr[-1 - q]],
                          "dense_cpu_ms": statistics.median(cd) * 1e3, "slim_cpu_ms": statistics.median(cs) * 1e3,
                          "cpu_speedup": statistics.median(cd) / statistics.median(cs)}
    return out


def simd_macs(model: nn.Module, lanes: int) -> int:
    """Conv/Linear MACs at batch 1 with output channels rounded up to `lanes`.

    oneDNN's fp32 kernels vectorise over output channels (16 floats per AVX-512
    register), so a conv with 10 outputs costs about what one with 16 does: the ratio of
    these counts is the speed-up a perfectly compute-bound run could reach.
    """
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Linear):
            total += math.ceil(m.out_features / lanes) * lanes * m.in_features
        else:
            k = math.prod(m.kernel_size) * (m.in_channels // m.groups)
            total += math.ceil(m.out_channels / lanes) * lanes * k * math.prod(out.shape[2:])

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *INPUT))
    finally:
        for h in hs:
            h.remove()
    return total


def _met(met: Optional[bool]) -> str:
    return "-" if met is None else "yes" if met else "no"


def profile_ops(models: dict[str, nn.Module], x: torch.Tensor, rounds: int, top: int = 8) -> dict[str, list]:
    """Self CPU ms per forward by aten op, the models profiled alternately (one forward each
    per round, so machine load hits all alike); {name: [(op, ms, share), ...]}."""
    from torch.profiler import ProfilerActivity, profile

    acc: dict[str, dict[str, float]] = {k: {} for k in models}
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # the profiler's C++ side logs every start/stop to fd 2
    try:
        with torch.inference_mode():
            for m in models.values():
                m(x)
            for _ in range(rounds):
                for k, m in models.items():
                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        m(x)
                    for e in prof.key_averages():
                        acc[k][e.key] = acc[k].get(e.key, 0.0) + e.self_cpu_time_total / 1e3
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    out = {}
    for k, ops in acc.items():
        total = sum(ops.values())
        rows = sorted(ops.items(), key=lambda kv: -kv[1])[:top]
        out[k] = [(op, ms / rounds, ms / total) for op, ms in rows] + [("total", total / rounds, 1.0)]
    return out


def load_checkpoint_model(path: str) -> tuple[str, str, Optional[int], nn.Module]:
    """(label, arch, depth, dense model) from a sparsity-trained dense netslim checkpoint."""
    from netslim.checkpoint import load_any_checkpoint

    model, meta = load_any_checkpoint(path)
    if meta.get("plan") or meta.get("mask"):
        sys.exit(f"{path} holds a pruned model; give the sparsity-trained dense one")
    arch = dict(meta.get("arch") or {})
    name, depth = arch.get("name", type(model).__name__), arch.get("depth")
    return (f"{name}-{depth}" if depth else name), name, depth, model.eval()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="resnet-164,densenet-40,vgg-13",
                    help="comma list of resnet-164, densenet-40, vgg-13 (default: all targets)")
    ap.add_argument("--percents", default=None,
                    help="comma list overriding the targets' percents (e.g. 0.4,0.6)")
    ap.add_argument("--batch", default="64,1", help="comma list of batch sizes (default 64,1)")
    ap.add_argument("--repeats", type=int, default=9, help="timed rounds per batch >8 (x5 at batch <=8)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--channels-last", action="store_true", help="run the eager variant channels-last")
    ap.add_argument("--variants", default="eager,fused", help="comma list of eager, fused")
    ap.add_argument("--fused-layout", choices=("auto", "cl", "nchw"), default="auto",
                    help="layout of the fused variant (auto: channels-last from batch 16, else NCHW)")
    ap.add_argument("--round-to", type=int, default=1, help="prune(..., round_to=R): kept widths a multiple of R")
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned")
    ap.add_argument("--seed", type=int, default=0, help="seed of the emulated BN factors")
    ap.add_argument("--layer-spread", type=float, default=0.5, help="sd of log per-layer gamma scale")
    ap.add_argument("--checkpoint", default=None,
                    help="a sparsity-trained dense netslim checkpoint: benchmark it (its own BN factors) instead")
    ap.add_argument("--profile", type=int, default=0, metavar="ROUNDS",
                    help="also profile ops (torch.profiler) of dense vs slim, eager and fused, at the first batch size")
    ap.add_argument("--json", default=None, help="write every figure to this file")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_tuned = tune_malloc() if args.malloc == "tuned" else False
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    known = {t[0] for t in TARGETS}
    if any(a not in known for a in archs):
        ap.error(f"--archs takes {', '.join(sorted(known))}")
    batches = [int(b) for b in args.batch.split(",")]
    variants = [v.strip() for v in args.variants.split(",")]
    targets = [t for t in TARGETS if t[0] in archs]
    cache: dict[tuple, nn.Module] = {}
    if args.checkpoint:  # its own model, at the targets' percents for it (or 0.4 / --percents)
        label, arch, depth, model = load_checkpoint_model(args.checkpoint)
        cache[(arch, depth)] = model
        targets = [t for t in TARGETS if t[0] == label] or [(label, arch, depth, 0.4, None)]
    if args.percents:
        pcts = [float(p) for p in args.percents.split(",")]
        goal = {(t[0], t[3]): t[4] for t in TARGETS}
        models = list(dict.fromkeys((t[0], t[1], t[2]) for t in targets))
        targets = [(lab, a, d, p, goal.get((lab, p))) for lab, a, d in models for p in pcts]

    header = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "malloc": "tuned (mallopt)" if malloc_tuned else "glibc default",
        "onednn_cache": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
        "eager_layout": "channels_last" if args.channels_last else "NCHW", "fused_layout": args.fused_layout,
        "round_to": args.round_to, "gamma_seed": args.seed, "layer_spread": args.layer_spread,
        "checkpoint": args.checkpoint, "repeats": args.repeats,
    }
    print("# " + ", ".join(f"{k}={v}" for k, v in header.items() if v is not None), flush=True)
    rows: list[dict] = []
    profiles: list[dict] = []
    for label, arch, depth, pct, target in targets:
        key = (arch, depth)
        if key not in cache:
            cache[key] = emulate_sparsity(build_model(arch, depth=depth, num_classes=10),
                                          seed=args.seed, layer_spread=args.layer_spread).eval()
        dense = cache[key]
        slim, report = prune(dense, pct, round_to=args.round_to)
        slim.eval()
        macs_d, macs_s = count(dense, INPUT)["macs"], count(slim, INPUT)["macs"]
        simd_ratio = simd_macs(dense, 16) / simd_macs(slim, 16)
        res = bench_one(dense, slim, batches, args.repeats, variants, args.channels_last, args.fused_layout)
        if args.profile:
            bs = batches[0]
            cl = args.fused_layout == "cl" or (args.fused_layout == "auto" and bs >= 16)
            xe, xf = _input(bs, args.channels_last), _input(bs, cl)
            eager = {"dense": _layout(dense, args.channels_last), "slim": _layout(slim, args.channels_last)}
            fusedm = {"dense": optimize_for_inference(dense, channels_last=cl),
                      "slim": optimize_for_inference(slim, channels_last=cl)}
            for v, ms, x in (("eager", eager, xe), ("fused", fusedm, xf)):
                if v not in variants:
                    continue
                prof = profile_ops(ms, x, args.profile)
                profiles.append({"model": label, "percent": pct, "variant": v, "batch": bs, "ops": prof})
                for k, ops in prof.items():
                    print(f"  profile {label} {pct:.0%} {v} bs{bs} {k}: " + ", ".join(
                        f"{op.replace('aten::', '').replace('mkldnn::', '')} {t:.1f}ms {sh:.0%}" for op, t, sh in ops),
                        flush=True)
        for v, per_bs in res.items():
            for bs, r in per_bs.items():
                mac_ratio = macs_d / macs_s
                ratio = r["speedup"] / mac_ratio
                row = dict(model=label, percent=pct, variant=v, batch=bs, macs_dense=macs_d, macs_slim=macs_s,
                           mac_ratio=mac_ratio, simd16_mac_ratio=simd_ratio, ratio=ratio, target=target,
                           met=None if target is None else ratio >= target, **r)
                rows.append(row)
                print(f"{label:11s} {pct:4.0%} {v:5s} {r['layout'][:4]:4s} bs{bs:<3d} MACs {macs_d/1e6:6.1f}M/{macs_s/1e6:6.1f}M "
                      f"({mac_ratio:5.2f}x)  {r['dense_ms']:8.2f} / {r['slim_ms']:8.2f} ms  speedup "
                      f"{r['speedup']:5.2f}x  ratio {ratio:.2f} (target {target}: {_met(row['met'])}; CPU-time "
                      f"ratio {r['cpu_speedup'] / mac_ratio:.2f}; 16-lane MAC ratio {simd_ratio:.2f}x)", flush=True)

    print()
    print(f"threads={header['threads']}, malloc={header['malloc']}, round_to={args.round_to}; latency = median "
          f"wall ms of interleaved rounds; 'CPU' = the same ratio from process CPU time")
    print("| model | percent | variant | layout | batch | MACs dense | MACs slim | MAC ratio | dense ms | slim ms "
          "| speedup | speedup/MAC ratio | target | met? | CPU speedup/MAC ratio | 16-lane MAC ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['percent']:.0%} | {r['variant']} | {r['layout']} | {r['batch']} "
              f"| {r['macs_dense']/1e6:.1f}M | {r['macs_slim']/1e6:.1f}M | {r['mac_ratio']:.2f}x | {r['dense_ms']:.2f} "
              f"| {r['slim_ms']:.2f} | {r['speedup']:.2f}x | {r['ratio']:.2f} | {r['target'] or '-'} "
              f"| {_met(r['met'])} | {r['cpu_speedup'] / r['mac_ratio']:.2f} | {r['simd16_mac_ratio']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": header, "rows": rows, "profiles": profiles}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
