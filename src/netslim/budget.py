"""Pruning to a budget: find the global threshold whose slim model fits a FLOPs or
parameter budget.

    slim, report = netslim.prune(model, target_flops=0.5)    # at most half the dense FLOPs

The plan is a monotone function of the threshold's position in the sorted scores (a higher
threshold never keeps a unit a lower one dropped, guards included), and so are the slim
model's FLOPs and parameters. A bisection over that position, each step counting the
real slim model, finds the lowest percent that fits; the result lands below the budget,
as close to it as whole channels allow.
"""
from __future__ import annotations

from typing import Callable

from .errors import ConfigError, PruneError

BUDGET_KEYS = ("flops", "params")
TOLERANCE = 0.02  # the slim model should land within 2% (of the dense count) below the budget


def check_budget(name: str, fraction: float | None) -> None:
    if fraction is None:
        return
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise ConfigError(f"{name} must be a fraction in (0, 1] of the dense model's count, got {fraction!r}")


def percent_at(position: int, n_values: int) -> float:
    """The percent whose threshold is sorted value `position` (the seed's int(n * percent))."""
    return (position + 0.5) / n_values


def search_percent(n_values: int, measure: Callable[[float], int], budget: float, dense: int,
                   what: str) -> tuple[float, int, int]:
    """The smallest percent whose slim model's count (`measure(percent)`) is <= budget.

    Returns (percent, count there, number of slim models counted). Bisection over the
    threshold position: log2(n_values) + 2 counts.
    """
    if dense <= budget:
        return 0.0, dense, 0
    lo, hi = 0, n_values - 1           # invariant: the answer lies in [lo, hi]
    at_hi = measure(percent_at(hi, n_values))
    steps = 1
    if at_hi > budget:
        raise PruneError(
            f"no percent gets the {what} under {budget / dense:.1%} of the dense model: pruning "
            f"everything the guards allow leaves {at_hi / dense:.1%}; ask for at least {at_hi / dense:.3f}")
    best = (percent_at(hi, n_values), at_hi)
    while lo < hi:
        mid = (lo + hi) // 2
        got = measure(percent_at(mid, n_values))
        steps += 1
        if got <= budget:
            hi, best = mid, (percent_at(mid, n_values), got)
        else:
            lo = mid + 1
    return best[0], best[1], steps


def budget_report(key: str, fraction: float, reached: int, dense: int, percent: float, steps: int) -> dict:
    """What the report says about a budget: asked, reached, and whether within tolerance."""
    share = reached / dense if dense else 1.0
    return {"target": key, "fraction": fraction, "reached": share, "percent": percent,
            "slim_models_counted": steps, "within_tolerance": fraction - share <= TOLERANCE}


__all__ = ["BUDGET_KEYS", "TOLERANCE", "check_budget", "search_percent", "budget_report", "percent_at"]
