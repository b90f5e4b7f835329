"""Accuracy after pruning and after recovery (issue 15's "Must show"), with the CLI and library.

    # a pipeline run first (its baseline/ and sparsity/ are what the steps below read):
    netslim --threads 1 pipeline --preset quick --save runs/quick
    python benchmarks/bench_recovery.py prune --checkpoint runs/quick/sparsity/model_best.pt
    python benchmarks/bench_recovery.py recover --run runs/quick --percent 0.7 --seeds 0 1 2
    python benchmarks/bench_recovery.py autopilot --run runs/quick --target 0.5

prune: top-1 right after pruning a sparsity-trained checkpoint at each percent, plain (the
seed's: `compensate=False`), compensated, and compensated + BN recalibration on N training
batches (plain + recalibrated too), and what explains what is left: the share of |gamma|
under 1e-2, the layers the threshold would empty (kept by min_channels) or leave with at
most 10% of their channels, and top-1 against the number of recalibration batches.

recover: from the run's prune-P/pruned.pt (the pipeline's compensated + recalibrated model),
`netslim finetune` with the run's fine-tune recipe, per seed: plain, `--distill` (the
sparsity model as teacher) and Scratch-B (`--scratch`, the sparsity stage's epochs as the
dense budget). At most --jobs runs at once, each `nice -n 10 netslim --threads 1`. Finished
runs (a metrics.jsonl with every epoch) are read, not redone. Top-1 is each run's best epoch
(as the seed and the pipeline report), against the run's baseline.

autopilot: sparsity training with the run's sparsity recipe but `--s auto --target-sparsity
Q`; prints s and the share of |gamma| under 1e-2 after each epoch. Its model_best.pt can be
given to `prune` to see whether more sparsity is what a percent needs.

Every subcommand prints a markdown table and, with --json OUT, writes the figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch

from netslim import evaluate, load_checkpoint, load_dataset, prune
from netslim.autopilot import SMALL
from netslim.recalibrate import recalibrate_on_training_data
from netslim.sparsity import abs_gammas

NETSLIM = ["nice", "-n", "10", sys.executable, "-m", "netslim", "--threads", "1"]
METHODS = ("finetune", "distill", "scratch-b")


# --------------------------------------------------------------------------- prune


def _data_of(meta: dict) -> Any:
    opts = meta.get("data_options") or {}
    return load_dataset(meta["dataset"]["name"], data_dir=opts.get("data_dir"), image_size=opts.get("image_size"))


def _top1(model: torch.nn.Module, data: Any) -> float:
    return evaluate(model, data.test_x, data.test_y, data.spec, device="cpu")[1]


def _recalibrated(model: torch.nn.Module, data: Any, batches: int) -> torch.nn.Module:
    recalibrate_on_training_data(model, data, batches, batch_size=128, seed=0)
    return model


def prune_table(checkpoint: Path, percents: list[float], batches: int, sweep: list[int],
                max_layer_percent: Optional[float] = None) -> list[dict]:
    """Top-1 after pruning `checkpoint` at each percent, four ways, with the diagnostics."""
    model, meta = load_checkpoint(checkpoint)
    data = _data_of(meta)
    gammas = abs_gammas(model)
    rows = []
    dense = _top1(model, data)
    for p in percents:
        plain, report = prune(model, p, compensate=False, max_layer_percent=max_layer_percent)
        comp, comp_report = prune(model, p, compensate=True, max_layer_percent=max_layer_percent)
        # the removed channels are those at or under the threshold only when no guard kept any and
        # no coupled group was scored as a whole (a group goes by its factors' mean)
        by_threshold = not report["guarded"] and not report["coupled"]
        live = int(((gammas >= SMALL) & (gammas <= report["threshold"])).sum()) if by_threshold else None
        row = {"percent": p, "threshold": report["threshold"], "dense_top1": dense,
               "max_layer_percent": max_layer_percent, "share_below_small": float((gammas < SMALL).float().mean()),
               "removed_at_or_above_small": live, "removed": report["channels_total"] - report["channels_kept"],
               "plain": _top1(plain, data), "compensated": _top1(comp, data),
               "plain_recalibrated": _top1(_recalibrated(plain, data, batches), data)}
        row["compensated_recalibrated"] = _top1(_recalibrated(comp, data, batches), data)
        row["recalibration_sweep"] = {
            str(n): _top1(_recalibrated(prune(model, p, max_layer_percent=max_layer_percent)[0], data, n), data)
            for n in sweep}
        layers = comp_report["layers"]
        row["at_min_channels"] = [f"{d['name']} ({d['channels_kept']}/{d['channels']})"
                                  for d in layers if d["guard"] == "min_channels"]
        row["thin_layers"] = [f"{d['name']} ({d['channels_kept']}/{d['channels']})" for d in layers
                              if d["channels_kept"] <= 0.1 * d["channels"]]
        rows.append(row)
    # the control: pruning only about the factors under 1e-2, where compensation is nearly exact
    free = float((gammas < SMALL).float().mean())
    if free > 0 and max_layer_percent is None:
        comp, _ = prune(model, free, compensate=True)
        rows.append({"percent": free, "control": True, "dense_top1": dense, "compensated": _top1(comp, data)})
    return rows


def print_prune(rows: list[dict], batches: int) -> None:
    print(f"| percent | threshold | plain | compensated | compensated + recalibrated ({batches}) "
          "| plain + recalibrated |")
    print("|---|---|---|---|---|---|")
    control = [r for r in rows if r.get("control")]
    rows = [r for r in rows if not r.get("control")]
    for r in rows:
        cap = f" (layer cap {r['max_layer_percent']:g})" if r.get("max_layer_percent") is not None else ""
        print(f"| {100 * r['percent']:g}%{cap} | {r['threshold']:.3g} | {r['plain']:.2f} | {r['compensated']:.2f} | "
              f"**{r['compensated_recalibrated']:.2f}** | {r['plain_recalibrated']:.2f} |")
    for r in control:
        print(f"\ncontrol: pruning {100 * r['percent']:.1f}% (the share of |gamma| < {SMALL:g}), compensated, no "
              f"recalibration: {r['compensated']:.2f} (unpruned {r['dense_top1']:.2f})")
    for r in rows:
        sweep = ", ".join(f"{n}: {v:.2f}" for n, v in r["recalibration_sweep"].items())
        live = r["removed_at_or_above_small"]
        live = "n/a (guards or coupled groups)" if live is None else live
        print(f"\n{100 * r['percent']:g}%: unpruned {r['dense_top1']:.2f}; {100 * r['share_below_small']:.1f}% of "
              f"|gamma| < {SMALL:g}; of the {r['removed']} removed channels {live} had |gamma| >= {SMALL:g}; "
              f"compensated + recalibrated by batches {{{sweep}}}; at min_channels: "
              f"{', '.join(r['at_min_channels']) or 'none'}; <= 10% kept: {', '.join(r['thin_layers']) or 'none'}")


# --------------------------------------------------------------------------- recover


def _pipeline_config(run: Path) -> dict:
    return json.loads((run / "pipeline.json").read_text(encoding="utf-8"))["config"]


def _best_top1(save: Path, epochs: Optional[int] = None) -> Optional[float]:
    """The best epoch's top-1 of a finished run in `save` (None if unfinished)."""
    path = save / "metrics.jsonl"
    if not path.exists():
        return None
    history = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    done = (save / "model_best.pt").exists() and history and (epochs is None or len(history) >= epochs)
    return max(r["test_top1"] for r in history) if done else None


