"""The analysis, end to end: trace -> slots -> classes -> prunable units (`analyze`).

A *unit* is one prunable class: BN channels that live or die together, scored as a group.
Unknown ops on a BN's channel path are an error that names every such op, where it is, and
the way out, never a wrong model.
"""
from __future__ import annotations

from dataclasses import InitVar, dataclass, field
from functools import cached_property
from itertools import chain
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
from .channels import AttrUse, ModuleUse, SlotArrays, compress, long_tensor
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
    unit_root: torch.Tensor       # each unit's class root
    layers: list[tuple[str, ...]]         # every unit's `layer`, in order of first appearance
    layer_units: list[torch.Tensor]       # the units of each layer, in unit order

    @property
    def channels(self) -> int:
        """Flat positions in all: every channel of every BN in bn_names."""
        return int(self.bn_offset[-1])

    def bn_and_channel(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index into bn_names, channel index) of each of the flat positions `flat`."""
        # right=True: a BN without channels shares its offset with the next, which holds the position
        bn = torch.searchsorted(self.bn_offset, flat, right=True) - 1
        return bn, flat - self.bn_offset[bn]

    @staticmethod
    def of(units: list[Unit], bn_names: list[str], sizes: list[int]) -> UnitTable:
        """The table of `units`; sizes: the channel count of each BN of bn_names."""
        offset = torch.tensor([0, *sizes], dtype=torch.long).cumsum(0)
        start = dict(zip(bn_names, offset.tolist()))
        flat = torch.tensor([start[n] + j for u in units for n, j in u.bn_channels], dtype=torch.long)
        unit_size = torch.tensor([len(u.bn_channels) for u in units], dtype=torch.long)
        layer_id: dict[tuple[str, ...], int] = {}
        unit_layer = long_tensor(layer_id.setdefault(u.layer, len(layer_id)) for u in units)
        return UnitTable.grouped(offset, flat, unit_size, long_tensor(u.root for u in units), unit_layer,
                                 list(layer_id))

    @staticmethod
    def grouped(bn_offset: torch.Tensor, member_flat: torch.Tensor, unit_size: torch.Tensor, unit_root: torch.Tensor,
                unit_layer: torch.Tensor, layers: list[tuple[str, ...]]) -> UnitTable:
        """The table, with the units grouped by layer. unit_layer: each unit's index into
        `layers`, the layers numbered in order of first appearance."""
        by_layer = torch.argsort(unit_layer, stable=True)  # each layer's units, in unit order
        per_layer = torch.bincount(unit_layer, minlength=len(layers)).tolist()
        return UnitTable(bn_offset, member_flat, torch.repeat_interleave(torch.arange(len(unit_size)), unit_size),
                         unit_size, unit_root, layers, list(torch.split(by_layer, per_layer)))


@dataclass
class Analysis:
    """What analyze() found. The engine's steps read the units off `table`; `units` (one Unit
    per unit, thousands of small objects) is built from it on first read, for the few
    readers that iterate units one by one (block removal, round_to="auto")."""
    modules: dict[str, ModuleUse]
    # the units of an analysis built by hand (its table is built from them); analyze() passes None
    given_units: InitVar[list[Unit] | None]
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
    table: UnitTable | None = None           # the units as flat tensors (from given_units if not given)
    # per graph node: the slot walk's ChannelInfo of its output (its channel dim's slots), for
    # reading a slim model's widths off the graph (counts.py)
    chans: dict[fx.Node, object] = field(default_factory=dict)
    # slot_array(a slot list of this analysis): it as a NumPy index array, converted once
    slot_array: SlotArrays = field(default_factory=SlotArrays, repr=False, compare=False)

    def __post_init__(self, given_units: list[Unit] | None) -> None:
        if given_units is not None:
            self.units = given_units  # shadows the cached property: nothing to build
        if self.table is None:  # not from analyze(), which compresses the classes and builds the table
            compress(self.parent)  # the classes are final: find is one lookup from here on
            sizes = [len(self.modules[n].out_slots) if n in self.modules else 0 for n in self.bn_names]
            self.table = UnitTable.of(self.units, self.bn_names, sizes)

    @cached_property
    def units(self) -> list[Unit]:
        """Every unit, in table order: unit k holds the members of `table.member_unit == k`,
        in table order, and its layer is the one of `table.layers` whose layer_units hold k
        (so UnitTable.of(units, ...) is the table again)."""
        t = self.table
        layer_of: list[tuple[str, ...]] = [()] * len(t.unit_size)
        for layer, members in zip(t.layers, t.layer_units):
            for k in members.tolist():
                layer_of[k] = layer
        channels = self.bn_channels(t.member_flat)
        roots, ends = t.unit_root.tolist(), t.unit_size.cumsum(0).tolist()
        return [Unit(r, channels[a:b], layer) for r, a, b, layer in zip(roots, [0, *ends[:-1]], ends, layer_of)]

    def bn_channels(self, flat: torch.Tensor) -> list[tuple[str, int]]:
        """(bn name, channel index) of each of the flat positions `flat` (see UnitTable)."""
        bn, channel = self.table.bn_and_channel(flat)
        return list(zip(map(self.bn_names.__getitem__, bn.tolist()), channel.tolist()))

    def find(self, s: int) -> int:
        """The root of slot s's class (the analysis is read-only: no union after it)."""
        return self.parent[s]

    def coupled_layers(self) -> list[tuple[str, ...]]:
        return sorted(layer for layer in self.table.layers if len(layer) > 1)


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
    gm = trace(model, example_input, opaque, mods)
    an = SlotWalk(model, gm, exclude, mods)
    an.run()
    varying = varying_inputs(an)  # before gates and BNs tie more slots
    cs = Classes(an)
    follows = resolve_gates(an, cs)
    classify_bns(an, cs)
    root = compress(an.parent)  # the classes are final: each find from here on is one step

    table, unprunable, blocked = _units(an, cs, root, mods, exclude, skip_coupled, strict)
    if blocked:
        raise PruneError(_blocked_message(blocked, an.blockers, mods, source_lines(model, gm)))
    # A BN is reported unprunable only if none of its channels ended in a unit.
    in_units = {n for layer in table.layers for n in layer}
    unprunable = {n: w for n, w in unprunable.items() if n not in in_units}
    untraceable = dict(getattr(gm, "netslim_untraceable", {}))
    one_call = {u: "which torch.fx cannot trace" for u in untraceable}
    one_call.update({n: f"a {type(m).__name__} registered with netslim.register_module"
                     for n, m in mods.items() if rules.is_registered_leaf(m)})
    for inner, m in mods.items():  # BNs inside a module traced as one call keep their channels
        owner = next((u for u in one_call if inner.startswith(u + ".")), None)
        if owner and isinstance(m, _BatchNorm):
            unprunable.setdefault(inner, f"inside {owner}, {one_call[owner]}")
    return Analysis(an.uses, None, unprunable, list(an.bn_order), an.parent, follows, an.attr_uses,
                    untraceable, varying, gm, table, an.chans)


