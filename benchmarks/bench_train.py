"""Training throughput: netslim's fit() step vs a loop written in the seed's style.

    python benchmarks/bench_train.py [--models vgg-13,resnet-164,densenet-40] [--steps N]
                                     [--rounds R] [--threads T] [--compile] [--profile MODELS]
                                     [--json OUT]

Images per second of *training*, data loading and augmentation included, batch 64,
CIFAR-shaped data: 50,000 random uint8 3x32x32 images and labels made in memory, the
same model (netslim.models.build_model, 10 classes) and the same SGD recipe (lr 0.1,
momentum 0.9, weight decay 1e-4) with the Network Slimming sparsity term.

reference   the seed's loop: a torch.utils.data.Dataset returning one float tensor per
            image through per-sample Python transforms (F.pad by 4 + random-crop slice,
            random horizontal flip, /255, per-channel Normalize), a DataLoader (batch 64,
            shuffle, num_workers 0 or 1: both are measured on the first model (vgg-13 by
            default) and the faster one is used, see --ref-workers), fp32, NCHW, and the seed's sparsity step, a Python
            loop over modules adding s*sign(gamma) to each BN gamma's gradient; loss.item()
            and the top-1 count every step, as the seed's loop does.
netslim     netslim.train.fit itself (no copy of its loop): BatchLoader(train=True) on the
            uint8 tensors (batched augmentation), resolve_amp('auto') (bf16 autocast on a
            CPU with AVX512-BF16/AMX), channels_last, BNSparsity (foreach). fit is run with
            log_every=1 and an on_progress callback that timestamps every step and stops the
            run (by raising) after the requested steps, so only the training steps are timed;
            no evaluation or checkpoint happens (save_dir=None, the epoch never ends).

The machine may be shared, so compared runs are interleaved in one process: R rounds,
each runs every variant for a few warm-up steps and then N timed steps, the order reversed
every other round. A variant's img/s is the median over rounds; a ratio is the median of
the per-round ratios (each taken between runs seconds apart, under the same load).

Threads: on a machine already busier than its cpus (1-minute load average > cpus), a
multi-threaded step stalls whenever one OpenMP thread is descheduled. On the 2-core box,
with load 4-5 from other jobs, a 2-thread vgg-13 step ran 2-3x slower than a 1-thread one
and netslim's bf16 path fell *below* fp32 (0.39x the reference; OMP_WAIT_POLICY=PASSIVE
did not help), figures that say nothing about the code. So --threads auto (the default)
uses 1 thread when the load exceeds the cpus and torch's default otherwise; the header
prints the choice, the thread counts and the load average.

vgg-13 also gets an ablation of what makes the difference: the reference without data
loading (one fixed batch, the seed's step only), netslim fp32 NCHW (amp off,
channels_last off: the batched loader, foreach sparsity and loop), + channels_last,
+ bf16 autocast (= netslim's default). --compile adds netslim with torch.compile (vgg-13):
the first step's time (compilation) is reported apart from the steady state.

--profile MODELS runs torch.profiler over a few steps of the reference and of netslim
for each named model and prints where the time goes (self CPU time per op, grouped).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from netslim.data import DataBundle, get_spec
from netslim.models import build_model
from netslim.train import TrainConfig, _cpu_has_bf16, fit, resolve_amp

MODELS = {  # key -> (arch, depth, sparsity s as in the seed's recipe, default timed steps per round)
    "vgg-13": ("vgg", 13, 1e-4, 8),
    "resnet-164": ("resnet", 164, 1e-5, 4),
    "densenet-40": ("densenet", 40, 1e-5, 3),
}
TARGETS = {"vgg-13": 2.0, "resnet-164": 1.5, "densenet-40": 1.5}
BATCH = 64
N_TRAIN = 50_000
LR, MOMENTUM, WD = 0.1, 0.9, 1e-4


# ------------------------------------------------------------------------------- data

def make_data(seed: int = 0) -> DataBundle:
    """50,000 random CIFAR-shaped uint8 images + labels; a 64-image test set (never used:
    the timed fit runs stop before their epoch ends)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (N_TRAIN, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (N_TRAIN,), generator=g)
    return DataBundle(get_spec("cifar10"), x, y, x[:BATCH].clone(), y[:BATCH].clone())