def _finetune_argv(run: Path, cfg: dict, pruned: Path, method: str, seed: int, save: Path) -> list[str]:
    epochs = cfg["epochs"]["sparsity"] if method == "scratch-b" else cfg["epochs"]["finetune"]
    argv = [*NETSLIM, "finetune", "--checkpoint", str(pruned),
            "--epochs", str(epochs), "--batch-size", str(cfg["batch_size"]), "--lr", str(cfg["lr"]),
            "--seed", str(seed), "--save", str(save), "--quiet", "--force"]
    subset = cfg["train_overrides"].get("train_subset")
    if subset:
        argv += ["--train-subset", str(subset)]
    if method == "distill":
        argv += ["--distill", str(run / "sparsity" / "model_best.pt")]
    if method == "scratch-b":
        argv += ["--scratch"]
    return argv


def recover_table(run: Path, percent: float, seeds: list[int], methods: list[str], jobs: int,
                  train_subset: Optional[int] = None, pruned: Optional[Path] = None) -> dict:
    cfg = _pipeline_config(run)
    if train_subset:  # a shorter run than the pipeline's fine-tune stage: the same recipe on fewer images
        cfg["train_overrides"]["train_subset"] = train_subset
    label = f"{round(percent * 100, 6):g}"
    pruned = pruned or run / f"prune-{label}" / "pruned.pt"
    out = run / (f"recovery-{label}" + (f"-subset{train_subset}" if train_subset else ""))
    todo, saves = [], {}
    for method in methods:
        for seed in seeds:
            save = out / f"{method}-seed{seed}"
            saves[method, seed] = save
            if _best_top1(save) is None or not (save / "done").exists():
                todo.append((method, seed, _finetune_argv(run, cfg, pruned, method, seed, save)))

    def one(job: tuple) -> None:
        method, seed, argv = job
        print(f"running {method} seed {seed}: {' '.join(argv)}", flush=True)
        subprocess.run(argv, check=True)
        (saves[method, seed] / "done").write_text("finished\n")  # a stopped run is redone, not read

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, todo))
    baseline = _best_top1(run / "baseline")
    table = {"percent": percent, "baseline": baseline, "pruned_top1": _pruned_top1(pruned),
             "train_subset": cfg["train_overrides"].get("train_subset"), "methods": {}}
    for method in methods:
        values = [_best_top1(saves[method, s]) for s in seeds]
        table["methods"][method] = {"seeds": seeds, "top1": values, "mean": statistics.mean(values),
                                    "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    return table


def _pruned_top1(pruned: Path) -> float:
    metrics = load_checkpoint(pruned)[1]["metrics"]   # the pipeline's prune stage / `netslim prune`
    return metrics.get("test_top1", metrics.get("top1"))


def print_recover(t: dict) -> None:
    seeds = next(iter(t["methods"].values()))["seeds"]
    print(f"baseline {t['baseline']:.2f}; pruned at {100 * t['percent']:g}% (compensated + recalibrated) "
          f"{t['pruned_top1']:.2f}; fine-tuned on {t['train_subset'] or 'all the'} training images\n")
    print("| recovery | " + " | ".join(f"seed {s}" for s in seeds) + " | mean (sd) | vs baseline |")
    print("|---|" + "---|" * (len(seeds) + 2))
    for method, m in t["methods"].items():
        print(f"| {method} | " + " | ".join(f"{v:.2f}" for v in m["top1"])
              + f" | {m['mean']:.2f} ({m['sd']:.2f}) | {m['mean'] - t['baseline']:+.2f} |")


# --------------------------------------------------------------------------- autopilot


def autopilot_table(run: Path, target: float, save: Path) -> list[dict]:
    cfg = _pipeline_config(run)
    argv = [*NETSLIM, "train", "--dataset", cfg["dataset"], "--arch", cfg["arch"],
            "--epochs", str(cfg["epochs"]["sparsity"]), "--batch-size", str(cfg["batch_size"]),
            "--lr", str(cfg["lr"]), "-sr", "--s", "auto", "--target-sparsity", str(target),
            "--seed", str(cfg["train_overrides"].get("seed", 0)), "--save", str(save), "--quiet", "--force"]
    if cfg["depth"] is not None:
        argv += ["--depth", str(cfg["depth"])]
    if "width" in cfg["arch_options"]:
        argv += ["--width", str(cfg["arch_options"]["width"])]
    if cfg["train_overrides"].get("train_subset"):
        argv += ["--train-subset", str(cfg["train_overrides"]["train_subset"])]
    if _best_top1(save, cfg["epochs"]["sparsity"]) is None:
        print("running " + " ".join(argv), flush=True)
        subprocess.run(argv, check=True)
    history = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"epoch": r["epoch"], "s": r["s"], "share_below_small": r["frac_gamma_below_1e-2"],
             "test_top1": r["test_top1"]} for r in history]


