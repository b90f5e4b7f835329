"""Network Slimming's pruning step: one global threshold -> a plan -> a slim or masked model.

    pruned, report = netslim.prune(model, 0.5)                 # physically smaller model
    masked, report = netslim.prune(model, 0.5, mode="mask")    # same shape, factors held at 0

A *plan* is data: {BatchNorm module name: [kept channel indices]}. `apply_plan` turns a
model and a plan into the smaller model by slicing every module that touches the pruned
channels (see graph.py for how those are found); `apply_mask` zeroes the pruned factors
and keeps them at zero while training. Plans compose: a slim model remembers the plan that
made it (relative to the dense architecture), so pruning it again and reloading it from a
checkpoint both work.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .budget import budget_report, check_budget, search_percent
from .compensate import compensate as compensate_removed
from .errors import ConfigError, PruneError
from .graph import INDEXED_BN, Analysis, analyze, is_indexed_bn
from .wrappers import unwrap_model

log = logging.getLogger(__name__)

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
    """The seed's threshold: sort all |gamma| ascending, take element int(total * percent)."""
    y, _ = torch.sort(values.flatten())
    return float(y[int(values.numel() * percent)])


def _check_options(percent, min_channels, max_layer_percent, round_to, group_score) -> None:
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


def unit_scores(model: nn.Module, analysis: Analysis, group_score: str = DEFAULT_GROUP_SCORE
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(score of every unit, the values the global threshold is taken over), see GROUP_SCORES."""
    mods = dict(model.named_modules())
    offset, flat = {}, []
    for n in analysis.bn_names:  # every BN's |gamma| in one vector, so scoring is one scatter
        w = getattr(mods[n], "weight", None)
        if w is not None:
            offset[n] = sum(len(f) for f in flat)
            flat.append(w.detach().abs().float().cpu())
    _check_finite_factors(dict(zip(offset, flat)))
    gamma = torch.cat(flat)
    index = torch.tensor([offset[n] + j for u in analysis.units for n, j in u.bn_channels])
    sizes = torch.tensor([len(u.bn_channels) for u in analysis.units])
    members = gamma[index]                                   # each unit's factors, unit after unit
    owner = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    how = {"mean": "mean", "max": "amax", "sum": "sum", "strict": "amax"}[group_score]
    scores = torch.zeros(len(sizes)).scatter_reduce(0, owner, members, how, include_self=False)
    if group_score == "strict":
        return scores, members
    return scores, torch.repeat_interleave(scores, sizes)


def make_plan(model: nn.Module, analysis: Analysis, percent: float, *, min_channels: int = 1,
              max_layer_percent: float | None = None, round_to: int = 1,
              group_score: str = DEFAULT_GROUP_SCORE, widths: dict[tuple[str, ...], int] | None = None,
              masked_out: dict[str, Sequence[int]] | None = None,
              ) -> tuple[dict[str, list[int]], float, list[LayerDecision]]:
    """Decide which channels stay. Returns (plan, threshold, per-layer decisions).

    Threshold: the seed's rule (sort, take element int(total * percent)) over one value per
    candidate BN channel; a unit stays if its score is above it. On coupled units see
    GROUP_SCORES. percent 0 prunes nothing. `widths` {layer: count} raises a layer's kept
    count (widths.choose_widths: what the hardware runs fastest).

    masked_out: {bn: [channel, ...]} already pruned by a mask; a unit whose channels all
    are goes whatever its factors say, and the guards (min_channels...) still hold after.
    """
    mods = dict(model.named_modules())
    units = analysis.units
    if not units:
        return {}, 0.0, []
    unit_score, values = unit_scores(model, analysis, group_score)
    threshold = global_threshold(values, percent) if percent > 0 else -math.inf
    score_of = {id(u): float(sc) for u, sc in zip(units, unit_score)}
    gone = {n: set(map(int, k)) for n, k in (masked_out or {}).items()}

    def score(u) -> float:
        if all(j in gone.get(n, ()) for n, j in u.bn_channels):
            return -math.inf  # below any threshold; a guard may still bring it back
        return score_of[id(u)]

    by_layer: dict[tuple[str, ...], list] = {}
    for u in units:
        by_layer.setdefault(u.layer, []).append(u)
    kept_units = []
    decisions = []
    for layer, lunits in by_layer.items():
        scores = torch.tensor([score(u) for u in lunits])
        order = torch.argsort(scores, descending=True, stable=True).tolist()  # best first
        n = len(lunits)
        keep = int((scores > threshold).sum())
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
        # Guards add back the best-scoring units; the rule keeps exactly those above threshold.
        chosen = order[:keep]
        kept_units.extend(lunits[i] for i in chosen)
        name = layer[0] if len(layer) == 1 else "+".join(layer)
        decisions.append(LayerDecision(name, layer, n, keep, by_rule, guard,
                                       channels=sum(len(u.bn_channels) for u in lunits),
                                       channels_kept=sum(len(lunits[i].bn_channels) for i in chosen)))

    plan: dict[str, set[int]] = {}
    touched = {n for u in units for n, _ in u.bn_channels}
    for n in touched:
        plan[n] = set()
    for u in kept_units:
        for n, j in u.bn_channels:
            plan[n].add(j)
    full = {n: mods[n].num_features for n in touched}
    out = {n: sorted(k) for n, k in plan.items()}
    # Channels of a BN outside every unit (unprunable ones) stay.
    in_unit = {}
    for u in units:
        for n, j in u.bn_channels:
            in_unit.setdefault(n, set()).add(j)
    for n in out:
        extra = set(range(full[n])) - in_unit[n]
        if extra:
            out[n] = sorted(set(out[n]) | extra)
    return {n: k for n, k in out.items() if len(k) < full[n]}, threshold, decisions


# ----------------------------------------------------------------------------------------
# Apply: surgery on a copy of the model

def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=True)


def _removed_roots(analysis: Analysis, plan: dict[str, Sequence[int]], mods: dict) -> set[int]:
    kept = {n: set(int(i) for i in k) for n, k in plan.items()}
    for n, k in kept.items():
        if n not in mods or not isinstance(mods[n], _BatchNorm):
            raise PruneError(f"the plan names {n!r}, which is not a BatchNorm of this model")
        if k and (max(k) >= mods[n].num_features or min(k) < 0):
            raise PruneError(f"the plan keeps channel {max(k)} of {n}, which has {mods[n].num_features}")
    in_unit: dict[str, set[int]] = {}
    removed = set()
    for u in analysis.units:
        states = {j in kept[n] if n in kept else True for n, j in u.bn_channels}
        for n, j in u.bn_channels:
            in_unit.setdefault(n, set()).add(j)
        if states == {False}:
            removed.add(u.root)
        elif len(states) > 1:
            raise PruneError(f"the plan keeps some but not all of the coupled channels {u.bn_channels[:4]}...; "
                             "coupled channels must be pruned together")
    for follower, leader in analysis.follows:  # gates go with the channels they multiply
        if analysis.find(leader) in removed:
            removed.add(analysis.find(follower))
    for n, k in kept.items():
        gone = set(range(mods[n].num_features)) - k - in_unit.get(n, set())
        if gone:
            why = analysis.unprunable.get(n, "its channels are tied to something that cannot shrink")
            raise PruneError(f"the plan removes channel {min(gone)} of {n}, which cannot be pruned ({why})")
    return removed


def apply_plan(model: nn.Module, plan: dict[str, Sequence[int]], example_input: torch.Tensor | None = None,
               *, exclude: Sequence[str] = (), analysis: Analysis | None = None) -> nn.Module:
    """A physically smaller copy of `model` that keeps, per BN, the channels in `plan`.

    Every module that reads or writes a removed channel is sliced: producer convs/linears
    lose output channels, consumers lose input channels (per flatten block for a Linear),
    depthwise convs lose groups, and a BN that reads a stream which must keep its width
    becomes an IndexedBatchNorm that gathers only its kept channels.
    """
    from .checkpoint import example_input as make_example

    model = unwrap_model(model)
    meta = dict(getattr(model, "netslim_meta", {}) or {})
    if example_input is None:
        example_input = make_example(meta.get("input_size"), model)
    if analysis is None:
        analysis = analyze(model, example_input, exclude=exclude, strict=False)
    new = copy.deepcopy(model)
    _strip_masks(new)
    mods = dict(new.named_modules())
    removed = _removed_roots(analysis, plan, mods)

    def keep(slots: Sequence[int]) -> list[int]:
        return [j for j, s in enumerate(slots) if analysis.find(s) not in removed]

    with torch.no_grad():
        for name, use in analysis.modules.items():
            m = mods[name]
            if use.kind == "conv":
                ki, ko = keep(use.in_slots), keep(use.out_slots)
                if len(ki) == m.in_channels and len(ko) == m.out_channels:
                    continue
                m.weight = _param(m.weight[ko][:, ki])
                if m.bias is not None:
                    m.bias = _param(m.bias[ko])
                m.in_channels, m.out_channels = len(ki), len(ko)
            elif use.kind == "gconv":
                ki, ko = keep(use.in_slots), keep(use.out_slots)
                if len(ki) == m.in_channels and len(ko) == m.out_channels:
                    continue
                # graph.py ties position j of every group, so each group keeps the same
                # positions: slice the weight's per-group input dim by group 0's.
                per_in = m.in_channels // m.groups
                kj = [j for j in ki if j < per_in]
                m.weight = _param(m.weight[ko][:, kj])
                if m.bias is not None:
                    m.bias = _param(m.bias[ko])
                m.in_channels, m.out_channels = len(ki), len(ko)
            elif use.kind == "dwconv":
                k = keep(use.in_slots)
                if len(k) == m.in_channels:
                    continue
                m.weight = _param(m.weight[k])
                if m.bias is not None:
                    m.bias = _param(m.bias[k])
                m.in_channels = m.out_channels = m.groups = len(k)
            elif use.kind == "linear":
                ki, ko = keep(use.in_slots), keep(use.out_slots)
                if len(ki) == len(use.in_slots) and len(ko) == m.out_features:
                    continue
                b = use.in_block
                cols = [j * b + t for j in ki for t in range(b)]
                m.weight = _param(m.weight[ko][:, cols])
                if m.bias is not None:
                    m.bias = _param(m.bias[ko])
                m.in_features, m.out_features = len(cols), len(ko)
            elif use.kind in ("bn", "bn_passive"):
                _slice_bn(new, name, m, use, keep, analysis)
        for attr in analysis.attrs.values():
            kept_channels = keep(attr.slots)
            if len(kept_channels) < len(attr.slots):
                _slice_attr(new, attr.target, attr.dim, kept_channels)
    new.netslim_meta = meta
    return new


def _slice_attr(model: nn.Module, target: str, dim: int, index: list[int]) -> None:
    """Keep `index` along `dim` of the tensor attribute `target` (a layer scale...)."""
    owner_name, _, attr = target.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    t = getattr(owner, attr)
    sliced = t.detach().index_select(dim, torch.tensor(index, dtype=torch.long, device=t.device)).clone()
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(sliced, requires_grad=t.requires_grad)
    else:  # graph.py tracks only parameters and buffers
        owner._buffers[attr] = sliced


def _slice_bn(model, name, m, use, keep, analysis) -> None:
    ko = keep(use.out_slots)
    # Where each kept channel's input sits in the (possibly also slimmed) input tensor.
    if use.kind == "bn_passive":
        src = ko
        in_width_after = len(ko)
    else:
        in_all = use.gather_index  # dense input position read by each BN channel
        # The input tensor's own slots: rebuild from the input positions of this BN's channels.
        # A removed input slot is never read by a kept channel (graph.py ties such channels).
        in_slots_full = use.input_slots
        kept_in = keep(in_slots_full)
        rank = {p: r for r, p in enumerate(kept_in)}
        src = [rank[in_all[j]] for j in ko]
        in_width_after = len(kept_in)
    identity = src == list(range(in_width_after)) and len(src) == in_width_after
    if len(ko) == m.num_features and identity and not is_indexed_bn(m):
        return
    sliced = {}
    for key in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(m, key, None)
        if t is not None:
            sliced[key] = t.detach()[ko].clone()
    if use.kind == "bn" and not identity:
        if is_indexed_bn(m):
            cls = type(m)
        else:  # SyncBatchNorm and other subclasses: pick by the input's rank
            base = next((b for b in type(m).__mro__ if b in INDEXED_BN), nn.BatchNorm2d)
            cls = INDEXED_BN[base]
        new = cls(len(ko), eps=m.eps, momentum=m.momentum, affine=m.affine,
                  track_running_stats=m.track_running_stats,
                  device=m.weight.device if m.weight is not None else None,
                  dtype=m.weight.dtype if m.weight is not None else None)
        new.register_buffer("keep_index", torch.tensor(src, dtype=torch.long,
                                                        device=sliced["weight"].device))
        if m.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(m.num_batches_tracked)
        new.train(m.training)
        target = new
        _set_module(model, name, new)
    else:
        if is_indexed_bn(m):  # identity gather: a plain BN again is enough, but keep the type stable
            m.keep_index = torch.tensor(src, dtype=torch.long, device=m.keep_index.device)
        target = m
    target.num_features = len(ko)
    if sliced.get("weight") is not None:
        target.weight = _param(sliced["weight"])
        target.bias = _param(sliced["bias"])
    if sliced.get("running_mean") is not None:
        target.running_mean = sliced["running_mean"]
        target.running_var = sliced["running_var"]


# ----------------------------------------------------------------------------------------
# Mask: zero the pruned factors and keep them at zero

class _MaskGradient:
    """A parameter's gradient hook: multiply the gradient by its BN's current 0/1 mask."""

    def __init__(self, bn: nn.Module):
        self.bn = bn

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        mask = self.bn._buffers.get("netslim_mask")
        return grad if mask is None else grad * mask.to(grad.dtype)


def _has_mask_hook(p: nn.Parameter) -> bool:
    return any(isinstance(h, _MaskGradient) for h in (p._backward_hooks or {}).values())


def _hold_masked_factors(bn: nn.Module, args=None) -> None:
    """Forward pre-hook of a masked BN: make sure its gamma and beta carry a _MaskGradient.

    Tensor hooks do not survive copy.deepcopy (nor anything else that makes new
    Parameters), while module hooks do. So the module hook checks the parameters
    themselves on every forward, i.e. before every backward, and re-hooks new ones.
    """
    for p in (bn.weight, bn.bias):
        if p is not None and p.requires_grad and not _has_mask_hook(p):
            p.register_hook(_MaskGradient(bn))


def _strip_masks(model: nn.Module) -> None:
    for m in model.modules():
        if "netslim_mask" in getattr(m, "_buffers", {}):
            del m._buffers["netslim_mask"]
        for key, hook in list(m._forward_pre_hooks.items()):
            if hook is _hold_masked_factors:
                del m._forward_pre_hooks[key]


def apply_mask(model: nn.Module, mask: dict[str, Sequence[int]]) -> nn.Module:
    """Zero gamma and beta of every channel not kept in `mask`, in place, and keep them zero.

    A gradient hook multiplies their gradients by the 0/1 mask, so SGD's weight decay and
    momentum see exact zeros too and the factors stay exactly 0 through fine-tuning
    (sign(0) = 0, so the sparsity step leaves them alone as well). The hooks survive
    copy.deepcopy and re-masking (see _hold_masked_factors).
    """
    model = unwrap_model(model)
    mods = dict(model.named_modules())
    for name, kept in mask.items():
        bn = mods.get(name)
        if not isinstance(bn, _BatchNorm) or bn.weight is None:
            raise PruneError(f"the mask names {name!r}, which is not an affine BatchNorm of this model")
        keep = torch.zeros(bn.num_features, dtype=bn.weight.dtype, device=bn.weight.device)
        keep[list(kept)] = 1
        bn.register_buffer("netslim_mask", keep, persistent=False)
        with torch.no_grad():
            bn.weight.mul_(keep)
            bn.bias.mul_(keep)
        if _hold_masked_factors not in bn._forward_pre_hooks.values():
            bn.register_forward_pre_hook(_hold_masked_factors)
        _hold_masked_factors(bn)
    meta = dict(getattr(model, "netslim_meta", {}) or {})
    meta["mask"] = {n: [int(i) for i in k] for n, k in mask.items()}
    model.netslim_meta = meta
    return model


def _masked_out(model: nn.Module, meta: dict) -> dict[str, list[int]]:
    """{bn: channels the model's stored mask removed}."""
    mods = dict(model.named_modules())
    out = {}
    for n, kept in (meta.get("mask") or {}).items():
        if isinstance(mods.get(n), _BatchNorm):
            out[n] = sorted(set(range(mods[n].num_features)) - set(map(int, kept)))
    return out


def compose_plans(outer: dict[str, Sequence[int]], inner: dict[str, Sequence[int]]) -> dict[str, list[int]]:
    """The plan relative to the dense model after `outer` then `inner` (inner indexes outer's kept)."""
    out = {n: list(map(int, k)) for n, k in outer.items()}
    for n, k in inner.items():
        out[n] = [out[n][i] for i in k] if n in out else [int(i) for i in k]
    return out


# ----------------------------------------------------------------------------------------

# Above this many values per example, counting on the meta device (no arithmetic) beats a
# real forward; below it the real forward costs milliseconds and the meta path's per-op
# overhead dominates (measured, 1 thread: 0.09 s real vs 0.62 s meta for a 24-block CIFAR
# ResNet at 3x32x32; 1.0 s real vs 0.6 s meta for ResNet-50 at 3x224x224).
_REAL_COUNT_MAX_INPUT = 3 * 96 * 96


def _count(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    from .profile import count

    return count(model, example_input=example_input,
                 on_meta=example_input[0].numel() > _REAL_COUNT_MAX_INPUT)


def prune(model: nn.Module, percent: float | None = None, *, mode: str = "slim", min_channels: int = 1,
          max_layer_percent: float | None = None, round_to: int | str = 1,
          example_input: torch.Tensor | None = None, group_score: str = DEFAULT_GROUP_SCORE,
          skip_coupled: bool = False, exclude: Sequence[str] = (),
          target_flops: float | None = None, target_params: float | None = None,
          target_latency: float | None = None, runtime: str = "torch", batch_size: int = 1,
          threads: int | None = None, compensate: bool = True) -> tuple[nn.Module, dict]:
    """Prune `model` with Network Slimming's global threshold. Returns (pruned model, report).

    Give one of `percent` (the share of BN channels to remove), `target_flops` or
    `target_params` (the fraction of the dense model's count that may remain: the percent
    is searched so the slim model lands just under it, see budget.py), `target_latency`.
    mode "slim" returns a physically smaller copy; mode "mask" a copy of the same shape whose
    pruned BN factors are zero and stay zero in training. `model` itself is not changed.
    Instead of `percent`, `target_latency` F searches the percent whose measured latency in
    `runtime` (torch or onnxruntime) at `batch_size` and `threads` is at most F x the dense
    model's (latency_target.py; the report gains "latency_target"). round_to "auto" keeps,
    per layer, the width at or above the kept count that runs fastest there (widths.py).
    compensate (default): fold the constant each removed channel still outputs into the
    layers that read it (compensate.py), in both modes alike; False is the seed's pruning.
    """
    from .checkpoint import example_input as make_example

    model = unwrap_model(model)  # DataParallel / DDP / torch.compile: prune the model inside
    if target_latency is not None:
        if percent is not None:
            raise ConfigError("give percent or target_latency, not both")
        from .latency_target import prune_to_latency
        return prune_to_latency(model, target_latency, runtime=runtime, batch_size=batch_size, threads=threads,
                                example_input=example_input, mode=mode, min_channels=min_channels,
                                max_layer_percent=max_layer_percent, round_to=round_to, group_score=group_score,
                                skip_coupled=skip_coupled, exclude=exclude, compensate=compensate)
    targets = {k: v for k, v in (("flops", target_flops), ("params", target_params)) if v is not None}
    if percent is None and not targets:
        raise ConfigError("prune needs percent (the fraction of channels to prune) or a target: "
                          "target_flops, target_params or target_latency")
    if (percent is not None) + len(targets) > 1:
        raise ConfigError("give one of percent, target_flops, target_params and target_latency, not both")
    for key, fraction in targets.items():
        check_budget(f"target_{key}", fraction)
    if mode not in ("slim", "mask"):
        raise ConfigError(f"mode must be 'slim' or 'mask', got {mode!r}")
    _check_options(0.0 if percent is None else percent, min_channels, max_layer_percent, round_to, group_score)
    meta = dict(getattr(model, "netslim_meta", {}) or {})
    if example_input is None:
        example_input = make_example(meta.get("input_size"), model)
    exclude = list(exclude) or list(meta.get("exclude", []))
    analysis = analyze(model, example_input, exclude=exclude, skip_coupled=skip_coupled)
    # Channels an earlier mask removed stay removed (the guards are applied after that).
    options = dict(min_channels=min_channels, max_layer_percent=max_layer_percent, group_score=group_score,
                   masked_out=_masked_out(model, meta))
    before = _count(model, example_input)
    budget = None
    if targets:
        (key, fraction), = targets.items()
        percent, budget = _fit_budget(model, analysis, example_input, key, fraction, before,
                                      {**options, "round_to": 1 if round_to == "auto" else round_to})
    if round_to == "auto":  # measure which widths at or above the kept counts run fastest
        from .widths import choose_widths
        plan, _, decisions = make_plan(model, analysis, percent, **options)
        options["widths"] = choose_widths(model, analysis, plan, decisions, example_input, runtime=runtime,
                                          batch_size=batch_size, threads=threads)
    plan, threshold, decisions = make_plan(model, analysis, percent, round_to=1 if round_to == "auto" else round_to,
                                           **options)
    input_size = list(example_input.shape[1:])
    source, compensation = model, None
    if compensate:
        removed = _removed_roots(analysis, plan, dict(model.named_modules()))
        source, compensation = compensate_removed(model, analysis, removed, example_input)
        if compensation.added_biases:
            meta["biases"] = sorted(set(meta.get("biases") or []) | set(compensation.added_biases))
    if mode == "slim":
        pruned = apply_plan(source, plan, example_input, analysis=analysis)
        meta["plan"] = compose_plans(meta.get("plan") or {}, plan)
        meta.pop("mask", None)
        after = _count(pruned, example_input)
        effective = after
    else:
        pruned = copy.deepcopy(source)
        _strip_masks(pruned)
        pruned = apply_mask(pruned, plan)
        meta["mask"] = pruned.netslim_meta["mask"]
        after = _count(pruned, example_input)
        effective = _count(apply_plan(pruned, plan, example_input, analysis=analysis), example_input)
    meta["input_size"] = input_size
    if exclude:
        meta["exclude"] = exclude
    pruned.netslim_meta = meta
    # Counted in BN channels (what a user counts); a coupled unit removes one of each of its BNs.
    mods = dict(model.named_modules())
    total = sum(mods[n].num_features for n in analysis.bn_names)
    kept = total - sum(d.channels - d.channels_kept for d in decisions)
    report = {
        "mode": mode, "percent": percent, "threshold": threshold if percent > 0 else None,
        "group_score": group_score, "min_channels": min_channels,
        "max_layer_percent": max_layer_percent, "round_to": round_to,
        "channels_total": total, "channels_kept": kept,
        "units_total": sum(d.total for d in decisions), "units_kept": sum(d.kept for d in decisions),
        # of every BN channel in the model, those inside an untraced submodule included
        "removed_share": (total - kept) / max(sum(m.num_features for m in mods.values()
                                                  if isinstance(m, _BatchNorm)), 1),
        "layers": [d.as_dict() for d in decisions],
        "guarded": [d.name for d in decisions if d.guard],
        "unprunable": dict(analysis.unprunable),
        "untraceable": dict(analysis.untraceable),
        "coupled": ["+".join(layer) for layer in analysis.coupled_layers()],
        "before": before, "after": after, "effective": effective,
        "compensation": compensation.as_dict() if compensation else None,
    }
    if budget is not None:
        report["budget"] = budget
    report["shortfall"] = explain_shortfall(report, decisions, mods) if budget is None else None
    log.info("pruned %d of %d channels (threshold %.4g)", total - kept, total, report["threshold"] or 0)
    return pruned, report


def _fit_budget(model, analysis, example_input, key, fraction, dense, options) -> tuple[float, dict]:
    """The percent whose slim model keeps at most `fraction` of the dense `key` count."""
    _, values = unit_scores(model, analysis, options["group_score"])
    n_values = max(int(values.numel()), 1)

    def measure(percent: float) -> int:
        plan = make_plan(model, analysis, percent, **options)[0]
        return _count(apply_plan(model, plan, example_input, analysis=analysis), example_input)[key]

    if not analysis.units:
        measure = lambda percent: dense[key]  # noqa: E731 (nothing prunable: the dense count)
    percent, reached, steps = search_percent(n_values, measure, fraction * dense[key], dense[key], key)
    return percent, budget_report(key, fraction, reached, dense[key], percent, steps)


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
        why = sorted({w for w in unprunable.values()}, key=list(unprunable.values()).count, reverse=True)
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
