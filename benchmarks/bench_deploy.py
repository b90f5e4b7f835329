"""Dense vs slim where users deploy: torch eager, torch optimize_for_inference, onnxruntime.

    python benchmarks/bench_deploy.py [--models vgg-13,resnet-164,densenet-40,mobilenetv2]
                                      [--batch 1,64] [--threads 1,all] [--runtimes eager,optimized,onnxruntime]
                                      [--rounds N] [--per-turn N] [--round-to K|auto] [--json OUT] [--quick]
    python benchmarks/bench_deploy.py --target-latency 0.5 --batch 1 [--models ...]

For each (model, percent) it builds the dense model (3x32x32 input, 10 classes), sets its BN
factors like a sparsity-trained model's (bench_inference.emulate_sparsity: skewed, with a
per-layer spread), prunes it with `netslim.prune(model, percent)` and times dense and slim
interleaved (turns of dense, slim, dense, ...: load from other processes hits both alike) in
each runtime, per batch size and thread count. At batch <= 8 a turn is one untimed forward
and 4 timed ones (--per-turn): a model's weights are then in the caches as when it runs
alone (what `netslim profile` times); timed one call per turn, each forward would first
reload what the other model evicted (dense VGG-13's 38 MB of weights overflow this CPU's
32 MiB L3, the slim model's 15 MB fit), a cold-cache latency (BENCHMARKS.md, Deployment).

  eager        the models as netslim builds them, torch.inference_mode, NCHW;
  optimized    netslim.fuse.optimize_for_inference (channels-last from batch 16);
  onnxruntime  the model as `netslim export --onnx` writes it (odd widths padded to onnxruntime's
               channel block on this CPU, dense and slim alike), in an onnxruntime CPU session
               (intra-op threads = the thread count, sequential, all graph optimisations) -
               profile.forward_runner, the same session `netslim profile --runtime
               onnxruntime` and `prune --target-latency` time.

    speedup = latency(dense) / latency(slim);  ratio = speedup / (MACs(dense) / MACs(slim))

On one thread the latency is the process's CPU time per forward (on a shared machine it
leaves out the time spent waiting for a core; on an idle one it equals the wall time);
with several threads it is the wall time. The figure is the median of the timed calls.
--quick: a tiny model, batch 1 and 4, one thread, 3 rounds (a smoke test, seconds).
"""
from __future__ import annotations

import os

os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")  # as bench_inference: many conv shapes

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import emulate_sparsity, tune_malloc  # noqa: E402

from netslim.fuse import optimize_for_inference  # noqa: E402
from netslim.latency_target import TargetUnreachable  # noqa: E402
from netslim.models import build_model  # noqa: E402
from netslim.padding import resolve_block  # noqa: E402
from netslim.profile import count, forward_runner, release, timed_turn  # noqa: E402
from netslim.engine.prune import prune  # noqa: E402

# label -> (build_model arguments, percents): the table
MODELS: dict[str, tuple[dict, tuple[float, ...]]] = {
    "vgg-13": ({"name": "vgg", "depth": 13}, (0.4, 0.7)),
    "resnet-164": ({"name": "resnet", "depth": 164}, (0.4, 0.6)),
    "densenet-40": ({"name": "densenet", "depth": 40}, (0.4, 0.6)),
    "mobilenetv2": ({"name": "mobilenetv2"}, (0.4,)),
}
QUICK = {"vgg-11 x0.125": ({"name": "vgg", "depth": 11, "width": 0.125}, (0.5,))}
RUNTIMES = ("eager", "optimized", "onnxruntime")
INPUT = (3, 32, 32)


def runner(model: nn.Module, runtime: str, batch: int) -> Callable[[], Any]:
    """One forward of `model` at `batch` in `runtime`, prepared once (torch's threads: the caller's)."""
    if runtime == "onnxruntime":
        return forward_runner(model, INPUT, batch, runtime="onnxruntime")
    if runtime == "optimized":
        nhwc = batch >= 16  # oneDNN's NHWC kernels pay off from a few images per batch up
        model = optimize_for_inference(model, channels_last=nhwc)
        x = torch.randn(batch, *INPUT, generator=torch.Generator().manual_seed(batch))
        x = x.contiguous(memory_format=torch.channels_last) if nhwc else x

        def run() -> None:
            with torch.inference_mode():
                model(x)
        return run
    return forward_runner(model, INPUT, batch, runtime="torch")