def print_autopilot(rows: list[dict], target: float) -> None:
    print(f"target: {100 * target:g}% of |gamma| < {SMALL:g}\n")
    print("| epoch | s | share < 1e-2 (%) | test top-1 |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['epoch']} | {r['s']:.2g} | {100 * r['share_below_small']:.1f} | {r['test_top1']:.2f} |")


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune")
    p.add_argument("--checkpoint", type=Path, required=True, help="a sparsity-trained model_best.pt")
    p.add_argument("--percents", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--recalibrate", type=int, default=50, help="batches (the pipeline's default)")
    p.add_argument("--sweep", type=int, nargs="*", default=[10, 50, 200], help="recalibration batches to try")
    p.add_argument("--max-layer-percent", type=float, help="cap every layer's pruned share (the paper's multi-pass)")
    r = sub.add_parser("recover")
    r.add_argument("--run", type=Path, required=True, help="a finished pipeline run folder")
    r.add_argument("--percent", type=float, default=0.7)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--train-subset", type=int, help="fine-tune on the first N images (default: the run's)")
    r.add_argument("--pruned", type=Path, help="the checkpoint to recover (default RUN/prune-P/pruned.pt; e.g. "
                   "`netslim prune --checkpoint RUN/sparsity/model_best.pt --percent P --recalibrate 50`)")
    a = sub.add_parser("autopilot")
    a.add_argument("--run", type=Path, required=True, help="a pipeline run folder (its sparsity recipe)")
    a.add_argument("--target", type=float, default=0.5)
    a.add_argument("--save", type=Path, help="default RUN/autopilot-<target>")
    for s in (p, r, a):
        s.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.command == "prune":
        result: Any = prune_table(args.checkpoint, args.percents, args.recalibrate, args.sweep, args.max_layer_percent)
        print_prune(result, args.recalibrate)
    elif args.command == "recover":
        result = recover_table(args.run, args.percent, args.seeds, args.methods, args.jobs, args.train_subset,
                               args.pruned)
        print_recover(result)
    else:
        save = args.save or args.run / f"autopilot-{args.target:g}"
        result = autopilot_table(args.run, args.target, save)
        print_autopilot(result, args.target)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