def _units(an: SlotWalk, cs: Classes, root: torch.Tensor, mods: dict[str, nn.Module], exclude: set[str],
           skip_coupled: bool, strict: bool) -> tuple[UnitTable, dict[str, str], dict[str, list[str]]]:
    """Every class holding BN channels, in order of first appearance (BNs in graph order, then
    channels): a unit if it is prunable, else why not. Returns (the units' UnitTable,
    {bn: why its channels stay}, {op it cannot slice: the BNs whose channels reach it}).

    root: every slot's class root (compressed). Grouped with tensors (a DenseNet-121 has ~40k
    units); only the classes that are not
    plainly prunable (excluded, pinned, fed from outside BN, coupled with skip_coupled) go
    through the per-class checks in Python."""
    sizes = [mods[n].num_features for n in an.bn_order]
    bn_offset = torch.tensor([0, *sizes], dtype=torch.long).cumsum(0)
    bns = [k for k, n in enumerate(an.bn_order) if an.uses.get(n) is not None and an.uses[n].kind == "bn"]
    slots = long_tensor(chain.from_iterable(an.uses[an.bn_order[k]].out_slots for k in bns))
    counts = torch.tensor([sizes[k] for k in bns], dtype=torch.long)
    member_bn = torch.repeat_interleave(torch.tensor(bns, dtype=torch.long), counts)
    member_flat = bn_offset[member_bn] + torch.arange(len(slots)) - \
        torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    # group the members by class root: classes in order of first appearance, members in order
    class_root, member_class = _first_appearance(root[slots], len(root))
    order = torch.argsort(member_class, stable=True)
    member_class, member_bn, member_flat = member_class[order], member_bn[order], member_flat[order]
    n_classes = len(class_root)
    class_size = torch.bincount(member_class, minlength=n_classes)
    # per class: members of more than one BN (coupled), of an excluded BN, pinned, fed from outside BN
    new_bn = torch.ones(len(member_bn), dtype=torch.bool)
    new_bn[1:] = (member_bn[1:] != member_bn[:-1]) | (member_class[1:] != member_class[:-1])
    class_bns = torch.zeros(n_classes, dtype=torch.long).index_add_(0, member_class, new_bn.long())
    excluded = torch.tensor([n in exclude for n in an.bn_order] or [False], dtype=torch.bool)[member_bn]
    plain = torch.zeros(n_classes, dtype=torch.long).index_add_(0, member_class, excluded.long()) == 0
    pinned = torch.zeros(len(root), dtype=torch.bool)  # per slot: a pinned class's root (torch.isin sorts: 10x slower)
    pinned[[r for r, p in cs.pins.items() if p]] = True
    plain &= ~pinned[class_root]
    root_list = class_root.tolist()
    plain &= long_tensor(map(cs.free.__getitem__, root_list)) == 0
    if skip_coupled:
        plain &= class_bns == 1

    class_layer, layer_bns = _class_layers(member_bn[new_bn], member_class[new_bn], class_bns)
    layers = [tuple(map(an.bn_order.__getitem__, bns)) for bns in layer_bns]
    class_layer_list = class_layer.tolist()

    unprunable: dict[str, str] = {}
    blocked: dict[str, list[str]] = {}
    for k in torch.nonzero(~plain).flatten().tolist():
        root, layer = root_list[k], layers[class_layer_list[k]]
        why = None
        fatal = [r for f, r in cs.pins.get(root, []) if f]
        soft = [r for f, r in cs.pins.get(root, []) if not f]
        if any(n in exclude for n in layer):
            why = "excluded"
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
        for n in layer:
            unprunable.setdefault(n, why)
    in_unit = plain[member_class]
    unit_layers, unit_layer = _first_appearance(class_layer[plain], len(layers))  # the units' layers, renumbered
    table = UnitTable.grouped(bn_offset, member_flat[in_unit], class_size[plain], class_root[plain], unit_layer,
                              list(map(layers.__getitem__, unit_layers.tolist())))
    return table, unprunable, blocked


