"""Step 5a: slim. `apply_plan` turns a model and a plan into a physically smaller copy by
slicing every module that touches a removed channel.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..layers import INDEXED_BN, is_indexed_bn
from ..wrappers import unwrap_model
from . import blocks
from .analysis import Analysis, analyze
from .copying import clone_model
from .mask import strip_masks
from .plan import removed_roots
from .trace import example_input as make_example


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _sliced(t: torch.Tensor, *index: Sequence[int] | None) -> nn.Parameter:
    """A new parameter of t's entries at index[d] along each dim d (None or every position:
    all of them): one copy, however many dims are sliced."""
    out = t.detach()
    for dim, positions in enumerate(index):
        if positions is not None and len(positions) < out.shape[dim]:  # keep() lists ascending positions
            out = out.index_select(dim, torch.as_tensor(positions, dtype=torch.long, device=out.device))
    return nn.Parameter(out if out.data_ptr() != t.data_ptr() else out.clone(), requires_grad=True)


def apply_plan(model: nn.Module, plan: dict[str, Sequence[int]], example_input: torch.Tensor | None = None,
               *, exclude: Sequence[str] = (), analysis: Analysis | None = None,
               branches: Sequence[blocks.Branch] | None = None) -> nn.Module:
    """A physically smaller copy of `model` that keeps, per BN, the channels in `plan`.

    Every module that reads or writes a removed channel is sliced: producer convs/linears
    lose output channels, consumers lose input channels (per flatten block for a Linear),
    depthwise convs lose groups, and a BN that reads a stream which must keep its width
    becomes an IndexedBatchNorm that gathers only its kept channels. BNs the plan keeps no
    channel of form residual branches that are removed whole (blocks.py; `branches`: the
    removable ones if known, else found by tracing).
    """
    model = unwrap_model(model)
    if analysis is None:
        meta = getattr(model, "netslim_meta", {}) or {}
        if example_input is None:
            example_input = make_example(meta.get("input_size"), model)
        analysis = analyze(model, example_input, exclude=exclude, strict=False)
    return slice_in_place(clone_model(model), plan, analysis, exclude=exclude, branches=branches)


def slice_in_place(model: nn.Module, plan: dict[str, Sequence[int]], analysis: Analysis, *,
                   exclude: Sequence[str] = (), branches: Sequence[blocks.Branch] | None = None,
                   removed: set[int] | None = None, kept_slot: np.ndarray | None = None) -> nn.Module:
    """apply_plan on `model` itself, no copy: for a private copy the caller owns (`analysis`
    is of the model it was copied from, or of itself). `removed`: the caller's
    removed_roots of the plan with `branches` removed (computed here if not given), and
    `kept_slot` its ~removed_slots if the caller has that too."""
    new = model
    meta = dict(getattr(new, "netslim_meta", {}) or {})
    mods = dict(new.named_modules())
    strip_masks(new, mods.values())
    # Whole residual branches first: the rest of the plan is sliced as usual, then they go.
    untouchable = set(exclude) | set(analysis.untraceable)
    removed_branches = [b for b in branches if set(b.bns) <= blocks.emptied_bns(plan)] if branches is not None \
        else blocks.branches_for_plan(new, plan, analysis, untouchable)
    plan = blocks.plan_for_slicing(plan, analysis, removed_branches)
    if removed is None or branches is None or len(removed_branches) < len(branches):
        removed, kept_slot = removed_roots(analysis, plan, mods), None
    if kept_slot is None:
        kept_slot = ~removed_slots(analysis, removed)

    def keep(slots: Sequence[int]) -> np.ndarray:
        return np.flatnonzero(kept_slot[analysis.slot_array(slots)])

    with torch.no_grad():
        for name, use in analysis.modules.items():
            SLICERS[use.kind](new, name, mods[name], use, keep, analysis)
        for attr in analysis.attrs.values():
            kept_channels = keep(attr.slots)
            if len(kept_channels) < len(attr.slots):
                _slice_attr(new, attr.target, attr.dim, kept_channels)
    new = blocks.remove_branches(new, removed_branches, untouchable)
    new.netslim_meta = meta
    return new


def removed_slots(analysis: Analysis, removed: set[int]) -> np.ndarray:
    """Per slot: is its class in `removed` (removed_roots)? One table for every lookup
    instead of a class lookup per channel per module."""
    parent = analysis.slot_array(analysis.parent)  # each slot's class root (a slot itself)
    removed_root = np.zeros(len(parent), dtype=bool)  # per slot: the root of a removed class?
    removed_root[np.fromiter(removed, np.intp, len(removed))] = True
    return removed_root[parent]  # a lookup per slot: np.isin sorted both (3x as long)


def own_tensors(model: nn.Module, original: nn.Module, *, modules: dict[str, nn.Module] | None = None,
                original_modules: dict[str, nn.Module] | None = None) -> nn.Module:
    """Give `model` its own copy of every parameter and buffer it still shares with
    `original` (a copy made sharing weights, then sliced: the sliced ones are new already);
    tied parameters stay tied. `modules`, `original_modules`: dict(model.named_modules()) and
    dict(original.named_modules()) if the caller has them."""
    if original_modules is None:
        foreign = {id(t) for t in (*original.parameters(), *original.buffers())}
    else:
        foreign = {id(t) for m in original_modules.values() for store in (m._parameters, m._buffers)
                   for t in store.values() if t is not None}
    copies: dict[int, torch.Tensor] = {}
    for m in model.modules() if modules is None else modules.values():
        for store in (m._parameters, m._buffers):
            for key, t in store.items():
                if t is not None and id(t) in foreign:
                    if id(t) not in copies:
                        data = t.detach().clone()
                        copies[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) \
                            if isinstance(t, nn.Parameter) else data
                    store[key] = copies[id(t)]
    return model


# One slicer per ModuleUse kind (channels.USE_KINDS): (model, name, module, use, keep, analysis),
# where keep(slots) is the ascending positions of the kept channels among `slots` (a NumPy array).

def _slice_conv(model, name, m, use, keep, analysis) -> None:
    ki, ko = keep(use.in_slots), keep(use.out_slots)
    if len(ki) == m.in_channels and len(ko) == m.out_channels:
        return
    m.weight = _sliced(m.weight, ko, ki)
    if m.bias is not None:
        m.bias = _sliced(m.bias, ko)
    m.in_channels, m.out_channels = len(ki), len(ko)


def _slice_grouped_conv(model, name, m, use, keep, analysis) -> None:
    ki, ko = keep(use.in_slots), keep(use.out_slots)
    if len(ki) == m.in_channels and len(ko) == m.out_channels:
        return
    # slots.py ties position j of every group, so each group keeps the same
    # positions: slice the weight's per-group input dim by group 0's.
    per_in = m.in_channels // m.groups
    kj = ki[ki < per_in]
    m.weight = _sliced(m.weight, ko, kj)
    if m.bias is not None:
        m.bias = _sliced(m.bias, ko)
    m.in_channels, m.out_channels = len(ki), len(ko)


def _slice_depthwise_conv(model, name, m, use, keep, analysis) -> None:
    k = keep(use.in_slots)
    if len(k) == m.in_channels:
        return
    m.weight = _sliced(m.weight, k)
    if m.bias is not None:
        m.bias = _sliced(m.bias, k)
    m.in_channels = m.out_channels = m.groups = len(k)


def _slice_linear(model, name, m, use, keep, analysis) -> None:
    ki, ko = keep(use.in_slots), keep(use.out_slots)
    if len(ki) == len(use.in_slots) and len(ko) == m.out_features:
        return
    b = use.in_block
    cols = (ki[:, None] * b + np.arange(b)).ravel()
    m.weight = _sliced(m.weight, ko, cols)
    if m.bias is not None:
        m.bias = _sliced(m.bias, ko)
    m.in_features, m.out_features = len(cols), len(ko)


def _slice_channelwise(model, name, m, use, keep, analysis) -> None:
    """A registered rules.channelwise module: its per-channel tensors lose the removed channels
    (one of size 1 along the channel dim is broadcast, and stays)."""
    k = keep(use.in_slots)
    if len(k) == len(use.in_slots):
        return
    for p in use.params:
        if getattr(m, p).shape[use.param_dim] == len(use.in_slots):
            _slice_attr(model, f"{name}.{p}", use.param_dim, k)


def _slice_attr(model: nn.Module, target: str, dim: int, index: list[int]) -> None:
    """Keep `index` along `dim` of the tensor attribute `target` (a layer scale...)."""
    owner_name, _, attr = target.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    t = getattr(owner, attr)
    sliced = t.detach().index_select(dim, torch.as_tensor(index, dtype=torch.long, device=t.device))
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(sliced, requires_grad=t.requires_grad)
    else:  # slots.py tracks only parameters and buffers
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
        # A removed input slot is never read by a kept channel (classes.py ties such channels).
        in_slots_full = use.input_slots
        kept_in = keep(in_slots_full)
        src = np.searchsorted(kept_in, analysis.slot_array(in_all)[ko])  # rank among the kept inputs
        in_width_after = len(kept_in)
    identity = len(src) == in_width_after and bool((src == np.arange(in_width_after)).all())
    if len(ko) == m.num_features and identity and not is_indexed_bn(m):
        return
    # One index for the four per-channel tensors; index_select always makes a new tensor, so
    # none is shared with the model sliced (a gathering BN may keep every channel).
    device = next((t.device for t in (m.weight, m.running_var) if t is not None), None)
    index = torch.as_tensor(ko, dtype=torch.long, device=device)
    sliced = {}
    for key in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(m, key, None)
        if t is not None:
            sliced[key] = t.detach().index_select(0, index)
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
        new.register_buffer("keep_index", torch.as_tensor(src, dtype=torch.long,
                                                        device=sliced["weight"].device))
        if m.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(m.num_batches_tracked)
        new.train(m.training)
        target = new
        _set_module(model, name, new)
    else:
        if is_indexed_bn(m):  # identity gather: a plain BN again is enough, but keep the type stable
            m.keep_index = torch.as_tensor(src, dtype=torch.long, device=m.keep_index.device)
        target = m
    target.num_features = len(ko)
    if sliced.get("weight") is not None:
        target.weight = nn.Parameter(sliced["weight"], requires_grad=True)
        target.bias = nn.Parameter(sliced["bias"], requires_grad=True)
    if sliced.get("running_mean") is not None:
        target.running_mean = sliced["running_mean"]
        target.running_var = sliced["running_var"]



SLICERS = {"conv": _slice_conv, "gconv": _slice_grouped_conv, "dwconv": _slice_depthwise_conv,
           "linear": _slice_linear, "bn": _slice_bn, "bn_passive": _slice_bn, "channelwise": _slice_channelwise}
