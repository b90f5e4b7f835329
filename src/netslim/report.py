"""A pipeline run's numbers, read back from its checkpoints: results.json, results.md, plots.

    results = collect_results("runs/quick")        # loads every stage's checkpoint
    write_report("runs/quick", results)            # results.md, results.json, plots/*.png
    print(render_table(results))

Where each number comes from (so the report always agrees with the files next to it):
- Top-1 of a training stage: the test top-1 stored in its model_best.pt (the best epoch,
  as the seed's tables report); the last epoch's is in results.json as `final_top1`.
  Top-1 of a prune stage: the pruned model evaluated right after pruning, before
  fine-tuning, stored in its pruned.pt.
- Parameters and FLOPs: profile.count on the model loaded from that checkpoint, one
  [C, H, W] example; FLOPs = 2 x MACs, the seed table's (thop) convention. For mask-mode
  checkpoints the numbers are the effective ones (the model with the masked channels
  removed); the stored tensor count is in results.json as `stored_params`.
- Latency: profile.measure_latency of the loaded model, eval mode, fp32, on the CPU, at
  batch 64 and 1 (median of ~`latency_seconds` of runs), with the thread count recorded.
  When onnxruntime is installed, also the latency of the model as `netslim export` writes
  it (the slim model, for mask-mode checkpoints too) in onnxruntime, same threads.
- The code: `netslim` (version, git commit) of the report's writer at the top, and each
  stage's `netslim` as its checkpoint recorded it (the code that trained or pruned it).

Plots need matplotlib (the `plot` extra); without it the report says they were skipped.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import NetslimError
from .fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl
from .provenance import provenance
from .sparsity import abs_gammas, gamma_summary

log = logging.getLogger(__name__)

__all__ = ["collect_results", "write_report", "render_table", "format_params", "format_flops",
           "RESULTS_FORMAT", "LATENCY_BATCHES"]

RESULTS_FORMAT = "netslim-pipeline-results/1"
LATENCY_BATCHES = (64, 1)
PLOTS_DIR = "plots"
# what a sparsity epoch records besides top-1 and loss (fit's metrics.jsonl): kept in the curve
_SPARSITY_CURVE_KEYS = ("s", "frac_gamma_below_1e-2")


# --------------------------------------------------------------------------- collecting


def _effective_model(model: torch.nn.Module, meta: dict) -> torch.nn.Module:
    """The model a mask-mode checkpoint stands for: masked channels physically removed."""
    from .engine.trace import example_input
    from .engine.slim import apply_plan
    mask = meta.get("mask") or {}
    if not mask:
        return model
    return apply_plan(model, mask, example_input(meta.get("input_size"), model)).eval()


def _stage_label(stage: Any, s: "float | str") -> str:
    """Column header in the seed's style: "Sparsity (1e-4)", "Prune (50%)", "Fine-tune (50%)";
    "Sparsity (s auto)" when the autopilot chose s."""
    from .pipeline import percent_label
    suffix = f", pass {stage.pass_no}" if stage.pass_no > 1 else ""
    if stage.role == "baseline":
        return "Baseline"
    if stage.role == "sparsity":
        strength = "s auto" if s == "auto" else f"{s:.0e}".replace("e-0", "e-")
        return f"Sparsity ({strength}{suffix})"
    name = "Prune" if stage.role == "prune" else "Fine-tune"
    return f"{name} ({percent_label(stage.percent)}%{suffix})"


def collect_results(run_dir: str | os.PathLike, *, latency_seconds: float = 0.5,
                    threads: Optional[int] = None) -> dict:
    """Read every finished stage of the pipeline in `run_dir` and measure its model.

    Returns the results dict that write_report writes (plain JSON types). Stages that have
    not finished are listed with `"done": false` and no numbers. `threads` sets torch's
    intra-op threads for the latency measurements (default: the current setting).
    """
    from .checkpoint import load_checkpoint
    from .pipeline import PIPELINE_NAME, PipelineConfig, plan_stages, read_done
    from .profile import count, measure_latency

    run_dir = Path(run_dir)
    pfile = run_dir / PIPELINE_NAME
    try:
        stored = json.loads(pfile.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise NetslimError(f"{pfile} is missing or unreadable ({e}): {run_dir} is not a pipeline run") from None
    cfg = PipelineConfig.from_dict(stored["config"])
    n_threads = threads if threads is not None else torch.get_num_threads()
    # The onnxruntime columns need the exporter (onnx) as well as the runtime: with only one of
    # them installed the report leaves the columns out instead of failing after the training.
    onnxruntime_here = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
    stages_out: list[dict] = []
    gamma: dict[str, dict] = {}
    for stage in plan_stages(cfg):
        folder = run_dir / stage.key
        row: dict[str, Any] = {"key": stage.key, "label": _stage_label(stage, cfg.s), "role": stage.role,
                               "kind": stage.kind, "pass": stage.pass_no, "percent": stage.percent,
                               "dir": stage.key}
        done = read_done(folder)
        row["done"] = done is not None
        if done is None:
            stages_out.append(row)
            continue
        ckpt = folder / stage.output
        model, meta = load_checkpoint(ckpt)
        metrics = meta.get("metrics") or {}
        row["checkpoint"] = f"{stage.key}/{stage.output}"
        row["netslim"] = meta.get("netslim")  # the code that trained / pruned this stage
        row["top1"] = float(metrics["test_top1"])
        row["top1_source"] = ("best epoch (model_best.pt)" if stage.kind == "train"
                              else "after pruning, before fine-tuning (pruned.pt)")
        row["seconds"] = done.get("seconds")
        if stage.kind == "train":
            history = read_jsonl(folder / "metrics.jsonl")
            row["epochs"] = len(history)
            row["best_epoch"] = metrics.get("epoch")
            row["final_top1"] = float(history[-1]["test_top1"]) if history else None
            row["curve"] = [{"epoch": r["epoch"], "test_top1": r["test_top1"], "train_loss": r["train_loss"],
                             "lr": r["lr"], **{k: r[k] for k in _SPARSITY_CURVE_KEYS if k in r}}
                            for r in history]
        else:
            pr = json.loads((folder / "prune.json").read_text(encoding="utf-8"))
            row["threshold"] = pr.get("threshold")
            row["channels_total"] = pr.get("channels_total")
            row["channels_kept"] = pr.get("channels_kept")
            row["max_layer_percent"] = pr.get("max_layer_percent")
            recal = pr.get("recalibration") or {}
            row["top1_before_recalibration"] = recal.get("top1_before")
            row["recalibration_batches"] = recal.get("batches")
            row["compensated"] = (pr.get("compensation") or {}).get("folded")
            row["layers"] = [{"name": d["name"], "total": d["total"], "kept": d["kept"]} for d in pr.get("layers", [])]
        input_size = [int(v) for v in meta.get("input_size") or []]
        row["input_size"] = input_size
        row["mode"] = meta.get("mode", "dense")
        eff = _effective_model(model, meta)
        c = count(eff, input_size)
        row.update(params=c["params"], macs=c["macs"], flops=c["flops"], effective=eff is not model)
        if eff is not model:
            row["stored_params"] = count(model, input_size)["params"]
        lat = measure_latency(model, input_size, LATENCY_BATCHES, target_seconds=latency_seconds,
                              threads=n_threads) if latency_seconds > 0 else {}
        row["latency_ms"] = {str(b): float(ms) for b, ms in lat.items()}
        if latency_seconds > 0 and onnxruntime_here:
            lat = measure_latency(eff, input_size, LATENCY_BATCHES, target_seconds=latency_seconds,
                                  threads=n_threads, runtime="onnxruntime")
            row["latency_onnxruntime_ms"] = {str(b): float(ms) for b, ms in lat.items()}
        if stage.role in ("baseline", "sparsity") and stage.pass_no == 1:
            gamma[stage.role] = gamma_summary(model)
        stages_out.append(row)

    by_key = {r["key"]: r for r in stages_out}
    base = by_key.get("baseline", {})
    summary = []
    for r in stages_out:
        if r["role"] != "finetune" or not r["done"]:
            continue
        entry = {"pass": r["pass"], "percent": r["percent"], "stage": r["key"], "top1": r["top1"],
                 "params": r["params"], "flops": r["flops"]}
        if base.get("done"):
            entry["top1_vs_baseline"] = r["top1"] - base["top1"]
            entry["params_reduction"] = 1 - r["params"] / base["params"]
            entry["flops_reduction"] = 1 - r["flops"] / base["flops"]
            b64, r64 = base["latency_ms"].get("64"), r["latency_ms"].get("64")
            if b64 and r64:
                entry["speedup_batch64"] = b64 / r64
            b64, r64 = (x.get("latency_onnxruntime_ms", {}).get("64") for x in (base, r))
            if b64 and r64:
                entry["speedup_batch64_onnxruntime"] = b64 / r64
        summary.append(entry)
    return {
        "format": RESULTS_FORMAT,
        "netslim": provenance(),  # the code that measured and wrote this report
        "run_dir": str(run_dir),
        "config": cfg.as_dict(),
        "seed": stored.get("seed"),
        "title": _title(cfg),
        "complete": all(r["done"] for r in stages_out),
        "stages": stages_out,
        "summary": summary,
        "gamma": gamma,
        "latency": {"device": "cpu", "dtype": "float32", "threads": n_threads,
                    "runtimes": ["torch", "onnxruntime"] if onnxruntime_here and latency_seconds > 0 else ["torch"],
                    "batch_sizes": list(LATENCY_BATCHES), "seconds_per_measurement": latency_seconds},
        "notes": {
            "top1": "training stages: best test top-1 over the epochs (model_best.pt, as the seed reports; "
                    "final_top1 = last epoch); prune stages: the pruned model right after pruning, before "
                    "fine-tuning (pruned.pt)",
            "flops": "FLOPs = 2 x MACs of one example (the seed table's thop convention; BN and avg-pool counted)",
            "mask": ("mask-mode checkpoints: parameters and FLOPs are effective (masked channels removed); "
                     "latency is of the stored, unsliced model" if cfg.prune_mode == "mask" else None),
        },
    }


def _title(cfg: Any) -> str:
    opts = ", ".join(f"{k} {v}" for k, v in cfg.arch_options.items())
    depth = f"-{cfg.depth}" if cfg.depth is not None else ""
    return f"{cfg.dataset} {cfg.arch}{depth}" + (f" ({opts})" if opts else "")


# --------------------------------------------------------------------------- formatting


def format_params(n: Optional[float]) -> str:
    """9413066 -> "9.41M", 150000 -> "0.15M" (the seed table's unit); below 10k in K."""
    if n is None:
        return "---"
    return f"{n / 1e6:.2f}M" if n >= 1e4 else f"{n / 1e3:.1f}K"


def format_flops(n: Optional[float]) -> str:
    """458532864 -> "0.46G", 28100000 -> "28.1M"."""
    if n is None:
        return "---"
    if n >= 1e8:
        return f"{n / 1e9:.2f}G"
    if n >= 1e5:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}K"


