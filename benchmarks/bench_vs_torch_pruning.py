"""netslim vs Torch-Pruning on the same BN-scaled CIFAR models, in one run.

    python benchmarks/bench_vs_torch_pruning.py [--percent 0.4] [--json OUT]
    python benchmarks/bench_vs_torch_pruning.py --zoo [NAME ...] --threads 1   # per-architecture table
    python benchmarks/bench_vs_torch_pruning.py --timing --threads 1           # prune time, side by side
    python benchmarks/bench_vs_torch_pruning.py --timing --steps --threads 1   # ... and where netslim's goes

For each model (pre-activation ResNet-164, DenseNet-40, post-activation ResNet-56,
MobileNetV2; 3x32x32 input, 10 classes) both tools prune the *same* weights at the same
global percent. The BN factors are set like a sparsity-trained model's: heavy-tailed
gammas 0.5*|N(0,1)|**3 from a fixed seed, random betas and running statistics.

Per (model, tool) it reports: success (or the exception), params and FLOPs after (both
counted with netslim.profile.count), the share of BN channels removed, the wall time of
the pruning call, and whether the pruned model's eval outputs equal its *masked
reference*: the original model with gamma and beta of the removed BN channels set to
zero. That is what Network Slimming defines a pruned model to compute. For netslim the
reference is `prune(model, p, mode="mask")`; for Torch-Pruning it is built from the BN
channels Torch-Pruning removed (recovered by matching each surviving (gamma, beta) pair
with the original's). Where Torch-Pruning removed channels that some layer reads *raw*
(not through a removed BN channel: a shortcut, a downsample conv) the reference cannot
express the cut, and the table says so.

Outputs are compared in float64. Where a model has coupled channels (post-activation
residual adds, MobileNetV2's depthwise blocks) netslim also runs with group_score="strict"
besides its default "mean" (strict: a coupled unit goes only when all its factors are small).
"vs paper's rule" counts the BN channels a tool removed although their |gamma| is above
the paper's single global threshold, and those it kept although at or below it.

Torch-Pruning runs twice per model: with BNScaleImportance's defaults (group mean,
per-group mean normalisation) and with raw |gamma| (group max, no normalisation), the
latter being the paper's one global threshold over unnormalised factors.

Torch-Pruning is optional: without it only netslim's rows are printed (exit 0).
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from netslim.engine.analysis import analyze
from netslim.models import build_model
from netslim.profile import count
from netslim.engine.plan import global_threshold
from netslim.engine.prune import prune

MODELS = {  # --models key -> (arch, depth, table label)
    "resnet-164": ("resnet", 164, "resnet-164 (pre-act)"),
    "densenet-40": ("densenet", 40, "densenet-40 (pre-act)"),
    "resnet-56": ("resnet-cifar", 56, "resnet-56 (post-act)"),
    "mobilenetv2": ("mobilenetv2", None, "mobilenetv2"),
}
RTOL = 1e-9  # max |pruned - reference| / max |reference| counted as "equal" (compared in float64)

try:
    import torch_pruning as tp
except ImportError:  # optional: netslim's rows only
    tp = None


# ---------------------------------------------------------------------------------------
# The shared starting point

def make_model(arch: str, depth: Optional[int], seed: int) -> nn.Module:
    """`arch` with init weights and BN state resembling a sparsity-trained model (seeded)."""
    torch.manual_seed(seed)
    return skew(build_model(arch, depth, num_classes=10), seed)


def skew(model: nn.Module, seed: int) -> nn.Module:
    """BN factors like a sparsity-trained model's: heavy-tailed gamma 0.5*|N(0,1)|^3 (seeded)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.weight is not None:
                c = m.num_features
                m.weight.copy_(0.5 * torch.randn(c, generator=g).abs() ** 3)   # heavy tail
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model.eval()


def bn_table(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.weight is not None}


def masked_copy(model: nn.Module, removed: dict[str, list[int]]) -> nn.Module:
    """`model` with gamma and beta of the removed channels zeroed (Network Slimming's pruned model)."""
    ref = copy.deepcopy(model).eval()
    bns = bn_table(ref)
    with torch.no_grad():
        for name, idx in removed.items():
            if idx:
                bns[name].weight[idx] = 0
                bns[name].bias[idx] = 0
    return ref


