"""Prune to a latency target: search the global percent until the measured latency fits.

    slim, report = netslim.prune(model, target_latency=0.5, runtime="onnxruntime", batch_size=1)

`target_latency` F is the fraction of the dense model's measured latency the slim model
may take (0.5: at least 2x faster). Latency does not follow MACs (odd widths, layout
changes, memory-bound layers), so it is measured, not predicted: the percent is bisected
on the latency of the actual slim model in the chosen runtime, batch size and thread
count. Each probe times the dense and the candidate model in turns (dense, slim, dense,
...; at batch <= 8 four calls a turn, as a model runs when deployed) so load from other
processes hits both alike, and compares medians (of CPU time on one thread: see
`latency_ratio`).

The search keeps the smallest percent whose measured latency is at or below F x dense
(the most channels, so accuracy suffers least), aiming MARGIN (2%) under F so that a
re-measurement's noise stays under it too. Then the chosen model is timed again, twice as
long: the figure the report gives is that confirmation. A bisection ends on the percent
whose single measurement was luckiest (resnet-164 in onnxruntime, batch 1: 0.467 in the
search, 0.515 re-measured), so a confirmation above F sends the search on between that
percent and the next larger one that fitted, aiming lower by as much as the re-measurement
moved (the noise this machine has shown, which a busy CI machine made 4-6%, more than
MARGIN), and the new choice is confirmed in turn (CONFIRMATIONS times at most). When even
the largest percent it tries (`MAX_PERCENT`) is above F, the target cannot be reached by
pruning channels (what stays unprunable, e.g. a full-width residual stream, already takes
more): that is a `TargetUnreachable` error naming the closest latency and its percent.
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .errors import ConfigError, PruneError

log = logging.getLogger(__name__)

MAX_PERCENT = 0.95      # the far end of the search: nearly every prunable channel gone
PERCENT_STEP = 0.005    # the search stops when the bracket is this narrow
MAX_PROBES = 10         # ... or after this many measured candidates
PER_TURN = 4            # timed calls in a row per model at batch <= 8 (latency_ratio)
CONFIRMATIONS = 3       # re-measurements of a chosen model before the search gives up on noise
# The search aims this much under the target: timing the same pair again moves the ratio by
# a few percent (vgg-13 in onnxruntime, batch 1: 0.495 in the search, 0.512 re-measured).
MARGIN = 0.02


class TargetUnreachable(PruneError):
    """No percent brings the measured latency down to the target; `closest` says how near it got."""

    def __init__(self, message: str, closest: dict[str, Any]) -> None:
        super().__init__(message)
        self.closest = closest


def latency_ratio(dense_run: Callable[[], Any], slim_run: Callable[[], Any], *, one_thread: bool,
                  target_seconds: float = 1.0, warmup: int = 2, per_turn: int = 1) -> tuple[float, float, float]:
    """(slim / dense median latency, dense ms, slim ms), the two timed in turns for about
    `target_seconds` in all (at least 5 turns each).

    With `one_thread` the clock is the process's CPU time: on one thread it equals the wall
    time of an idle machine, and it leaves out the time the process waited for a core on a
    busy one, which penalises the longer run (it is preempted more often) and moved the
    ratio by 2x here. With several threads CPU time sums them, so the clock is the wall.
    `per_turn` > 1: each turn runs its model once untimed, then times `per_turn` calls in a
    row, so the timed calls find that model's weights in the caches, as a deployed model
    running forward after forward does (the slim vgg-13's 14 MiB fit this CPU's L3, the dense
    one's 36 MiB do not: one call per turn evicts them and cost the slim side ~5% at batch 1).
    """
    from .profile import release, timed_turn

    clock = time.process_time if one_thread else time.perf_counter
    for run in (dense_run, slim_run):
        release(run)
    for _ in range(warmup):
        timed_turn(dense_run, clock, per_turn)
        timed_turn(slim_run, clock, per_turn)
    dense, slim = timed_turn(dense_run, clock, per_turn), timed_turn(slim_run, clock, per_turn)
    rounds = max(5, int(target_seconds / max((dense[0] + slim[0]) * (per_turn + (per_turn > 1)), 1e-6)))
    for _ in range(rounds - 1):
        dense += timed_turn(dense_run, clock, per_turn)
        slim += timed_turn(slim_run, clock, per_turn)
    d, s = statistics.median(dense), statistics.median(slim)
    return s / d, d * 1e3, s * 1e3


def prune_to_latency(model: nn.Module, target_latency: float, *, runtime: str = "torch", batch_size: int = 1,
                     threads: Optional[int] = None, target_seconds: float = 1.0,
                     example_input: Optional[torch.Tensor] = None,
                     **prune_options: Any) -> tuple[nn.Module, dict]:
    """Prune `model` (netslim.prune with `prune_options`) at the smallest percent whose measured
    latency is at most `target_latency` x the dense model's. Returns (pruned, report); the
    report is prune's plus "latency_target": the target, the measured latencies, the percent
    and every probe. Raises TargetUnreachable when MAX_PERCENT is still too slow."""
    from .engine.trace import example_input as make_example
    from .profile import RUNTIMES, forward_runner
    from .engine.prune import prune
    from .engine.slim import apply_plan

    if isinstance(target_latency, bool) or not isinstance(target_latency, (int, float)) \
            or not 0 < target_latency < 1:
        raise ConfigError(f"target_latency must be a fraction of the dense latency in (0, 1), got {target_latency!r}")
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime {runtime!r} is not known: use one of {', '.join(RUNTIMES)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    meta = dict(getattr(model, "netslim_meta", {}) or {})
    if example_input is None:
        example_input = make_example(meta.get("input_size"), model)
    size = tuple(example_input.shape[1:])
    aim = target_latency * (1 - MARGIN)
    per_turn = PER_TURN if batch_size <= 8 else 1   # large batches: the activations dwarf the weights
    prev_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        dense_run = forward_runner(model, size, batch_size, runtime=runtime)
        probes: list[dict[str, Any]] = []
        made: dict[float, tuple[nn.Module, dict]] = {}

        def probe(percent: float, confirm: bool = False) -> dict[str, Any]:
            """Time the model pruned at `percent` against the dense one (made once; `confirm`:
            again, twice as long)."""
            if percent not in made:
                made[percent] = prune(model, percent, example_input=example_input, runtime=runtime,
                                      batch_size=batch_size, **prune_options)  # round_to "auto" measures there too
            timed = made[percent][0]
            if prune_options.get("mode") == "mask":  # the time of the slim model the mask stands for
                timed = apply_plan(timed, timed.netslim_meta["mask"], example_input)
            ratio, dense_ms, slim_ms = latency_ratio(
                dense_run, forward_runner(timed, size, batch_size, runtime=runtime),
                one_thread=torch.get_num_threads() == 1, target_seconds=target_seconds * (2 if confirm else 1),
                per_turn=per_turn)
            row = {"percent": percent, "ratio": ratio, "dense_ms": dense_ms, "slim_ms": slim_ms}
            if confirm:
                row["confirm"] = True
            probes.append(row)
            log.info("latency target: percent %.3f -> %.3f of dense (%.2f ms vs %.2f ms)%s",
                     percent, ratio, slim_ms, dense_ms, " (confirmation)" if confirm else "")
            return row

        best = probe(MAX_PERCENT)
        if best["ratio"] > aim:
            raise _unreachable(target_latency, runtime, batch_size, best)
        lo, hi = 0.0, MAX_PERCENT  # lo is too slow (the dense model), hi fits
        for _ in range(CONFIRMATIONS):
            best = _bisect(probe, probes, lo, hi, best, aim, max_probes=len(probes) + MAX_PROBES - 1)
            confirmed = probe(best["percent"], confirm=True)
            if confirmed["ratio"] <= target_latency:
                best = confirmed
                break
            # the search's figure for this percent was noise in its favour: search above it, aiming
            # lower by the noise just seen (no lower than the farthest percent measured: below it
            # nothing could fit)
            aim = max(aim - (confirmed["ratio"] - best["ratio"]), probes[0]["ratio"])
            lo = best["percent"]
            fitting = [p["percent"] for p in probes if p["percent"] > lo and p["ratio"] <= aim
                       and not p.get("confirm") and not p.get("rejected")]
            best["rejected"] = True
            hi = min(fitting, default=MAX_PERCENT)
            best = next(p for p in probes if p["percent"] == hi and not p.get("confirm"))
        else:
            raise _unreachable(target_latency, runtime, batch_size, confirmed, confirmed=True)
    finally:
        torch.set_num_threads(prev_threads)
    pruned, report = made[best["percent"]]
    report["latency_target"] = {
        "target": target_latency, "aimed_at": aim, "runtime": runtime, "batch_size": batch_size,
        "threads": threads if threads is not None else prev_threads,
        "percent": best["percent"], "ratio": best["ratio"], "dense_ms": best["dense_ms"],
        "slim_ms": best["slim_ms"], "probes": probes,
    }
    return pruned, report


def _bisect(probe: Callable[[float], dict[str, Any]], probes: list, lo: float, hi: float, best: dict[str, Any],
            aim: float, *, max_probes: int) -> dict[str, Any]:
    """Narrow [lo (too slow), hi (fits, measured as `best`)] down to PERCENT_STEP, or until `probes`
    holds `max_probes` measurements; the fitting end."""
    while hi - lo > PERCENT_STEP and len(probes) < max_probes:
        row = probe(round((lo + hi) / 2, 4))
        if row["ratio"] <= aim:
            hi, best = row["percent"], row
        else:
            lo = row["percent"]
    return best


def _unreachable(target: float, runtime: str, batch_size: int, best: dict[str, Any], *,
                 confirmed: bool = False) -> TargetUnreachable:
    if confirmed:  # every choice fitted once and not when timed again: the target is within the noise
        why = (f"the models that fitted it once measured above it when timed again (last: percent "
               f"{best['percent']:.3f} at {best['ratio']:.3f} x dense): the target is within this machine's "
               "timing noise; try a slightly larger target or a quieter machine")
    else:
        why = (f"even pruning {MAX_PERCENT:.0%} of the channels leaves {best['ratio']:.3f} x dense "
               f"({best['slim_ms']:.3g} ms vs {best['dense_ms']:.3g} ms): what cannot be pruned "
               "(e.g. a full-width residual stream, the stem, the classifier) takes more than the target")
    return TargetUnreachable(f"a latency of {target:g} x dense cannot be reached in {runtime} at batch {batch_size}: "
                             f"{why}; closest: --percent {best['percent']:g} at {best['ratio']:.3f}", closest=best)


def describe(result: dict[str, Any]) -> str:
    """One line for the CLI: where the search landed."""
    return (f"latency {result['ratio']:.3f} x dense ({result['slim_ms']:.3g} ms vs {result['dense_ms']:.3g} ms, "
            f"{result['runtime']}, batch {result['batch_size']}, {result['threads']} threads) at percent "
            f"{result['percent']:.3f}, confirmed by a second timing; target {result['target']:g} "
            f"({len(result['probes'])} timings)")


__all__: Sequence[str] = ("MARGIN", "MAX_PERCENT", "TargetUnreachable", "latency_ratio", "prune_to_latency")