class SeedStyleDataset(torch.utils.data.Dataset):
    """One image at a time, as torchvision's CIFAR10 + transforms.Compose([RandomCrop(32,
    padding=4), RandomHorizontalFlip(), ToTensor(), Normalize(mean, std)]) would do it,
    with tensor ops in place of PIL (random numbers from torch's RNG, as torchvision's)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean, std, pad: int = 4):
        self.x, self.y = x, y
        self.pad = pad
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        img = self.x[i]                                             # uint8 [3, 32, 32]
        p = self.pad
        H, W = img.shape[1:]
        img = F.pad(img, (p, p, p, p))                              # RandomCrop(32, padding=4)
        top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
        img = img[:, top:top + H, left:left + W]
        if torch.rand(1).item() < 0.5:                              # RandomHorizontalFlip()
            img = img.flip(2)
        img = img.float().div(255)                                  # ToTensor()
        img = (img - self.mean) / self.std                          # Normalize(mean, std)
        return img, int(self.y[i])


# ------------------------------------------------------------------------------- runners

class Runner:
    """Something that trains for `warm` + `timed` steps and reports img/s of the timed ones."""
    name: str

    def run(self, warm: int, timed: int) -> dict:
        raise NotImplementedError


def seed_update_bn(model: nn.Module, s: float) -> None:
    """The seed's updateBN(), verbatim in spirit."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.grad.data.add_(s * torch.sign(m.weight.data))


class ReferenceRunner(Runner):
    """The seed's training loop; `workers` None = no data loading (one fixed batch)."""

    def __init__(self, name: str, model: nn.Module, data: DataBundle, s: float, workers: Optional[int]):
        self.name = name
        self.model = model
        self.s = s
        self.opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
        self.workers = workers
        if workers is None:
            g = torch.Generator().manual_seed(1)
            self.fixed = (torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
            self.loader = None
        else:
            spec = data.spec
            ds = SeedStyleDataset(data.train_x, data.train_y, spec.mean, spec.std, spec.crop_pad)
            self.loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers,
                                                      persistent_workers=workers > 0)
        self._it = None

    def _batch(self):
        if self.loader is None:
            return self.fixed
        if self._it is None:
            self._it = iter(self.loader)
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            return next(self._it)

    def step(self) -> None:
        model, opt = self.model, self.opt
        data, target = self._batch()
        opt.zero_grad()
        output = model(data)
        loss = F.cross_entropy(output, target)
        self.avg_loss += loss.item()
        pred = output.data.max(1, keepdim=True)[1]
        self.train_acc += int(pred.eq(target.data.view_as(pred)).sum())
        loss.backward()
        seed_update_bn(model, self.s)
        opt.step()

    def run(self, warm: int, timed: int) -> dict:
        self.model.train()
        self.avg_loss, self.train_acc = 0.0, 0
        for _ in range(warm):
            self.step()
        t0 = time.perf_counter()
        for _ in range(timed):
            self.step()
        dt = time.perf_counter() - t0
        return {"img_s": timed * BATCH / dt, "seconds": dt}

    def close(self) -> None:
        self._it = None  # lets a persistent worker exit


class _Stop(Exception):
    pass