def compare(a: nn.Module, b: nn.Module, x: torch.Tensor) -> tuple[bool, float]:
    """Eval outputs of copies of a and b in float64 (so a 164-layer net's rounding stays far below RTOL)."""
    a, b = copy.deepcopy(a).double().eval(), copy.deepcopy(b).double().eval()
    with torch.no_grad():  # a model may return a tensor or a list/tuple/dict of them
        ya, yb = torch.utils._pytree.tree_leaves(a(x.double())), torch.utils._pytree.tree_leaves(b(x.double()))
    if [t.shape for t in ya] != [t.shape for t in yb]:
        return False, math.inf
    rel = max(float((u - v).abs().max() / v.abs().max().clamp_min(1e-12)) for u, v in zip(ya, yb))
    return rel <= RTOL, rel


_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def raw_read_producers(model: nn.Module) -> set[str]:
    """Convs/linears whose output some conv/linear (or the model output) reads without a BN between.

    Removing such a producer's channel is not the same as zeroing a BN factor: the raw
    value still reaches that reader in Network Slimming's model (e.g. a pre-activation
    ResNet's residual stream feeding the next stage's downsample conv).
    """
    gm = fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    out = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], _PRODUCERS):
            continue
        seen, todo = set(), list(node.users)
        while todo:
            u = todo.pop()
            if u in seen:
                continue
            seen.add(u)
            if u.op == "output" or (u.op == "call_module" and isinstance(mods[u.target], _PRODUCERS)):
                out.add(node.target)
                break
            if u.op == "call_module" and isinstance(mods[u.target], _BN_TYPES):
                continue   # the BN stands between: masking it cuts this path
            todo.extend(u.users)
    return out


# ---------------------------------------------------------------------------------------
# The two tools

def run_netslim(base: nn.Module, percent: float, x: torch.Tensor, group_score: str = "mean") -> dict[str, Any]:
    x1 = x[:1]
    t0 = time.perf_counter()
    slim, report = prune(base, percent, mode="slim", example_input=x1, group_score=group_score)
    seconds = time.perf_counter() - t0
    masked, _ = prune(base, percent, mode="mask", example_input=x1, group_score=group_score)
    kept = masked.netslim_meta["mask"]
    bns = bn_table(base)
    removed = {n: sorted(set(range(bns[n].num_features)) - set(k)) for n, k in kept.items()}
    ok, rel = compare(slim, masked, x)
    return {"model": slim, "seconds": seconds, "removed": removed, "match": ok, "rel_err": rel,
            "raw_removed": 0, "note": f"coupled groups: {len(report['coupled'])}, "
                                      f"unprunable BNs: {len(report['unprunable'])}"}


def _tp_kept(orig: nn.Module, pruned: nn.Module) -> dict[str, list[int]]:
    """Per BN, the original indices Torch-Pruning kept, by matching (gamma, beta) pairs."""
    new = bn_table(pruned)
    kept = {}
    for name, bn in bn_table(orig).items():
        if name not in new:
            raise RuntimeError(f"Torch-Pruning dropped BN {name}")
        where = {(float(g), float(b)): i for i, (g, b) in enumerate(zip(bn.weight.tolist(), bn.bias.tolist()))}
        if len(where) != bn.num_features:
            raise RuntimeError(f"duplicate (gamma, beta) pairs in {name}: cannot recover TP's choice")
        idx = [where.get((float(g), float(b))) for g, b in zip(new[name].weight.tolist(), new[name].bias.tolist())]
        if None in idx:
            raise RuntimeError(f"Torch-Pruning changed the factors of {name}")
        kept[name] = idx
    return kept


def run_tp(base: nn.Module, percent: float, x: torch.Tensor, variant: str) -> dict[str, Any]:
    x1 = x[:1]
    model = copy.deepcopy(base).eval()
    if variant == "default":
        imp = tp.importance.BNScaleImportance()
    else:  # the paper's rule as closely as TP allows: raw |gamma|, a group goes only if all are small
        imp = tp.importance.BNScaleImportance(group_reduction="max", normalizer=None)
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]  # keep the 10 classes
    pruner_cls = getattr(tp.pruner, "BNScalePruner", None) or tp.pruner.MetaPruner
    params = inspect.signature(pruner_cls.__init__).parameters
    ratio = {"pruning_ratio": percent} if "pruning_ratio" in params else {"ch_sparsity": percent}
    t0 = time.perf_counter()
    pruner = pruner_cls(model, example_inputs=x1, importance=imp, global_pruning=True,
                        ignored_layers=heads, **ratio)
    pruner.step()
    seconds = time.perf_counter() - t0
    model.eval()
    kept = _tp_kept(base, model)
    bns = bn_table(base)
    removed = {n: sorted(set(range(bns[n].num_features)) - set(k)) for n, k in kept.items()}
    # Producer channels TP removed that a layer reads raw: the masked reference cannot express them.
    orig_mods, new_mods = dict(base.named_modules()), dict(model.named_modules())

    def width(m):
        return m.out_channels if hasattr(m, "out_channels") else m.out_features
    raw = {n: width(orig_mods[n]) - width(new_mods[n]) for n in raw_read_producers(base)}
    raw = {n: k for n, k in raw.items() if k}
    ok, rel = compare(model, masked_copy(base, removed), x)
    note = (f"removed {sum(raw.values())} raw-read channels in {len(raw)} convs (e.g. {sorted(raw)[0]}): "
            "not expressible as BN masking" if raw else "")
    return {"model": model, "seconds": seconds, "removed": removed, "match": ok, "rel_err": rel,
            "raw_removed": sum(raw.values()), "note": note}