def _ms(v: Optional[float]) -> str:
    if v is None:
        return "---"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _table(title: str, rows: list[dict], threads: int) -> str:
    header = [title] + [r["label"] for r in rows]

    def cells(f) -> list[str]:
        return [f(r) if r.get("done") else "---" for r in rows]

    body = [
        ["Top1 Accuracy (%)"] + cells(lambda r: f"{r['top1']:.2f}"),
        ["Parameters"] + cells(lambda r: format_params(r["params"])),
        ["FLOPs"] + cells(lambda r: format_flops(r["flops"])),
    ]
    if any(r.get("latency_ms") for r in rows):
        for b in LATENCY_BATCHES:
            body.append([f"CPU latency, batch {b} (ms)"] + cells(lambda r, b=b: _ms(r["latency_ms"].get(str(b)))))
    if any(r.get("latency_onnxruntime_ms") for r in rows):
        for b in LATENCY_BATCHES:
            body.append([f"onnxruntime latency, batch {b} (ms)"]
                        + cells(lambda r, b=b: _ms(r.get("latency_onnxruntime_ms", {}).get(str(b)))))
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join([":---:"] * len(header)) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def render_table(results: dict) -> str:
    """The seed-layout tables as Markdown: one for pass 1 (Baseline | Sparsity | Prune | Fine-tune ...),
    one per later pass, and a per-pass summary when there are several passes."""
    threads = results.get("latency", {}).get("threads", 0)
    stages = results["stages"]
    passes = sorted({r["pass"] for r in stages})
    parts = []
    for k in passes:
        rows = [r for r in stages if r["pass"] == k]
        title = results.get("title", "model") if k == 1 else f"pass {k}"
        parts.append(_table(title, rows, threads))
    if len(passes) > 1:
        lines = ["| pass | stage | Top1 Accuracy (%) | vs baseline | Parameters | FLOPs | FLOPs cut |",
                 "| :---: | :---: | :---: | :---: | :---: | :---: | :---: |"]
        base = next((r for r in stages if r["key"] == "baseline" and r.get("done")), None)
        if base:
            lines.append(f"| 0 | baseline | {base['top1']:.2f} | --- | {format_params(base['params'])} | "
                         f"{format_flops(base['flops'])} | --- |")
        main = results["config"]["percents"][0]
        for e in results.get("summary", []):
            if e["percent"] != main:
                continue
            d = e.get("top1_vs_baseline")
            cut = e.get("flops_reduction")
            lines.append(f"| {e['pass']} | {e['stage']} | {e['top1']:.2f} | "
                         f"{'---' if d is None else f'{d:+.2f}'} | {format_params(e['params'])} | "
                         f"{format_flops(e['flops'])} | {'---' if cut is None else f'{100 * cut:.1f}%'} |")
        parts.append(lines[0] + "\n" + "\n".join(lines[1:]))
    return "\n\n".join(parts)


