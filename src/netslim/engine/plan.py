"""Step 4: the plan. Network Slimming's global threshold over the BN factors, the group
score of coupled units, the guards, and what a plan removes.

A *plan* is data: {BatchNorm module name: [kept channel indices]}. Plans compose: a slim
model remembers the plan that made it (relative to the dense architecture), so pruning it
again and reloading it from a checkpoint both work.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ConfigError, PruneError
from .analysis import Analysis

# How a coupled unit (channels of several BNs that must go together) is scored. "mean",
# "max", "sum": every BN channel of the unit enters the global sort with the unit's score,
# so the threshold at `percent` removes that share of BN channels on coupled models too.
# "strict": the paper's threshold over every factor on its own, and a unit goes only when
# all of its factors are under it (a unit of k channels then goes with probability ~p^k).
# On a model without coupled units every rule is the seed's rule exactly.
GROUP_SCORES = ("mean", "max", "sum", "strict")
DEFAULT_GROUP_SCORE = "mean"


# ----------------------------------------------------------------------------------------
# Plan: the seed's rule plus guards

@dataclass
class LayerDecision:
    name: str            # "features.1", or "a+b+c" for a coupled group of BNs
    bns: tuple[str, ...]
    total: int           # pruning units (a coupled unit holds one channel of each BN in `bns`)
    kept: int
    by_rule: int         # units kept by the threshold alone
    guard: str | None    # which guard changed the count, if any
    channels: int = 0    # BN channels in those units
    channels_kept: int = 0

    def as_dict(self) -> dict:
        return {"name": self.name, "bns": list(self.bns), "total": self.total, "kept": self.kept,
                "kept_by_threshold": self.by_rule, "guard": self.guard,
                "channels": self.channels, "channels_kept": self.channels_kept}


def global_threshold(values: torch.Tensor, percent: float) -> float:
    """The seed's threshold: sort all |gamma| ascending, take element int(total * percent).
    (A partial sort finds that element: the same value, without sorting the rest.)"""
    k = int(values.numel() * percent)
    return float(np.partition(values.detach().cpu().flatten().numpy(), k)[k])


def check_options(percent, min_channels, max_layer_percent, round_to, group_score) -> None:
    if not isinstance(percent, (int, float)) or isinstance(percent, bool) or not 0 <= percent < 1:
        raise ConfigError(f"percent must be a number in [0, 1), got {percent!r}")
    if not isinstance(min_channels, int) or min_channels < 1:
        raise ConfigError(f"min_channels must be an integer >= 1, got {min_channels!r}")
    if max_layer_percent is not None and not 0 <= max_layer_percent <= 1:
        raise ConfigError(f"max_layer_percent must be in [0, 1], got {max_layer_percent!r}")
    if round_to != "auto" and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ConfigError(f"round_to must be an integer >= 1 or 'auto', got {round_to!r}")
    if group_score not in GROUP_SCORES:
        raise ConfigError(f"group_score must be one of {', '.join(GROUP_SCORES)}, got {group_score!r}")


def _check_finite_factors(gamma: dict[str, torch.Tensor]) -> None:
    """NaN/inf factors (a diverged run) would make the threshold NaN and prune at random."""
    bad = [n for n, g in gamma.items() if not bool(torch.isfinite(g).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise PruneError(f"BatchNorm scaling factors are not finite (NaN or inf) in {shown}: training "
                         "diverged; prune a checkpoint from before it diverged, or train again with a "
                         "lower learning rate or sparsity")


def unit_scores(model: nn.Module, analysis: Analysis, group_score: str = DEFAULT_GROUP_SCORE,
                modules: dict[str, nn.Module] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(score of every unit, the values the global threshold is taken over), see GROUP_SCORES.
    `modules`: dict(model.named_modules()) if the caller has it."""
    mods = dict(model.named_modules()) if modules is None else modules
    # every BN's |gamma| in one vector, in the order of the flat positions (analysis.table):
    # joined first, so the finiteness check and the abs run once, not per BN
    factors = [mods[n].weight.detach().float().cpu() for n in analysis.bn_names]
    gamma = torch.cat([*factors, torch.zeros(0)])
    if not bool(torch.isfinite(gamma).all()):
        _check_finite_factors(dict(zip(analysis.bn_names, factors)))  # raises, naming the BNs
    table = analysis.table
    members = gamma.abs()[table.member_flat]   # each unit's factors, unit after unit
    how = {"mean": "mean", "max": "amax", "sum": "sum", "strict": "amax"}[group_score]
    scores = torch.zeros(len(table.unit_size)).scatter_reduce(0, table.member_unit, members, how,
                                                              include_self=False)
    if group_score == "strict":
        return scores, members
    return scores, torch.repeat_interleave(scores, table.unit_size)