# ---------------------------------------------------------------------------------------

def row(label: str, tool: str, base: nn.Module, x: torch.Tensor, dense: dict, gather: set[str],
        percent: float, fn, *args) -> dict[str, Any]:
    r: dict[str, Any] = {"model": label, "tool": tool, "ok": False}
    try:
        res = fn(base, percent, x, *args)
    except Exception as err:  # a benchmark row, not library code: record any failure and go on
        r["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        r["traceback"] = traceback.format_exc(limit=3)
        return r
    bns = bn_table(base)
    total = sum(m.num_features for m in bns.values())
    gone = sum(len(v) for v in res["removed"].values())
    # The paper's rule: one threshold over every |gamma|; a channel goes iff |gamma| <= it.
    thr = global_threshold(torch.cat([m.weight.detach().abs() for m in bns.values()]), percent)
    above = below_kept = 0
    for n, m in bns.items():
        g = m.weight.detach().abs()
        out = torch.zeros(m.num_features, dtype=torch.bool)
        out[res["removed"].get(n, [])] = True
        above += int((out & (g > thr)).sum())
        below_kept += int((~out & (g <= thr)).sum())
    g_total = sum(bns[n].num_features for n in gather)
    g_gone = sum(len(res["removed"].get(n, [])) for n in gather)
    after = count(res["model"], example_input=x[:1])
    r.update(ok=True, seconds=round(res["seconds"], 3),
             params=after["params"], flops=after["flops"],
             params_ratio=after["params"] / dense["params"], flops_ratio=after["flops"] / dense["flops"],
             bn_channels_removed=gone, bn_channels_total=total,
             preact_channels_removed=g_gone, preact_channels_total=g_total,
             raw_channels_removed=res["raw_removed"],
             paper_threshold=float(thr), removed_above_threshold=above, kept_at_or_below_threshold=below_kept,
             matches_masked_reference=res["match"], max_rel_err=res["rel_err"], note=res["note"])
    return r


def fmt_table(rows: list[dict], dense: dict[str, dict]) -> str:
    head = ("| model | tool | ok | params after (ratio) | FLOPs after (ratio) | BN ch. removed "
            "| pre-act BN ch. removed | vs paper's rule | prune time (s) | = masked ref. (max rel. err) | notes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, d in dense.items():
        lines.append(f"| {label} | (dense) | - | {d['params'] / 1e6:.3f}M | {d['flops'] / 1e6:.1f}M | - | - | - | - | - | |")
        for r in rows:
            if r["model"] != label:
                continue
            if not r["ok"]:
                lines.append(f"| {label} | {r['tool']} | **no** | - | - | - | - | - | - | - | {r['error']} |")
                continue
            pre = (f"{r['preact_channels_removed']}/{r['preact_channels_total']}"
                   if r["preact_channels_total"] else "n/a (none)")
            eq = "yes" if r["matches_masked_reference"] else "**no**"
            lines.append(
                f"| {label} | {r['tool']} | yes | {r['params'] / 1e6:.3f}M ({r['params_ratio']:.2f}) "
                f"| {r['flops'] / 1e6:.1f}M ({r['flops_ratio']:.2f}) "
                f"| {100 * r['bn_channels_removed'] / r['bn_channels_total']:.1f}% "
                f"({r['bn_channels_removed']}/{r['bn_channels_total']}) | {pre} "
                f"| {r['removed_above_threshold']} / {r['kept_at_or_below_threshold']} | {r['seconds']:.2f} "
                f"| {eq} ({r['max_rel_err']:.1e}) | {r['note']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# --zoo: the engine on CNNs nobody on the team designed (tests/zoo), both tools per percent

ZOO_PERCENTS = (0.3, 0.5, 0.7)


def _zoo():
    """tests/zoo's architectures (written from their papers), importable from the repo root."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from zoo import ZOO
    return ZOO


def zoo_table(seed: int, names: Optional[list[str]] = None) -> str:
    """Per architecture and percent: BN channels removed, params and MACs after, prune time."""
    zoo = _zoo()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 2))
    tools = [("netslim", run_netslim, "mean")] + ([("torch-pruning", run_tp, "default")] if tp else [])
    head = "| model | % | " + " | ".join(f"{t}: BN removed, params, MACs, s" for t, *_ in tools) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in names or sorted(zoo):
        torch.manual_seed(seed)
        base = skew(zoo[name](), seed)
        dense = count(base, example_input=x[:1])
        for p in ZOO_PERCENTS:
            cells = []
            for tool, fn, arg in tools:
                r = row(name, tool, base, x, dense, set(), p, fn, arg)
                if not r["ok"]:
                    cells.append(f"**fails**: {r['error'][:70]}")
                    continue
                eq = "" if r["matches_masked_reference"] or r["raw_channels_removed"] else " (**!= masked**)"
                cells.append(f"{100 * r['bn_channels_removed'] / r['bn_channels_total']:.0f}%, "
                             f"{r['params_ratio']:.2f}, {r['flops_ratio']:.2f}, {r['seconds']:.2f}{eq}")
            lines.append(f"| {name} | {p:.0%} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# --timing: one prune call (analysis + plan + slim) side by side, one thread

def timing_models() -> dict[str, tuple]:
    from zoo.classic import DenseNet
    _zoo()
    return {"resnet-50": lambda: build_model("resnet50", num_classes=1000),
            "densenet-121": lambda: DenseNet((6, 12, 24, 16), 32, num_classes=1000, imagenet_stem=True),
            "mobilenetv2": lambda: build_model("mobilenetv2", num_classes=1000)}


def timing_table(seed: int, repeats: int = 5, steps: bool = False) -> str:
    """Best of `repeats` interleaved calls per tool; the ratio is netslim / Torch-Pruning.
    steps: also print where netslim's call spends its time (prune_steps)."""
    _zoo()
    # compensate=False: the same work as Torch-Pruning's pruner (no folding of removed channels'
    # constants); the default call compensates, which Torch-Pruning does not do.
    lines = ["| model | input | netslim (s) | torch-pruning (s) | ratio | netslim compensate=False (s) | ratio |",
             "|---|---|---|---|---|---|---|"]
    for name, make in timing_models().items():
        for size in (224, 32):
            torch.manual_seed(seed)
            base = skew(make(), seed)
            x = torch.randn(1, 3, size, size)
            best = {"netslim": math.inf, "torch-pruning": math.inf, "plain": math.inf}
            for _ in range(repeats):
                t0 = time.perf_counter()
                prune(base, 0.5, example_input=x)
                best["netslim"] = min(best["netslim"], time.perf_counter() - t0)
                t0 = time.perf_counter()
                prune(base, 0.5, example_input=x, compensate=False)
                best["plain"] = min(best["plain"], time.perf_counter() - t0)
                if tp is not None:
                    model = copy.deepcopy(base)
                    t0 = time.perf_counter()
                    pruner = tp.pruner.MetaPruner(model, example_inputs=x, importance=tp.importance.BNScaleImportance(),
                                                  global_pruning=True, pruning_ratio=0.5,
                                                  ignored_layers=[m for m in model.modules() if isinstance(m, nn.Linear)][-1:])
                    pruner.step()
                    best["torch-pruning"] = min(best["torch-pruning"], time.perf_counter() - t0)
            ratio, plain = (best[k] / best["torch-pruning"] if tp is not None else math.nan for k in ("netslim", "plain"))
            lines.append(f"| {name} | {size}x{size} | {best['netslim']:.2f} | {best['torch-pruning']:.2f} | {ratio:.2f} "
                         f"| {best['plain']:.2f} | {plain:.2f} |")
            print(lines[-1], flush=True)
            if steps:
                print(f"    {name} {size}x{size}, s per step (cProfile, cumulative): {prune_steps(base, x)}", flush=True)
    return "\n".join(lines)


# The steps of one prune call, by the engine function that does each (file, function name).
STEPS = {"trace": ("trace.py", "trace"), "analysis": ("analysis.py", "analyze"),
         "plan": ("plan.py", "make_plan"), "removed": ("plan.py", "removed_roots"),
         "compensate": ("compensate.py", "compensate"), "slice": ("slim.py", "slice_in_place"),
         "counts": ("prune.py", "_count")}


def prune_steps(base: nn.Module, x: torch.Tensor) -> str:
    """Where one netslim prune call spends its time: each step's cumulative seconds under
    cProfile (which slows Python-heavy steps more than tensor work: shares, not a stopwatch).
    The analysis includes the trace."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.runcall(prune, base, 0.5, example_input=x)
    total = time.perf_counter() - t0
    seconds = dict.fromkeys(STEPS, 0.0)
    for (path, _, function), (_, _, _, cumulative, _) in pstats.Stats(profiler).stats.items():
        for step, (file, name) in STEPS.items():
            if function == name and path.endswith(f"engine/{file}"):
                seconds[step] += cumulative
    return ", ".join(f"{step} {s:.3f}" for step, s in seconds.items()) + f", whole call {total:.3f}"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--percent", type=float, default=0.4, help="global fraction to prune (both tools)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                    help="models to run (default: all)")
    ap.add_argument("--tp-variants", nargs="+", default=["default", "raw"], choices=["default", "raw"],
                    help="Torch-Pruning importance settings to run (default: both)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8, help="images in the output comparison")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="OUT", help="also write the rows as JSON here")
    ap.add_argument("--zoo", nargs="*", metavar="NAME",
                    help="instead: the per-architecture table over tests/zoo (all, or these) at 30/50/70%%")
    ap.add_argument("--timing", action="store_true",
                    help="instead: one prune call of each tool, side by side (ResNet-50, DenseNet-121, "
                         "MobileNetV2 at 224 and 32), best of --repeats, and the ratio")
    ap.add_argument("--repeats", type=int, default=5,
                    help="with --timing: interleaved calls per tool and model; the best counts (default 5: "
                         "on a shared machine one call in three or four is slowed by the load)")
    ap.add_argument("--steps", action="store_true",
                    help="with --timing: also print the seconds of each step of netslim's call (cProfile)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    if args.zoo is not None or args.timing:
        print(f"torch {torch.__version__}, torch-pruning {getattr(tp, '__version__', 'not installed')}, "
              f"seed {args.seed}, {args.threads} threads", flush=True)
        print(zoo_table(args.seed, args.zoo or None) if args.zoo is not None else timing_table(args.seed, args.repeats, steps=args.steps))
        return 0

    if tp is None:
        print("torch_pruning is not installed: printing netslim's rows only. To compare, install it "
              "without touching torch:  pip install torch-pruning --no-deps  (it needs only torch and numpy)")
        tp_version = None
    else:
        from importlib.metadata import PackageNotFoundError, version
        try:
            tp_version = version("torch-pruning")
        except PackageNotFoundError:
            tp_version = getattr(tp, "__version__", "?")
    print(f"torch {torch.__version__}, torch-pruning {tp_version or 'not installed'}, "
          f"percent {args.percent}, seed {args.seed}, {args.threads} threads", flush=True)

    rows, dense = [], {}
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed + 2))
    for key in args.models:
        arch, depth, label = MODELS[key]
        base = make_model(arch, depth, args.seed)
        dense[label] = count(base, example_input=x[:1])
        an = analyze(base, x[:1])
        gather = {n for n, u in an.modules.items() if u.kind.startswith("bn") and u.bn_mode == "gather"}
        jobs = [("netslim", run_netslim, "mean")]
        if an.coupled_layers():  # the group score only matters where channels are coupled
            jobs.append(("netslim (group strict)", run_netslim, "strict"))
        if tp is not None:
            for v in args.tp_variants:
                name = "torch-pruning" + ("" if v == "default" else " (unnormalized, max)")
                jobs.append((name, run_tp, v))
        for tool, fn, *fargs in jobs:
            r = row(label, tool, base, x, dense[label], gather, args.percent, fn, *fargs)
            status = (f"{r['seconds']:.2f}s, match={r['matches_masked_reference']}" if r["ok"]
                      else r["error"])
            print(f"  {label:24s} {tool:30s} {status}", flush=True)
            rows.append(r)

    print()
    print(fmt_table(rows, dense))
    print()
    print("BN ch. removed: BN channels (all affine BNs) whose factor is zeroed (netslim mask) or that "
          "Torch-Pruning removed. pre-act BN ch.: the same, over BNs that read a shared residual "
          "stream or concatenation. vs paper's rule: BN channels removed although |gamma| > the paper's "
          "global threshold (over all BN |gamma|) / kept although |gamma| <= it. = masked ref.: pruned model's eval outputs vs the original with "
          f"the removed channels' gamma and beta zeroed (equal if max rel. err <= {RTOL:g}).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "torch_pruning": tp_version, "percent": args.percent,
                       "seed": args.seed, "dense": dense, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