def _autopilot_note(row: dict, target: Optional[float]) -> str:
    """The s the autopilot chose per epoch and the share of small factors it reached."""
    curve = row.get("curve") or []
    s = ", ".join(f"{r['s']:.2g}" for r in curve if "s" in r)
    share = [100 * r["frac_gamma_below_1e-2"] for r in curve if "frac_gamma_below_1e-2" in r]
    aim = f", target {100 * target:g}% of |gamma| under 1e-2" if target is not None else ""
    return (f"- {row['key']}: s auto{aim}. s at the start of each epoch {s}; share of |gamma| under 1e-2 after each epoch "
            f"{', '.join(f'{v:.1f}' for v in share)}%" + (f"; reached {share[-1]:.1f}%." if share else "."))


def _markdown(results: dict, plots: list[str], skipped: Optional[str]) -> str:
    cfg = results["config"]
    lat = results["latency"]
    ep = cfg["epochs"]
    lines = [f"# Network Slimming: {results['title']}", ""]
    if not results.get("complete"):
        lines += ["**Incomplete run**: stages marked --- have not finished.", ""]
    lines += [render_table(results), ""]
    lines += ["Notes:", "",
              f"- Top-1: {results['notes']['top1']}.",
              f"- Parameters and FLOPs: netslim.profile.count of the checkpoint's model; "
              f"{results['notes']['flops']}."]
    if results["notes"].get("mask"):
        lines.append(f"- {results['notes']['mask']}.")
    if lat.get("seconds_per_measurement"):
        lines.append(f"- CPU latency: median ms of one eval-mode {lat['dtype']} forward, {lat['threads']} "
                     f"thread(s), ~{lat['seconds_per_measurement']:g} s of runs per figure; rough when the "
                     "machine is shared."
                     + (" onnxruntime: the model as `netslim export --onnx` writes it, in an onnxruntime CPU "
                        "session with the same threads." if "onnxruntime" in lat.get("runtimes", []) else ""))
    for r in results["stages"]:
        if r["role"] == "sparsity" and cfg["s"] == "auto" and r.get("done"):
            lines.append(_autopilot_note(r, cfg["train_overrides"].get("target_sparsity")))
        if r.get("top1_before_recalibration") is not None:
            lines.append(f"- {r['key']}: top-1 {r['top1_before_recalibration']:.2f}% right after pruning"
                         + (f" ({r['compensated']} removed channels' constants folded)" if r.get("compensated") else "")
                         + f", {r['top1']:.2f}% after BN recalibration on {r['recalibration_batches']} batches "
                         "(the table's figure).")
    opts = "".join(f" {k} {v}" for k, v in (cfg["arch_options"] or {}).items())
    lines.append(f"- Recipe: {cfg['dataset']}, {cfg['arch']}"
                 f"{'-' + str(cfg['depth']) if cfg['depth'] is not None else ''}{opts}, "
                 f"SGD lr {cfg['lr']:g} (/10 at 50% and 75%), batch {cfg['batch_size']}, epochs baseline "
                 f"{ep['baseline']} / sparsity {ep['sparsity']} / fine-tune {ep['finetune']}, "
                 f"s {cfg['s'] if cfg['s'] == 'auto' else format(cfg['s'], 'g')}, "
                 f"prune {', '.join(f'{100 * p:g}%' for p in cfg['percents'])} ({cfg['prune_mode']})"
                 + (f", {cfg['passes']} passes" if cfg["passes"] > 1 else "")
                 + ("" if cfg.get("compensate", True) else ", no compensation")
                 + (", distilled from the sparsity model" if cfg.get("distill") else "")
                 + (", Scratch-B retraining" if cfg.get("retrain") == "scratch-b" else "")
                 + f", seed {results.get('seed')}.")
    if results.get("summary"):
        lines += ["", "Fine-tuned vs baseline:", ""]
        for e in results["summary"]:
            if "top1_vs_baseline" not in e:
                continue
            sp = f", {e['speedup_batch64']:.2f}x faster at batch 64" if e.get("speedup_batch64") else ""
            if e.get("speedup_batch64_onnxruntime"):
                sp += f" ({e['speedup_batch64_onnxruntime']:.2f}x in onnxruntime)"
            lines.append(f"- {e['stage']}: top-1 {e['top1_vs_baseline']:+.2f} points, "
                         f"{100 * e['params_reduction']:.1f}% fewer parameters, "
                         f"{100 * e['flops_reduction']:.1f}% fewer FLOPs{sp}")
    lines += [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    elif skipped:
        lines += [f"Plots skipped: {skipped}.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _bn_abs_gammas(path: Path) -> Optional[torch.Tensor]:
    from .checkpoint import load_checkpoint
    if not path.exists():
        return None
    model, _ = load_checkpoint(path)
    return abs_gammas(model)


def _plots(run_dir: Path, results: dict) -> list[str]:
    """Write the PNGs; returns their paths relative to run_dir. Raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    out_dir = run_dir / PLOTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    stages = {r["key"]: r for r in results["stages"]}

    def save(fig: Any, name: str) -> None:
        import io
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out_dir / name, buf.getvalue())
        written.append(f"{PLOTS_DIR}/{name}")

    # 1. |gamma| after baseline vs after sparsity, log-scale x: the L1 term should push a mass
    # of factors towards zero, which is what makes one global threshold work.
    g = {k: _bn_abs_gammas(run_dir / k / "model_best.pt") for k in ("baseline", "sparsity")
         if stages.get(k, {}).get("done")}
    g = {k: v for k, v in g.items() if v is not None and v.numel()}
    if g:
        floor = 1e-6  # |gamma| can be exactly 0; log bins need a positive floor
        lo = max(floor, min(float(v.clamp_min(floor).min()) for v in g.values()))
        hi = max(float(v.max()) for v in g.values()) * 1.05
        bins = torch.logspace(math.log10(lo), math.log10(max(hi, lo * 10)), 60).numpy()
        fig, ax = plt.subplots(figsize=(7, 4))
        for k, v in g.items():
            ax.hist(v.clamp_min(floor).numpy(), bins=bins, alpha=0.55, label=stages[k]["label"])
        for r in results["stages"]:
            if r["role"] == "prune" and r["pass"] == 1 and r.get("done") and r.get("threshold"):
                ax.axvline(r["threshold"], ls="--", lw=1, color="k")
                ax.text(r["threshold"], ax.get_ylim()[1] * 0.95, f" {r['label']}", rotation=90, va="top", fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("|gamma| (BatchNorm scaling factor)")
        ax.set_ylabel("channels")
        ax.set_title("BN scaling factors: baseline vs sparsity training")
        ax.legend()
        save(fig, "gamma_hist.png")

    # 2. kept channels per layer, one panel per prune stage
    prunes = [r for r in results["stages"] if r["role"] == "prune" and r.get("done") and r.get("layers")]
    if prunes:
        fig, axes = plt.subplots(len(prunes), 1, figsize=(max(7, 0.35 * len(prunes[0]["layers"]) + 2),
                                                          2.6 * len(prunes)), squeeze=False)
        for ax, r in zip(axes[:, 0], prunes):
            names = [d["name"] for d in r["layers"]]
            x = list(range(len(names)))
            ax.bar(x, [d["total"] for d in r["layers"]], color="#cccccc", label="total")
            ax.bar(x, [d["kept"] for d in r["layers"]], color="#3b75af", label="kept")
            ax.set_title(f"{r['label']}: {r['channels_kept']} of {r['channels_total']} channels kept", fontsize=9)
            ax.set_ylabel("channels")
            ax.set_xticks(x)
            ax.set_xticklabels(names, rotation=60, ha="right", fontsize=6)
            ax.legend(fontsize=7)
        fig.tight_layout()
        save(fig, "kept_channels.png")

    # 3. test top-1 per epoch of every training stage
    trains = [r for r in results["stages"] if r["kind"] == "train" and r.get("done") and r.get("curve")]
    if trains:
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in trains:
            ax.plot([c["epoch"] for c in r["curve"]], [c["test_top1"] for c in r["curve"]], marker="o", ms=3,
                    label=r["label"])
        ax.set_xlabel("epoch (of the stage)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title("Test accuracy per epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "accuracy.png")
    return written


# --------------------------------------------------------------------------- writing


def write_report(run_dir: str | os.PathLike, results: dict) -> dict:
    """Write results.json, results.md and plots/*.png into `run_dir`.

    Returns {"markdown", "json", "plots": [paths], "plots_skipped": reason or None}; the
    same dict is stored in results.json under "report". Without matplotlib the plots are
    skipped with a logged warning and the reason in that dict and in results.md.
    """
    run_dir = Path(run_dir)
    plots: list[str] = []
    skipped: Optional[str] = None
    try:
        plots = _plots(run_dir, results)
    except ImportError:
        skipped = "matplotlib is not installed (pip install 'netslim[plot]')"
        log.warning("plots skipped: %s", skipped)
    files = {"markdown": str(run_dir / "results.md"), "json": str(run_dir / "results.json"),
             "plots": [str(run_dir / p) for p in plots], "plots_skipped": skipped}
    atomic_write_json(run_dir / "results.json", {**results, "report": files})
    atomic_write_text(run_dir / "results.md", _markdown(results, plots, skipped))
    return files