class FitRunner(Runner):
    """netslim.train.fit on the whole 50k set, stopped after warm + timed steps."""

    def __init__(self, name: str, model: nn.Module, data: DataBundle, s: float, *, amp: str = "auto",
                 channels_last: bool = True, compile: bool = False):
        self.name = name
        self.model = model
        self.data = data
        self.cfg = TrainConfig(epochs=1, batch_size=BATCH, lr=LR, momentum=MOMENTUM, weight_decay=WD,
                               sr=True, s=s, amp=amp, channels_last=channels_last, compile=compile,
                               seed=0, device="cpu", log_every=1)
        self.first_step_s: list[float] = []  # time from fit() call to the end of step 1 (compile included)
        self.on_step: Optional[Callable[[], None]] = None  # extra hook (the profiler's step)

    def run(self, warm: int, timed: int) -> dict:
        if warm < 1:
            raise ValueError("FitRunner needs at least one warm-up step (its end starts the clock)")
        stamps: list[float] = []
        total = warm + timed

        def on_progress(ev: dict) -> None:
            if ev.get("event") != "step":
                return
            stamps.append(time.perf_counter())
            if self.on_step is not None:
                self.on_step()
            if len(stamps) >= total:
                raise _Stop

        t_call = time.perf_counter()
        try:
            fit(self.model, self.data, self.cfg, None, meta={}, on_progress=on_progress)
        except _Stop:
            pass
        else:
            raise RuntimeError(f"{self.name}: fit ended before {total} steps")
        self.first_step_s.append(stamps[0] - t_call)
        dt = stamps[-1] - stamps[warm - 1]
        return {"img_s": timed * BATCH / dt, "seconds": dt, "first_step_s": stamps[0] - t_call}


# ------------------------------------------------------------------------------- measuring

def interleave(runners: list[Runner], rounds: int, warm_first: int, warm: int, timed: int,
               log: Callable[[str], None]) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {r.name: [] for r in runners}
    for rd in range(rounds):
        order = runners if rd % 2 == 0 else runners[::-1]
        for r in order:
            res = r.run(warm_first if rd == 0 else warm, timed)
            res["load1"] = os.getloadavg()[0]
            results[r.name].append(res)
            log(f"    round {rd + 1}/{rounds}  {r.name:<22s} {res['img_s']:8.1f} img/s  "
                f"({timed} steps in {res['seconds']:.1f} s, load {res['load1']:.2f})")
    return results


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def median_ratio(res: dict[str, list[dict]], num: str, den: str) -> float:
    return med([a["img_s"] / b["img_s"] for a, b in zip(res[num], res[den])])


def fresh_model(key: str, seed: int = 0) -> nn.Module:
    arch, depth, _, _ = MODELS[key]
    torch.manual_seed(seed)
    return build_model(arch, depth, num_classes=10)


