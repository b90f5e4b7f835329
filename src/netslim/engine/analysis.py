"""The analysis, end to end: trace -> slots -> classes -> prunable units (`analyze`).

A *unit* is one prunable class: BN channels that live or die together, scored as a group.
Unknown ops on a BN's channel path are an error that names every such op, where it is, and
the way out, never a wrong model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import PruneError
from ..gc_pause import paused_gc
from ..wrappers import unwrap_model
from .classes import Classes, classify_bns, resolve_gates, varying_inputs
from . import rules
from .channels import AttrUse, ModuleUse, compress
from .slots import SlotWalk
from .trace import source_lines, trace, where


@dataclass
class Unit:
    """One prunable class: BN channels that live or die together, scored as a group."""
    root: int
    bn_channels: list[tuple[str, int]]       # (bn name, channel index)
    layer: tuple[str, ...]                   # the BN modules involved: the "layer" for guards


@dataclass
class UnitTable:
    """The units as flat tensors, for the plan's steps to index instead of looping per channel.

    Positions are *flat*: every BN of `Analysis.bn_names` in turn, one position per channel
    (`bn_offset[b] + j` is channel j of BN b). Members are listed unit after unit, each in
    its `bn_channels` order."""
    bn_offset: torch.Tensor       # [len(bn_names) + 1]: where each BN's channels start (and the end)
    member_flat: torch.Tensor     # flat position of each member channel
    member_unit: torch.Tensor     # the unit (index into Analysis.units) of each member
    unit_size: torch.Tensor       # members per unit
    unit_root: list[int]          # each unit's class root
    layers: list[tuple[str, ...]]         # every unit's `layer`, in order of first appearance
    layer_units: list[torch.Tensor]       # the units of each layer, in unit order

    @property
    def channels(self) -> int:
        """Flat positions in all: every channel of every BN in bn_names."""
        return int(self.bn_offset[-1])


@dataclass
class Analysis:
    modules: dict[str, ModuleUse]
    units: list[Unit]
    unprunable: dict[str, str]               # bn name -> why its channels stay
    bn_names: list[str]                      # every affine BN, in graph order
    parent: list[int]                        # union-find over slots, compressed: parent[s] is s's root
    # (follower slot, leader slot): the follower's class goes when the leader's does (a gate
    # and its producer, whose values only ever reach a product with the leader's channels)
    follows: list[tuple[int, int]] = field(default_factory=list)
    attrs: dict[str, AttrUse] = field(default_factory=dict)  # per-channel tensors to slice
    untraceable: dict[str, str] = field(default_factory=dict)  # module traced as one call -> why
    # conv/linear -> input positions that vary with the input although made of removed BN
    # channels (gated by other channels): compensation leaves them alone (classes.varying_inputs)
    varying_inputs: dict[str, frozenset[int]] = field(default_factory=dict)
    graph: fx.GraphModule | None = None      # the traced model the analysis walked

    def __post_init__(self) -> None:
        compress(self.parent)  # the classes are final: find is one lookup from here on

    def find(self, s: int) -> int:
        """The root of slot s's class (the analysis is read-only: no union after it)."""
        return self.parent[s]

    @cached_property
    def table(self) -> UnitTable:
        """The units as flat tensors (UnitTable), built once per analysis."""
        sizes = [len(self.modules[n].out_slots) for n in self.bn_names]
        offset = [0]
        for size in sizes:
            offset.append(offset[-1] + size)
        start = dict(zip(self.bn_names, offset))
        flat = [start[n] + j for u in self.units for n, j in u.bn_channels]
        unit_size = torch.tensor([len(u.bn_channels) for u in self.units], dtype=torch.long)
        by_layer: dict[tuple[str, ...], list[int]] = {}
        for k, u in enumerate(self.units):
            by_layer.setdefault(u.layer, []).append(k)
        return UnitTable(torch.tensor(offset, dtype=torch.long), torch.tensor(flat, dtype=torch.long),
                         torch.repeat_interleave(torch.arange(len(self.units)), unit_size), unit_size,
                         [u.root for u in self.units], list(by_layer),
                         [torch.tensor(k, dtype=torch.long) for k in by_layer.values()])

    def coupled_layers(self) -> list[tuple[str, ...]]:
        return sorted({u.layer for u in self.units if len(u.layer) > 1})