def _channel_array(channels: Iterable[int]) -> np.ndarray:
    """`channels` (ints, NumPy ints, a tensor...) as an int64 array, each entry converted as
    int() converts it (a float truncated), in C."""
    return np.fromiter(channels, np.int64)


def _plan_channels(bn: str, channels: Iterable[int]) -> np.ndarray:
    """_channel_array of a plan's entry for `bn` (a plan may come from a damaged checkpoint):
    an entry that is no channel number (None, NaN, beyond int64) is a PruneError naming it."""
    try:
        return _channel_array(channels)
    except (OverflowError, ValueError, TypeError) as e:
        raise PruneError(f"the plan lists a channel of {bn} that is not a channel number ({e})") from None


def _ascending(channels: np.ndarray) -> np.ndarray:
    """`channels` sorted, without repeats: as they are when so already (a plan make_plan made;
    np.unique would cost ~25 us per BN)."""
    if len(channels) > 1 and not (channels[1:] > channels[:-1]).all():
        return np.unique(channels)
    return channels


def _flat_mask(analysis: Analysis, channels: dict[str, Sequence[int]]) -> np.ndarray:
    """A boolean per flat position (analysis.table), True at `channels` {bn: [j, ...]} of the
    BNs in analysis.bn_names (others are ignored)."""
    offsets = analysis.table.bn_offset.tolist()
    mask = np.zeros(offsets[-1], dtype=bool)
    for k, n in enumerate(analysis.bn_names):
        if channels.get(n) is not None and len(channels[n]):
            mask[offsets[k] + _channel_array(channels[n])] = True
    return mask