def _first_appearance(values: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the distinct values in order of first appearance, each value's index into them), for
    values in [0, bound): tables over the value range instead of a sort (torch.unique), ~5x
    as fast for a few tens of thousands of slots."""
    position = torch.arange(len(values))
    first = torch.full((bound,), len(values), dtype=torch.long).scatter_reduce_(0, values, position, "amin")
    distinct = values[first[values] == position]  # each value where it first appears, in order
    rank = torch.empty(bound, dtype=torch.long)
    rank[distinct] = torch.arange(len(distinct))
    return distinct, rank[values]


def _class_layers(entry_bn: torch.Tensor, entry_class: torch.Tensor, class_bns: torch.Tensor
                  ) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """Each class's layer (the BNs it has members in) as an index into the distinct layers,
    and those layers as BN indices. entry_bn / entry_class: each class's BNs in order, class
    after class (class_bns of them per class).

    A residual stream's channels are consecutive classes with the same BNs, and a plain
    BN's channels are too: a class whose BNs are those of the class before it takes its
    layer, so only the first class of each run makes a tuple in Python (a few dozen runs
    for MobileNetV2's 9k classes, all but 1.6k of them coupled)."""
    n_classes = len(class_bns)
    entry = torch.arange(len(entry_bn))
    prev_bns = torch.zeros_like(class_bns)  # the class before's (the first has none: 0)
    prev_bns[1:] = class_bns[:-1]
    # an entry matches when its class lists as many BNs as the class before and this one is
    # the same as the class before's at the same place (class_bns entries back)
    matches = (prev_bns == class_bns)[entry_class]
    matches &= entry_bn == entry_bn[(entry - class_bns[entry_class]).clamp(min=0)]
    new_run = torch.zeros(n_classes, dtype=torch.long).index_add_(0, entry_class, (~matches).long()) > 0
    starts = torch.nonzero(new_run).flatten()
    ends = class_bns.cumsum(0)[starts].tolist()
    bns = entry_bn.tolist()
    layer_id: dict[tuple[int, ...], int] = {}
    run_layer = long_tensor(layer_id.setdefault(tuple(bns[b - c:b]), len(layer_id))
                            for b, c in zip(ends, class_bns[starts].tolist()))
    return run_layer[new_run.long().cumsum(0) - 1], list(layer_id)


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