def environment(threads: int) -> dict:
    env = {
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "cpu_bf16": _cpu_has_bf16(), "amp_auto": str(resolve_amp("auto", "cpu")).replace("torch.", ""),
        "load_avg": list(os.getloadavg()),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        env["cpu_model"] = None
    return env


# ------------------------------------------------------------------------------- profiling

CATEGORIES = [  # (label, predicate on the op name), first match wins
    ("python / outside ops (loop, loader)", lambda n: n == "ProfilerStep*" or "DataLoader" in n),
    ("conv backward", lambda n: "convolution_backward" in n or "conv" in n and "backward" in n),
    ("conv forward", lambda n: "convolution" in n or "conv2d" in n or "mkldnn_conv" in n),
    ("batchnorm fwd+bwd", lambda n: "batch_norm" in n),
    ("cat / split (densenet)", lambda n: n in ("aten::cat", "aten::split", "aten::slice", "aten::narrow")
     or "cat" in n.split("::")[-1] and "backward" not in n),
    ("relu / threshold", lambda n: "relu" in n or "threshold" in n),
    ("pooling", lambda n: "pool" in n),
    ("linear / matmul", lambda n: n in ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul")),
    ("loss", lambda n: "cross_entropy" in n or "log_softmax" in n or "nll_loss" in n),
    ("optimizer (SGD)", lambda n: "_foreach" in n or "sgd" in n.lower() or "Optimizer" in n),
    ("dtype casts / copies", lambda n: n in ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone",
                                             "aten::contiguous", "aten::empty_like", "aten::empty_strided")),
    ("elementwise (add/mul/sign/...)", lambda n: n.split("::")[-1].rstrip("_") in (
        "add", "mul", "div", "sub", "sign", "addcmul", "fill", "zero", "zeros_like", "ones_like", "where",
        "sum", "max", "argmax", "eq", "isfinite", "bitwise_and", "logical_not")),
    ("data (index/gather/pad/flip/randint)", lambda n: any(k in n for k in (
        "gather", "index_select", "pad", "flip", "randint", "randperm", "rand", "stack", "constant_pad"))),
]


def categorise(name: str) -> str:
    for label, pred in CATEGORIES:
        try:
            if pred(name):
                return label
        except Exception:
            pass
    return "other"


def profile_runner(runner: Runner, warm: int, active: int) -> dict:
    """Self CPU time per op over `active` steps after `warm` steps, as fractions."""
    from torch.profiler import ProfilerActivity, profile, schedule
    sched = schedule(wait=0, warmup=warm, active=active, repeat=1)
    with profile(activities=[ProfilerActivity.CPU], schedule=sched) as prof:
        if isinstance(runner, FitRunner):
            runner.on_step = prof.step
            try:
                runner.run(1, warm + active)  # its on_progress hook steps the profiler
            finally:
                runner.on_step = None
        else:
            r: Any = runner
            r.model.train()
            r.avg_loss, r.train_acc = 0.0, 0
            for _ in range(warm + active):
                r.step()
                prof.step()
    events = prof.key_averages()
    rows = [(e.key, e.self_cpu_time_total, e.count) for e in events]
    total = sum(t for _, t, _ in rows) or 1.0
    wall = next((e.cpu_time_total for e in events if e.key == "ProfilerStep*"), float("nan"))
    by_cat: dict[str, float] = {}
    for k, t, _ in rows:
        by_cat[categorise(k)] = by_cat.get(categorise(k), 0.0) + t
    top = sorted(rows, key=lambda r: -r[1])[:15]
    return {"total_ms_per_step": total / 1e3 / active, "step_wall_ms": wall / 1e3 / active,
            "categories": {k: v / total for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": k, "self_ms_per_step": t / 1e3 / active, "share": t / total,
                         "calls_per_step": c / active} for k, t, c in top]}


def print_profile(key: str, profs: dict[str, dict], p: Callable[[str], None]) -> None:
    names = list(profs)
    cats: list[str] = []
    for pr in profs.values():
        for c in pr["categories"]:
            if c not in cats:
                cats.append(c)
    p(f"\n  profile {key}: self CPU time per step, by category (ms/step, share)")
    p("    " + f"{'category':<38s}" + "".join(f"{n:>26s}" for n in names))
    for c in cats:
        cells = []
        for n in names:
            pr = profs[n]
            sh = pr["categories"].get(c, 0.0)
            cells.append(f"{sh * pr['total_ms_per_step']:12.1f} ms {100 * sh:6.1f} %   ")
        p("    " + f"{c:<38s}" + "".join(f"{x:>26s}" for x in cells))
    p("    " + f"{'total (= step wall time, profiled)':<38s}"
      + "".join(f"{profs[n]['total_ms_per_step']:12.1f} ms {'':11s}" for n in names))
    for n in names:
        p(f"\n    top ops, {n}:")
        for r in profs[n]["top_ops"][:12]:
            p(f"      {r['op']:<48s} {r['self_ms_per_step']:9.1f} ms/step  {100 * r['share']:5.1f} %"
              f"  {r['calls_per_step']:7.1f} calls/step")


# ------------------------------------------------------------------------------- main