def interleaved_ms(fns: list[Callable[[], Any]], rounds: int, cpu_clock: bool, warmup: int = 2,
                   per_turn: int = 1) -> list[float]:
    """Median ms per call of each fn over `rounds` round-robin rounds. `per_turn` > 1: each
    turn runs its fn once untimed, then times `per_turn` calls in a row, so every timed call
    finds that model's own weights in the caches (steady state, as `netslim profile` times a
    model alone); `per_turn` 1 times each call right after the other model's (cold caches)."""
    clock = time.process_time if cpu_clock else time.perf_counter
    times: list[list[float]] = [[] for _ in fns]
    for f in fns:
        release(f)   # a runner holding threads runs only in its turn (profile.timed_turn)
    for f in fns:
        for _ in range(warmup):
            timed_turn(f, clock)
    for _ in range(rounds):
        for i, f in enumerate(fns):
            times[i] += timed_turn(f, clock, per_turn)
    return [statistics.median(t) * 1e3 for t in times]


def latency_targets(models: dict, names: list[str], target: float, batch: int, seed: int, round_to: Any,
                    json_out: Optional[str]) -> int:
    """prune(target_latency=...) in onnxruntime per model, then an independent re-measurement."""
    torch.set_num_threads(1)
    rows = []
    for name in names:
        arch = dict(models[name][0])
        dense = emulate_sparsity(build_model(arch.pop("name"), num_classes=10, **arch), seed=seed).eval()
        t0 = time.perf_counter()
        try:
            slim, report = prune(dense, target_latency=target, runtime="onnxruntime", batch_size=batch,
                                 threads=1, round_to=round_to)
        except TargetUnreachable as e:
            rows.append({"model": name, "target": target, "reached": False, "closest": e.closest, "message": str(e)})
            print(f"{name:13s} target {target:g}: {e}", flush=True)
            continue
        seconds = time.perf_counter() - t0
        lt = report["latency_target"]
        d, s = interleaved_ms([runner(dense, "onnxruntime", batch), runner(slim, "onnxruntime", batch)], 40,
                              cpu_clock=True, per_turn=4 if batch <= 8 else 1)   # as the search times
        row = {"model": name, "target": target, "reached": True, "percent": lt["percent"],
               "search_ratio": lt["ratio"], "timings": len(lt["probes"]), "search_seconds": seconds,
               "recheck_dense_ms": d, "recheck_slim_ms": s, "recheck_ratio": s / d}
        rows.append(row)
        print(f"{name:13s} target {target:g} onnxruntime b{batch}: percent {lt['percent']:.3f}, search confirmed "
              f"{lt['ratio']:.3f} ({len(lt['probes'])} timings, {seconds:.0f} s); re-measured {s / d:.3f} "
              f"({s:.2f} / {d:.2f} ms)", flush=True)
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--percents", default=None, help="comma list overriding each model's percents")
    ap.add_argument("--batch", default="1,64", help="comma list of batch sizes (default 1,64)")
    ap.add_argument("--threads", default="1,all", help="comma list of thread counts; all = os.cpu_count()")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"comma list of {', '.join(RUNTIMES)}")
    ap.add_argument("--rounds", type=int, default=7, help="round-robin rounds (default 7)")
    ap.add_argument("--per-turn", type=int, default=None, metavar="N",
                    help="calls timed per model per turn, after one untimed call (default 4 at batch <= 8, "
                         "else 1); 1: each call right after the other model's, no untimed call (cold caches)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the emulated BN factors")
    ap.add_argument("--json", default=None, help="write every figure to this file")
    ap.add_argument("--round-to", default="1", metavar="K|auto",
                    help="prune(..., round_to=K); auto measures widths in onnxruntime at --auto-batch")
    ap.add_argument("--auto-batch", type=int, default=None, help="batch size --round-to auto measures at "
                    "(default: the largest of --batch)")
    ap.add_argument("--target-latency", type=float, default=None, metavar="F",
                    help="instead of the table: prune(target_latency=F, runtime='onnxruntime', batch_size=first "
                         "of --batch) per model on one thread, then time the result again, separately")
    ap.add_argument("--quick", action="store_true", help="a tiny model, batch 1,4, one thread, 3 rounds")
    args = ap.parse_args(argv)

    models = QUICK if args.quick else MODELS
    names = list(models) if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    if any(n not in models for n in names):
        ap.error(f"--models takes {', '.join(models)}")
    batches = [1, 4] if args.quick else [int(b) for b in args.batch.split(",")]
    threads = [1] if args.quick else [os.cpu_count() or 1 if t == "all" else int(t) for t in args.threads.split(",")]
    rounds = 3 if args.quick else args.rounds
    runtimes = [r.strip() for r in args.runtimes.split(",")]
    if any(r not in RUNTIMES for r in runtimes):
        ap.error(f"--runtimes takes {', '.join(RUNTIMES)}")
    tune_malloc()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    import onnxruntime
    round_to: Any = "auto" if args.round_to == "auto" else int(args.round_to)
    header = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "load_1min_at_start": load, "gamma_seed": args.seed, "rounds": rounds, "per_turn": args.per_turn or "4 at batch <= 8, else 1", "round_to": round_to,
              "onnx_pad_channels": resolve_block("auto")}
    print("# " + ", ".join(f"{k}={v}" for k, v in header.items()), flush=True)
    if args.target_latency is not None:
        return latency_targets(models, names, args.target_latency, batches[0], args.seed, round_to, args.json)
    rows: list[dict] = []
    for name in names:
        arch, percents = models[name]
        if args.percents and not args.quick:
            percents = tuple(float(p) for p in args.percents.split(","))
        arch = dict(arch)
        dense = emulate_sparsity(build_model(arch.pop("name"), num_classes=10, **arch), seed=args.seed).eval()
        macs_dense = count(dense, INPUT)["macs"]
        for pct in percents:
            auto = dict(runtime="onnxruntime", batch_size=args.auto_batch or max(batches)) if round_to == "auto" else {}
            slim, _ = prune(dense, pct, round_to=round_to, **auto)
            slim.eval()
            mac_ratio = macs_dense / count(slim, INPUT)["macs"]
            for t in threads:
                torch.set_num_threads(t)
                for bs in batches:
                    per_turn = args.per_turn or (4 if bs <= 8 else 1)
                    for rt in runtimes:
                        # dense and slim in turns, one runtime at a time: torch's OpenMP threads
                        # spin after a forward too, into an onnxruntime turn that followed them
                        # (2 threads, batch 1: slim resnet-164 0.50x dense in onnxruntime, 1.10x alone)
                        d, s = interleaved_ms([runner(dense, rt, bs), runner(slim, rt, bs)], rounds,
                                              cpu_clock=t == 1, per_turn=per_turn)
                        row = {"model": name, "percent": pct, "runtime": rt, "threads": t, "batch": bs,
                               "mac_ratio": mac_ratio, "dense_ms": d, "slim_ms": s, "speedup": d / s,
                               "ratio": d / s / mac_ratio}
                        rows.append(row)
                        print(f"{name:13s} {pct:4.0%} {rt:11s} t{t} bs{bs:<3d} MACs {mac_ratio:5.2f}x  "
                              f"{d:8.2f} / {s:8.2f} ms  speedup {d / s:5.2f}x  ratio {d / s / mac_ratio:.2f}",
                              flush=True)
    try:
        header["load_1min_at_end"] = os.getloadavg()[0]
    except OSError:
        pass
    print()
    print("speed-up (speed-up / MAC ratio); latency: median CPU ms on 1 thread, wall ms on more")
    cols = [(rt, t, bs) for t in threads for rt in runtimes for bs in batches]
    print("| model | MAC ratio | " + " | ".join(f"{rt} t{t} b{bs}" for rt, t, bs in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for name in names:
        for pct in sorted({r["percent"] for r in rows if r["model"] == name}):
            cell = {(r["runtime"], r["threads"], r["batch"]): r for r in rows
                    if r["model"] == name and r["percent"] == pct}
            first = next(iter(cell.values()))
            print(f"| {name} {pct:.0%} | {first['mac_ratio']:.2f}x | " + " | ".join(
                f"{cell[c]['speedup']:.2f}x ({cell[c]['ratio']:.2f})" for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": header, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