def make_plan(model: nn.Module, analysis: Analysis, percent: float, *, min_channels: int = 1,
              max_layer_percent: float | None = None, round_to: int = 1,
              group_score: str = DEFAULT_GROUP_SCORE, widths: dict[tuple[str, ...], int] | None = None,
              masked_out: dict[str, Sequence[int]] | None = None, modules: dict[str, nn.Module] | None = None,
              ) -> tuple[dict[str, list[int]], float, list[LayerDecision]]:
    """Decide which channels stay. Returns (plan, threshold, per-layer decisions).

    Threshold: the seed's rule (sort, take element int(total * percent)) over one value per
    candidate BN channel; a unit stays if its score is above it. On coupled units see
    GROUP_SCORES. percent 0 prunes nothing. `widths` {layer: count} raises a layer's kept
    count (widths.choose_widths: what the hardware runs fastest).

    masked_out: {bn: [channel, ...]} already pruned by a mask; a unit whose channels all
    are goes whatever its factors say, and the guards (min_channels...) still hold after.
    `modules`: dict(model.named_modules()) if the caller has it.
    """
    if len(analysis.table.unit_size) == 0:  # nothing prunable
        return {}, 0.0, []
    table = analysis.table
    scores, values = unit_scores(model, analysis, group_score, modules)
    threshold = global_threshold(values, percent) if percent > 0 else -math.inf
    if masked_out:  # a unit whose channels a mask removed all scores below any threshold
        gone = torch.from_numpy(_flat_mask(analysis, masked_out))[table.member_flat]
        all_gone = torch.zeros(len(table.unit_size), dtype=torch.long).index_add_(
            0, table.member_unit, gone.long()) == table.unit_size
        scores = scores.masked_fill(all_gone, -math.inf)

    # Per layer in NumPy: a few small ops per layer, each a tenth of a tensor op's overhead.
    unit_scores_np, unit_size = scores.numpy(), table.unit_size.numpy()
    kept_unit = np.zeros(len(unit_size), dtype=bool)
    decisions = []
    for layer, lunits in zip(table.layers, table.layer_units):
        lunits = lunits.numpy()
        layer_scores = unit_scores_np[lunits]
        above = layer_scores > threshold
        n = len(lunits)
        keep = int(np.count_nonzero(above))
        by_rule = keep
        guard = None
        if max_layer_percent is not None:
            floor_keep = n - int(n * max_layer_percent)
            if keep < floor_keep:
                keep, guard = floor_keep, "max_layer_percent"
        if keep < min(min_channels, n):
            keep, guard = min(min_channels, n), "min_channels"
        if round_to > 1 and keep % round_to:
            rounded = min(n, -(-keep // round_to) * round_to)
            if rounded != keep:
                keep, guard = rounded, guard or "round_to"
        if widths and widths.get(layer, 0) > keep:
            keep, guard = min(n, widths[layer]), guard or "round_to auto"
        # The rule keeps exactly the units above the threshold; guards (which only raise the
        # count) keep the best-scoring units: a stable sort, best first, ties in unit order.
        if keep == by_rule:
            chosen = lunits[above]
        else:
            chosen = lunits[np.argsort(-layer_scores, kind="stable")[:keep]]
        kept_unit[chosen] = True
        name = layer[0] if len(layer) == 1 else "+".join(layer)
        decisions.append(LayerDecision(name, layer, n, keep, by_rule, guard,
                                       channels=int(unit_size[lunits].sum()),
                                       channels_kept=int(unit_size[chosen].sum())))

    # A BN channel goes when its unit goes; channels outside every unit (unprunable) stay.
    removed = np.zeros(table.channels, dtype=bool)
    removed[table.member_flat.numpy()[~kept_unit[table.member_unit.numpy()]]] = True
    offsets = table.bn_offset.tolist()
    plan = {}
    for k, n in enumerate(analysis.bn_names):
        bn_removed = removed[offsets[k]:offsets[k + 1]]
        if bn_removed.any():
            plan[n] = np.flatnonzero(~bn_removed).tolist()
    return plan, threshold, decisions



def removed_roots(analysis: Analysis, plan: dict[str, Sequence[int]], mods: dict) -> set[int]:
    """The class roots of the slots `plan` removes (with the classes that follow them), after
    checking it: a BatchNorm of the model is named, channels in range, coupled channels kept or
    removed together, no channel of a unit-less (unprunable) class removed."""
    kept = {n: _ascending(_plan_channels(n, k)) for n, k in plan.items()}
    for n, k in kept.items():
        if n not in mods or not isinstance(mods[n], _BatchNorm):
            raise PruneError(f"the plan names {n!r}, which is not a BatchNorm of this model")
        if len(k) and (k[-1] >= mods[n].num_features or k[0] < 0):
            bad = k[0] if k[0] < 0 else k[-1]
            raise PruneError(f"the plan keeps channel {bad} of {n}, which has {mods[n].num_features}")
    table = analysis.table
    offsets = table.bn_offset.tolist()
    position = {n: i for i, n in enumerate(analysis.bn_names)}
    # per flat position: kept? (a BN the plan does not name keeps every channel)
    kept_flat = np.ones(offsets[-1], dtype=bool)
    for n, k in kept.items():
        if n in position:
            lo, hi = offsets[position[n]], offsets[position[n] + 1]
            kept_flat[lo:hi] = False
            kept_flat[lo + k] = True
    member_flat, member_unit = table.member_flat.numpy(), table.member_unit.numpy()
    unit_size = table.unit_size.numpy()
    n_kept = np.bincount(member_unit[kept_flat[member_flat]], minlength=len(unit_size))
    mixed = np.flatnonzero((n_kept > 0) & (n_kept < unit_size))
    if len(mixed):
        channels = analysis.bn_channels(table.member_flat[table.member_unit == int(mixed[0])][:4])
        raise PruneError(f"the plan keeps some but not all of the coupled channels {channels}...; "
                         "coupled channels must be pruned together")
    removed = set(table.unit_root.numpy()[n_kept == 0].tolist())
    for follower, leader in analysis.follows:  # gates go with the channels they multiply
        if analysis.find(leader) in removed:
            removed.add(analysis.find(follower))
    unitless = np.ones(offsets[-1], dtype=bool)  # per flat position: in no unit (cannot go)?
    unitless[member_flat] = False
    for n, k in kept.items():
        if n in position:
            lo, hi = offsets[position[n]], offsets[position[n] + 1]
            gone = np.flatnonzero(~kept_flat[lo:hi] & unitless[lo:hi])
            first = int(gone[0]) if len(gone) else None
        else:  # a BN outside the analysis (inside an untraced module): none of its channels may go
            first = min(set(range(mods[n].num_features)) - set(k.tolist()), default=None)
        if first is not None:
            why = analysis.unprunable.get(n, "its channels are tied to something that cannot shrink")
            raise PruneError(f"the plan removes channel {first} of {n}, which cannot be pruned ({why})")
    return removed



def masked_out(model: nn.Module, meta: dict, modules: dict[str, nn.Module] | None = None) -> dict[str, list[int]]:
    """{bn: channels the model's stored mask removed}. `modules`: dict(model.named_modules())
    if the caller has it."""
    if not meta.get("mask"):
        return {}
    mods = dict(model.named_modules()) if modules is None else modules
    out = {}
    for n, kept in meta["mask"].items():
        if isinstance(mods.get(n), _BatchNorm):
            out[n] = sorted(set(range(mods[n].num_features)) - set(map(int, kept)))
    return out


def compose_plans(outer: dict[str, Sequence[int]], inner: dict[str, Sequence[int]]) -> dict[str, list[int]]:
    """The plan relative to the dense model after `outer` then `inner` (inner indexes outer's kept)."""
    out = {n: list(map(int, k)) for n, k in outer.items()}
    for n, k in inner.items():
        out[n] = [out[n][i] for i in k] if n in out else [int(i) for i in k]
    return out



# Above this gap (in points) between the share asked and the share removed, say why.
SHORTFALL_POINTS = 10


def explain_shortfall(report: dict, decisions: list[LayerDecision], mods: dict[str, nn.Module]) -> str | None:
    """Why far fewer (or more) BN channels went than `percent` asked, or None if within 10 points.

    Names what held channels back: BNs that cannot be pruned (and the op that pins them),
    the guards, and (with group_score "strict") the coupled groups that all-or-nothing kept.
    """
    asked, got = report["percent"], report["removed_share"]
    if abs(asked - got) * 100 <= SHORTFALL_POINTS:
        return None
    reasons = []
    unprunable = report["unprunable"]
    if unprunable:
        held = sum(getattr(mods.get(n), "num_features", 0) for n in unprunable)
        # the most frequent reason; ties in first-seen order (a set's order changed with the hash seed)
        why = sorted(dict.fromkeys(unprunable.values()), key=list(unprunable.values()).count, reverse=True)
        reasons.append(f"{len(unprunable)} BN(s) cannot be pruned ({held} channels, e.g. "
                       f"{next(iter(unprunable))}: {why[0]})")
    guarded = [d for d in decisions if d.guard and d.kept > d.by_rule]
    if guarded:
        extra = sum(d.channels_kept - d.channels * d.by_rule // max(d.total, 1) for d in guarded)
        reasons.append(f"guards kept ~{extra} channels in {len(guarded)} layer(s) "
                       f"({', '.join(sorted({d.guard for d in guarded}))}, e.g. {guarded[0].name})")
    coupled = [d for d in decisions if len(d.bns) > 1]
    if coupled and report["group_score"] == "strict":
        big = max(coupled, key=lambda d: len(d.bns))
        reasons.append(f"group_score 'strict' keeps a coupled group unless all its factors are small "
                       f"({len(coupled)} groups, the largest {len(big.bns)} BNs: {big.bns[0]} ...); "
                       "group_score 'mean' honours the percent")
    if not reasons:
        reasons.append("many factors tie at the threshold")
    return (f"removed {got:.1%} of BN channels where {asked:.1%} was asked: " + "; ".join(reasons))