def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vgg-13,resnet-164,densenet-40",
                    help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per variant per round (default per model: "
                         + ", ".join(f"{k} {v[3]}" for k, v in MODELS.items()) + ")")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    ap.add_argument("--warmup", type=int, default=5, help="warm-up steps in a variant's first round (default 5)")
    ap.add_argument("--rewarm", type=int, default=2, help="warm-up steps in later rounds (default 2)")
    ap.add_argument("--threads", default="auto",
                    help="torch intra-op threads; auto (default): torch's default, but 1 when the 1-minute "
                         "load average already exceeds the cpus (see the module docstring)")
    ap.add_argument("--ref-workers", default="auto", choices=["auto", "0", "1"],
                    help="DataLoader workers of the reference; auto measures 0 and 1 on vgg-13 "
                         "(or the first model) and uses the faster one (default)")
    ap.add_argument("--no-ablation", action="store_true", help="skip the vgg-13 ablation variants")
    ap.add_argument("--compile", action="store_true", help="also netslim with torch.compile on vgg-13 "
                    "(compiled into a fresh TORCHINDUCTOR_CACHE_DIR, so the first step shows a cold compile)")
    ap.add_argument("--compile-cache", action="store_true",
                    help="with --compile: keep inductor's usual on-disk cache (a warm second run)")
    ap.add_argument("--profile", default="", help="comma-separated models to profile (e.g. resnet-164,densenet-40)")
    ap.add_argument("--profile-steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    ap.add_argument("--json", default=None, help="write all figures to this file")
    args = ap.parse_args(argv)

    load_before = os.getloadavg()[0]
    ncpu = len(os.sched_getaffinity(0))
    if args.threads == "auto":
        threads_note = "auto"
        if load_before > ncpu and torch.get_num_threads() > 1:
            torch.set_num_threads(1)
            threads_note = (f"auto -> 1: load {load_before:.1f} > {ncpu} cpus (on a busy machine a multi-threaded "
                            "step stalls on descheduled OpenMP threads; --threads N to override)")
    else:
        try:
            n = int(args.threads)
        except ValueError:
            ap.error(f"--threads {args.threads!r}: use an integer or auto")
        if n < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(n)
        threads_note = "set by --threads"
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    prof_keys = [k.strip() for k in args.profile.split(",") if k.strip()]
    unknown += [k for k in prof_keys if k not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}: use {', '.join(MODELS)}")
    if args.rounds < 1 or args.warmup < 1 or args.rewarm < 1 or (args.steps is not None and args.steps < 1):
        ap.error("--rounds, --warmup, --rewarm and --steps must be >= 1")

    def p(s: str = "") -> None:
        print(s, flush=True)

    t_all = time.perf_counter()
    env = environment(torch.get_num_threads())
    env["threads_choice"] = threads_note
    p(f"torch {env['torch']}, python {env['python']}, {env['cpu_model']}")
    p(f"cpus: os.cpu_count {env['cpu_count']}, affinity {env['affinity']}; torch threads {env['torch_threads']}, "
      f"interop {env['interop_threads']}; OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, "
      f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}")
    p(f"cpu bf16: {env['cpu_bf16']} -> resolve_amp('auto') = {env['amp_auto']}")
    la = env["load_avg"]
    p(f"load average at start: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
    p(f"threads: {threads_note}")
    if la[0] > env["affinity"] and env["torch_threads"] > 1:
        p(f"WARNING: load {la[0]:.1f} > {env['affinity']} cpus with {env['torch_threads']} threads: OpenMP "
          "threads wait on descheduled siblings; measured here, that made a 2-thread step 2-3x slower than a "
          "1-thread one and the bf16 path slower than fp32 (OMP_WAIT_POLICY=PASSIVE does not cure it). "
          "Use --threads 1 on a busy machine")
    p(f"batch {BATCH}, {N_TRAIN} random uint8 3x32x32 images; {args.rounds} interleaved rounds, "
      f"warm-up {args.warmup} (then {args.rewarm}) steps; medians")

    tmp_cache = None
    if args.compile and not args.compile_cache:
        import tempfile
        tmp_cache = tempfile.mkdtemp(prefix="bench_train_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp_cache  # read when inductor first compiles
    data = make_data()
    out: dict[str, Any] = {"environment": env, "batch_size": BATCH, "rounds": args.rounds,
                           "warmup": args.warmup, "rewarm": args.rewarm, "models": {}}
    ref_workers: Optional[int] = None if args.ref_workers == "auto" else int(args.ref_workers)
    first = True
    for key in keys:
        arch, depth, s, default_steps = MODELS[key]
        steps = args.steps or default_steps
        base = fresh_model(key)
        runners: list[Runner] = []
        ablate = key == "vgg-13" and not args.no_ablation
        probe_workers = first and ref_workers is None
        ref_names: list[str] = []
        for w in ((0, 1) if probe_workers else (ref_workers if ref_workers is not None else 0,)):
            runners.append(ReferenceRunner(f"reference (workers={w})", copy.deepcopy(base), data, s, w))
            ref_names.append(runners[-1].name)
        runners.append(FitRunner("netslim", copy.deepcopy(base), data, s))
        if ablate:
            runners.append(ReferenceRunner("reference, no loading", copy.deepcopy(base), data, s, None))
            runners.append(FitRunner("netslim fp32 NCHW", copy.deepcopy(base), data, s, amp="off",
                                     channels_last=False))
            runners.append(FitRunner("netslim fp32 +CL", copy.deepcopy(base), data, s, amp="off",
                                     channels_last=True))
        if args.compile and key == "vgg-13":
            runners.append(FitRunner("netslim +compile", copy.deepcopy(base), data, s, compile=True))
        p(f"\n== {key}: {len(runners)} variants x {args.rounds} rounds x {steps} timed steps "
          f"(load {os.getloadavg()[0]:.2f})")
        t0 = time.perf_counter()
        res = interleave(runners, args.rounds, args.warmup, args.rewarm, steps, lambda s_: p(s_))
        for r in runners:
            if isinstance(r, ReferenceRunner):
                r.close()
        meds = {n: med([x["img_s"] for x in v]) for n, v in res.items()}
        if probe_workers:
            best = max(ref_names, key=lambda n: meds[n])
            ref_workers = 0 if best.endswith("=0)") else 1
            p(f"  reference DataLoader: workers=0 {meds[ref_names[0]]:.1f} img/s, workers=1 "
              f"{meds[ref_names[1]]:.1f} img/s -> using workers={ref_workers} (the faster) as the reference")
        ref_name = f"reference (workers={ref_workers if ref_workers is not None else 0})"
        entry: dict[str, Any] = {
            "arch": arch, "depth": depth, "s": s, "timed_steps_per_round": steps,
            "reference_workers": ref_workers, "reference_img_s": meds[ref_name], "netslim_img_s": meds["netslim"],
            "ratio": median_ratio(res, "netslim", ref_name), "target": TARGETS[key],
            "ratio_per_round": [a["img_s"] / b["img_s"] for a, b in zip(res["netslim"], res[ref_name])],
            "variants_img_s": meds, "rounds": res, "seconds": time.perf_counter() - t0,
        }
        entry["met"] = entry["ratio"] >= entry["target"]
        if ablate:
            entry["ablation"] = {
                n: {"img_s": meds[n], "vs_reference": median_ratio(res, n, ref_name)}
                for n in [ref_name, "reference, no loading", "netslim fp32 NCHW", "netslim fp32 +CL", "netslim"]}
        if "netslim +compile" in res:
            cr = next(r for r in runners if r.name == "netslim +compile")
            er = next(r for r in runners if r.name == "netslim")
            assert isinstance(cr, FitRunner) and isinstance(er, FitRunner)
            entry["compile"] = {
                "img_s": meds["netslim +compile"],
                "vs_netslim_eager": median_ratio(res, "netslim +compile", "netslim"),
                "vs_reference": median_ratio(res, "netslim +compile", ref_name),
                "first_step_s_first_call": cr.first_step_s[0],
                "first_step_s_later_calls": cr.first_step_s[1:],
                "eager_first_step_s": er.first_step_s[0],
            }
        busy = sum(1 for v in res.values() for x in v if x["load1"] > ncpu)
        if torch.get_num_threads() > 1 and busy:
            entry["busy_runs"] = busy
            p(f"  WARNING: the load average exceeded {ncpu} cpus after {busy} of "
              f"{sum(len(v) for v in res.values())} runs of {key} at {torch.get_num_threads()} threads; those "
              "figures are stall-bound, not code-bound: rerun with --threads 1 (see the docstring)")
        out["models"][key] = entry
        first = False
        p(f"  {key}: reference {entry['reference_img_s']:.1f} img/s, netslim {entry['netslim_img_s']:.1f} img/s, "
          f"ratio {entry['ratio']:.2f}x ({entry['seconds']:.0f} s)")

    # ---- tables
    p(f"\nTraining throughput, batch {BATCH}, data loading + augmentation included "
      f"(median of {args.rounds} interleaved rounds)")
    p(f"{'model':<12s} {'reference img/s':>16s} {'netslim img/s':>14s} {'ratio':>7s} {'(rounds)':>13s} "
      f"{'target':>7s}  met?")
    for key, e in out["models"].items():
        rr = e["ratio_per_round"]
        p(f"{key:<12s} {e['reference_img_s']:16.1f} {e['netslim_img_s']:14.1f} {e['ratio']:6.2f}x "
          f"{min(rr):5.2f}-{max(rr):.2f}x {e['target']:6.1f}x  {'yes' if e['met'] else 'NO'}")
    p(f"reference: seed-style Dataset + DataLoader(num_workers={ref_workers}), fp32, NCHW, Python-loop BN L1; "
      f"netslim: fit() = BatchLoader + {env['amp_auto']} autocast + channels_last + BNSparsity")
    if "vgg-13" in out["models"] and "ablation" in out["models"]["vgg-13"]:
        p("\nAblation, vgg-13 (img/s; ratio to the reference, median of per-round ratios)")
        for n, a in out["models"]["vgg-13"]["ablation"].items():
            p(f"  {n:<28s} {a['img_s']:8.1f} img/s  {a['vs_reference']:5.2f}x")
    if "vgg-13" in out["models"] and "compile" in out["models"]["vgg-13"]:
        c = out["models"]["vgg-13"]["compile"]
        later = ", ".join(f"{x:.1f}" for x in c["first_step_s_later_calls"])
        cold = "cold cache" if tmp_cache is not None else "inductor's on-disk cache as found"
        p(f"\ntorch.compile, vgg-13: first step {c['first_step_s_first_call']:.1f} s (compilation included, {cold}; "
          f"eager first step {c['eager_first_step_s']:.1f} s; first step of later fit() calls: {later} s)")
        p(f"  steady state {c['img_s']:.1f} img/s = {c['vs_netslim_eager']:.2f}x netslim eager, "
          f"{c['vs_reference']:.2f}x the reference")

    if prof_keys:
        out["profiles"] = {}
        for key in prof_keys:
            _, _, s, _ = MODELS[key]
            base = fresh_model(key)
            w = ref_workers if ref_workers is not None else 0
            profs = {
                "reference": profile_runner(ReferenceRunner("reference", copy.deepcopy(base), data, s, w),
                                            2, args.profile_steps),
                "netslim": profile_runner(FitRunner("netslim", copy.deepcopy(base), data, s), 2, args.profile_steps),
            }
            out["profiles"][key] = profs
            print_profile(key, profs, p)

    if tmp_cache is not None:
        import shutil
        shutil.rmtree(tmp_cache, ignore_errors=True)
    la = os.getloadavg()
    out["load_avg_end"] = list(la)
    out["total_seconds"] = time.perf_counter() - t_all
    p(f"\nload average at end: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; total {out['total_seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
        p(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