@paused_gc()  # its many small objects would trigger full collections (see prune.py)
def analyze(model: nn.Module, example_input: torch.Tensor, *, exclude: Sequence[str] = (),
            skip_coupled: bool = False, strict: bool = True) -> Analysis:
    """Trace `model` and find its prunable channel units (see the module docstring).

    strict: a BN whose channels reach an op netslim cannot slice is an error (PruneError,
    naming the op and the way out); with strict=False it is just left unpruned.
    """
    model = unwrap_model(model)
    exclude = set(exclude)
    mods = dict(model.named_modules())
    unknown_names = [n for n in exclude if n not in mods]
    if unknown_names:
        raise PruneError(f"exclude names no module of the model: {', '.join(sorted(unknown_names))}")
    opaque = {n for n in exclude if not isinstance(mods[n], _BatchNorm)}
    gm = trace(model, example_input, opaque)
    an = SlotWalk(model, gm, exclude)
    an.run()
    varying = varying_inputs(an)  # before gates and BNs tie more slots
    cs = Classes(an)
    follows = resolve_gates(an, cs)
    classify_bns(an, cs)
    compress(an.parent)  # the classes are final: each find from here on is one step

    candidates = {n for n in an.bn_order if n not in exclude and an.uses.get(n) is not None
                  and an.uses[n].kind == "bn"}
    by_root: dict[int, list[tuple[str, int]]] = {}
    for name in an.bn_order:
        use = an.uses.get(name)
        if use is None or use.kind != "bn":
            continue
        for j, s in enumerate(use.out_slots):
            by_root.setdefault(an.find(s), []).append((name, j))

    units: list[Unit] = []
    unprunable: dict[str, str] = {}
    blocked: dict[str, list[str]] = {}  # op it cannot slice -> the BNs whose channels reach it
    position = {n: k for k, n in enumerate(an.bn_order)}
    for root, members in by_root.items():
        layer = tuple(sorted({n for n, _ in members}, key=position.__getitem__))
        why = None
        fatal = [r for f, r in cs.pins.get(root, []) if f]
        soft = [r for f, r in cs.pins.get(root, []) if not f]
        if any(n not in candidates for n, _ in members):
            why = "excluded" if any(n in exclude for n, _ in members) else "not a candidate"
        elif soft:
            why = soft[0]
        elif cs.free[root]:
            why = "its channels are also produced outside BatchNorm (a shared stream)"
        elif fatal and not strict:
            why = fatal[0]
        elif fatal:
            blocked.setdefault(fatal[0], []).extend(layer)
            continue
        elif skip_coupled and len(layer) > 1:
            why = "coupled with " + ", ".join(layer) + " (skip_coupled)"
        if why:
            for n in layer:
                unprunable.setdefault(n, why)
            continue
        units.append(Unit(root, members, layer))
    if blocked:
        raise PruneError(_blocked_message(blocked, an.blockers, mods, source_lines(model, gm)))
    # A BN is reported unprunable only if none of its channels ended in a unit.
    in_units = {n for u in units for n, _ in u.bn_channels}
    unprunable = {n: w for n, w in unprunable.items() if n not in in_units}
    untraceable = dict(getattr(gm, "netslim_untraceable", {}))
    one_call = {u: "which torch.fx cannot trace" for u in untraceable}
    one_call.update({n: f"a {type(m).__name__} registered with netslim.register_module"
                     for n, m in mods.items() if rules.is_registered_leaf(m)})
    for inner, m in mods.items():  # BNs inside a module traced as one call keep their channels
        owner = next((u for u in one_call if inner.startswith(u + ".")), None)
        if owner and isinstance(m, _BatchNorm):
            unprunable.setdefault(inner, f"inside {owner}, {one_call[owner]}")
    return Analysis(an.uses, units, unprunable, list(an.bn_order), an.parent, follows, an.attr_uses,
                    untraceable, varying, gm)


def _blocked_message(blocked: dict[str, list[str]], blockers: dict[str, fx.Node], mods: dict[str, nn.Module],
                     sources: dict[str, str]) -> str:
    """One line naming every op that blocks pruning, where it is, which BNs reach it, and the
    ways out: exclude those BNs, or tell netslim what the module around the op does."""
    places = []
    every_bn: list[str] = []
    for k, (reason, bns) in enumerate(blocked.items(), 1):
        bns = list(dict.fromkeys(bns))
        every_bn.extend(b for b in bns if b not in every_bn)
        node = blockers.get(reason)
        places.append(f"[{k}] {reason}{where(node, sources.get(node.name) if node else None)}, "
                      f"reached by BatchNorm {', '.join(bns)}")
    names = ", ".join(f"'{n}'" for n in every_bn)
    owners = list(dict.fromkeys(c for c in (_user_module_class(blockers.get(r), mods) for r in blocked) if c))
    return (f"cannot prune: BatchNorm channels reach {len(places)} op(s) whose channel handling netslim "
            f"does not know: {'; '.join(places)}. Leave those BatchNorms out with exclude=[{names}] "
            f"(--exclude {' '.join(every_bn)}), or make each op's module opaque the same way, or tell netslim "
            f"what the module does: netslim.register_module({' / '.join(owners) or 'YourModule'}, "
            "netslim.rules.channelwise(params=(...)) | netslim.rules.passthrough() | "
            "netslim.rules.keeps_channels(why))")


def _user_module_class(node: fx.Node | None, mods: dict[str, nn.Module]) -> str | None:
    """The class name of the innermost module of the user's own code that holds `node`."""
    if node is None:
        return None
    path = node.target if node.op == "call_module" else \
        next(reversed([v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]), None)
    m = mods.get(path) if isinstance(path, str) and path else None
    if m is None or type(m).__module__.startswith("torch."):
        return None
    return type(m).__name__
