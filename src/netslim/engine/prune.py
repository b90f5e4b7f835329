"""The pruning entry: analyse -> plan -> compensate -> slim or mask, with the report.

    pruned, report = netslim.prune(model, 0.5)                 # physically smaller model
    masked, report = netslim.prune(model, 0.5, mode="mask")    # same shape, factors held at 0
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..budget import budget_report, check_budget, search_percent
from ..errors import ConfigError
from ..gc_pause import paused_gc
from ..meta_shapes import prefer_meta
from ..wrappers import unwrap_model
from . import blocks
from .analysis import analyze
from .compensate import _weights_memo, compensate as compensate_removed
from .copying import clone_model
from .counts import GraphCount
from .mask import apply_mask, strip_masks
from .plan import (DEFAULT_GROUP_SCORE, check_options, compose_plans, explain_shortfall, make_plan,
                   masked_out, removed_roots, unit_scores)
from .slim import apply_plan, own_tensors, removed_slots, slice_in_place
from .trace import example_input as make_example

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------

def _count(model: nn.Module, example_input: torch.Tensor, counter: GraphCount | None = None,
           kept_slot: np.ndarray | None = None, modules: dict[str, nn.Module] | None = None) -> dict[str, int]:
    """profile.count(model, example_input): read off the analysis's graph by `counter` (of the
    traced model; with `kept_slot`, of its copy sliced to those slots) when it proves the count
    equal, else by a forward. `modules`: dict(model.named_modules()) if the caller has it."""
    from ..profile import count

    counted = counter.count(model, kept_slot, modules) if counter is not None else None
    if counted is not None:
        return counted
    return count(model, example_input=example_input, on_meta=prefer_meta(example_input))


# The analysis makes hundreds of thousands of small lists and tuples; each one the cyclic GC
# counts towards a collection that walks every object of the process (torch alone holds
# ~300k): a third of a prune call's time went to it (measured, 1 thread, MobileNetV2 at
# 32x32: 0.21 of 0.73 s). What the call leaves as garbage is collected after it.
@paused_gc()
def prune(model: nn.Module, percent: float | None = None, *, mode: str = "slim", min_channels: int = 1,
          max_layer_percent: float | None = None, round_to: int | str = 1,
          example_input: torch.Tensor | None = None, group_score: str = DEFAULT_GROUP_SCORE,
          skip_coupled: bool = False, exclude: Sequence[str] = (),
          target_flops: float | None = None, target_params: float | None = None,
          target_latency: float | None = None, runtime: str = "torch", batch_size: int = 1,
          threads: int | None = None, compensate: bool = True, remove_blocks: bool = True
          ) -> tuple[nn.Module, dict]:
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
    remove_blocks (default): a residual branch whose every BN factor is at or under the
    threshold is removed whole (blocks.py) instead of keeping min_channels per layer;
    False (with compensate=False) is the seed's rule exactly. Not with max_layer_percent.
    """
    model = unwrap_model(model)  # DataParallel / DDP / torch.compile: prune the model inside
    if target_latency is not None:
        if percent is not None:
            raise ConfigError("give percent or target_latency, not both")
        from ..latency_target import prune_to_latency
        return prune_to_latency(model, target_latency, runtime=runtime, batch_size=batch_size, threads=threads,
                                example_input=example_input, mode=mode, min_channels=min_channels,
                                max_layer_percent=max_layer_percent, round_to=round_to, group_score=group_score,
                                skip_coupled=skip_coupled, exclude=exclude, compensate=compensate,
                                remove_blocks=remove_blocks)
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
    check_options(0.0 if percent is None else percent, min_channels, max_layer_percent, round_to, group_score)
    meta = dict(getattr(model, "netslim_meta", {}) or {})
    if example_input is None:
        example_input = make_example(meta.get("input_size"), model)
    exclude = list(exclude) or list(meta.get("exclude", []))
    analysis = analyze(model, example_input, exclude=exclude, skip_coupled=skip_coupled)
    # Of the user's model, which nothing below changes: one walk of it for every step that reads it.
    mods = dict(model.named_modules())
    # Channels an earlier mask removed stay removed (the guards are applied after that).
    options = dict(min_channels=min_channels, max_layer_percent=max_layer_percent, group_score=group_score,
                   masked_out=masked_out(model, meta, mods), modules=mods)
    counter = GraphCount.of(model, analysis, mods)  # None: the counts run profile.count's forward
    before = _count(model, example_input, counter, modules=mods)
    budget = None
    removal = blocks.BlockRemoval(model, analysis, example_input, set(exclude) | set(analysis.untraceable),
                                  options["masked_out"], mods) if remove_blocks and max_layer_percent is None else None
    if targets:
        (key, fraction), = targets.items()
        percent, budget = _fit_budget(model, analysis, example_input, key, fraction, before,
                                      {**options, "round_to": 1 if round_to == "auto" else round_to}, removal,
                                      counter)
    if round_to == "auto":  # measure which widths at or above the kept counts run fastest
        from ..widths import choose_widths
        plan, _, decisions = make_plan(model, analysis, percent, **options)
        options["widths"] = choose_widths(model, analysis, plan, decisions, example_input, runtime=runtime,
                                          batch_size=batch_size, threads=threads)
    plan, threshold, decisions = make_plan(model, analysis, percent, round_to=1 if round_to == "auto" else round_to,
                                           **options)
    removed_blocks = []
    if removal is not None:  # dead residual branches go whole (their BNs keep no channel)
        plan, removed_blocks = removal(plan, threshold, decisions)
    input_size = list(example_input.shape[1:])
    source, compensation = model, None
    removed = removed_roots(analysis, blocks.plan_for_slicing(plan, analysis, removed_blocks), mods)
    # the slim model's widths, for its counts (a removed block changes the graph: counted by a forward)
    kept_slot = ~removed_slots(analysis, removed)
    slim_counter = counter if not removed_blocks else None
    if compensate:
        source, compensation = compensate_removed(
            model, analysis, removed, example_input,
            skip={m for b in removed_blocks for m in b.modules}, share_weights=mode == "slim", modules=mods)
        if compensation.added_biases:
            meta["biases"] = sorted(set(meta.get("biases") or []) | set(compensation.added_biases))
    if mode == "slim":  # the compensated copy is ours to slice; the user's model is copied first
        # (sharing its conv and linear weights, as compensate's copy does: slicing makes new
        # tensors, and own_tensors copies what it left whole)
        copied = clone_model(model, _weights_memo(model, mods)) if source is model else source
        pruned = slice_in_place(copied, plan, analysis, branches=removed_blocks, removed=removed, kept_slot=kept_slot)
        pruned_mods = dict(pruned.named_modules())  # own_tensors changes tensors, not modules
        pruned = own_tensors(pruned, model, modules=pruned_mods, original_modules=mods)
        meta["plan"] = compose_plans(meta.get("plan") or {}, plan)
        meta.pop("mask", None)
        after = _count(pruned, example_input, slim_counter, kept_slot, pruned_mods)
        effective = after
    else:
        pruned = source if source is not model else clone_model(source)
        strip_masks(pruned)
        pruned = apply_mask(pruned, plan)
        meta["mask"] = pruned.netslim_meta["mask"]
        after = _count(pruned, example_input, counter)  # the dense shapes, with the compensated biases
        effective = _count(apply_plan(pruned, plan, example_input, analysis=analysis, branches=removed_blocks),
                           example_input, slim_counter, kept_slot)
    meta["input_size"] = input_size
    if exclude:
        meta["exclude"] = exclude
    pruned.netslim_meta = meta
    # Counted in BN channels (what a user counts); a coupled unit removes one of each of its BNs.
    total = sum(mods[n].num_features for n in analysis.bn_names)
    kept = total - sum(d.channels - d.channels_kept for d in decisions)
    if removed_blocks:  # every channel of their BNs, unprunable ones too
        kept = blocks.kept_channels(mods, analysis.bn_names, plan)
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
        "remove_blocks": removal is not None,
        "removed_blocks": [b.as_dict() for b in removed_blocks],
    }
    if budget is not None:
        report["budget"] = budget
    report["shortfall"] = explain_shortfall(report, decisions, mods) if budget is None else None
    log.info("pruned %d of %d channels (threshold %.4g)", total - kept, total, report["threshold"] or 0)
    return pruned, report


def _fit_budget(model, analysis, example_input, key, fraction, dense, options, removal=None,
                counter=None) -> tuple[float, dict]:
    """The percent whose slim model keeps at most `fraction` of the dense `key` count."""
    mods = options["modules"]
    _, values = unit_scores(model, analysis, options["group_score"], mods)
    n_values = max(int(values.numel()), 1)

    def measure(percent: float) -> int:
        plan, threshold, decisions = make_plan(model, analysis, percent, **options)
        plan, gone = removal(plan, threshold, decisions) if removal is not None else (plan, [])
        slim = apply_plan(model, plan, example_input, analysis=analysis, branches=gone)
        if gone:  # a removed block changes the graph: counted by a forward
            return _count(slim, example_input)[key]
        return _count(slim, example_input, counter, ~removed_slots(analysis, removed_roots(analysis, plan, mods)))[key]

    if len(analysis.table.unit_size) == 0:  # nothing prunable: the dense count
        measure = lambda percent: dense[key]  # noqa: E731
    percent, reached, steps = search_percent(n_values, measure, fraction * dense[key], dense[key], key)
    return percent, budget_report(key, fraction, reached, dense[key], percent, steps)


