"""The analysis' data: slots, the channel layout of a tensor, and how modules use slots.

A *slot* stands for one channel of one tensor; union-find ties slots that must be kept or
removed together (their *class*).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch


def find_root(parent: list[int], s: int) -> int:
    """Union-find root of slot `s`, halving the path on the way."""
    while parent[s] != s:
        parent[s] = parent[parent[s]]
        s = parent[s]
    return s


def long_tensor(ints: Iterable[int]) -> torch.Tensor:
    """A 1-D int64 tensor of `ints` (a list or any iterable). Through NumPy: torch.tensor on
    a Python list of a hundred thousand slots takes ~3x as long."""
    return torch.from_numpy(np.fromiter(ints, dtype=np.int64))


def compress(parent: list[int]) -> torch.Tensor:
    """Point every slot straight at its root, so each find after it takes one step. Pointer
    jumping on a tensor (a few vectorised steps) instead of a find per slot in Python;
    the roots, and so every class and its representative, stay the same. Returns the roots
    as a tensor (`parent` as it is now)."""
    p = long_tensor(parent)
    q = p[p]
    if torch.equal(q, p):
        return p  # already compressed: nothing to write back
    while not torch.equal(q, p):
        p, q = q, q[q]
    parent[:] = p.tolist()
    return p


class SlotArrays:
    """The analysis's lists of slots (and of positions) as NumPy index arrays, each list
    converted once: the steps after the analysis index per-slot tables with the same lists
    again and again (the slicer, compensation, counts), and a list of a few thousand Python
    ints takes ~70 us to convert (ResNet-50: ~430 conversions of 270 lists, 0.03 s a prune call).

    Valid because the analysis is read-only once made: its lists are never changed after.
    Each array is read-only, so no caller can change what the next one reads."""

    def __init__(self) -> None:
        self._arrays: dict[int, tuple[list[int], np.ndarray]] = {}

    def __call__(self, slots: list[int]) -> np.ndarray:
        hit = self._arrays.get(id(slots))
        if hit is not None and hit[0] is slots:
            return hit[1]
        array = np.fromiter(slots, np.intp, len(slots))  # ~1.5x as fast as np.asarray on a list
        array.flags.writeable = False
        self._arrays[id(slots)] = (slots, array)  # holding the list keeps its id from being reused
        return array


@dataclass
class ChannelInfo:
    """Slots of a tensor's channel dim; `block` consecutive features per slot after flatten."""
    slots: list[int]
    block: int = 1


@dataclass
class Grid:
    """The channels of x.view(N, g, C // g, ...) as a g x (C // g) grid of slots (dims 1, 2);
    a channel shuffle transposes it and flattens it back (torchvision's ShuffleNet)."""
    rows: list[list[int]]

    def slots(self) -> list[int]:
        return [s for row in self.rows for s in row]

    def transposed(self) -> "Grid":
        return Grid([list(col) for col in zip(*self.rows)])


@dataclass
class Origins:
    """Where the values of some slots come from, recorded once per op (not per slot):
    entry k of `slots` is channel `channel` of op `name` (channel k when `channel` is None).
    kind: "bn" (a BN's scaling factors), "free" (anything else: a conv's outputs, the model
    input...), or "derived" (a sigmoid-like function of other channels, see slots.nonzero)."""
    kind: str
    name: str
    slots: list[int]
    channel: int | None = None


@dataclass
class ModuleUse:
    """How one parametrised module touches slots; what the surgery needs to slice it."""
    name: str
    kind: str                      # one of USE_KINDS: how slim.py slices it
    in_slots: list[int] = field(default_factory=list)
    out_slots: list[int] = field(default_factory=list)
    in_block: int = 1
    bn_mode: str = ""              # owned | tied | gather (BN only)
    gather_index: list[int] | None = None   # BN: input position read by channel j
    input_slots: list[int] = field(default_factory=list)  # BN: slots of its whole input tensor
    params: tuple[str, ...] = ()   # channelwise: per-channel parameters / buffers to slice
    param_dim: int = 0             # channelwise: their dimension that holds the channels


# How a module with weights touches channels; slim.SLICERS has one slicer per kind.
USE_KINDS = ("conv", "gconv", "dwconv", "linear", "bn", "bn_passive", "channelwise")


@dataclass
class AttrUse:
    """A per-channel tensor attribute (layer scale...) multiplied into a channel path."""
    target: str                    # its path on the model, e.g. "blocks.0.gamma"
    dim: int                       # the tensor's dimension that holds the channels
    slots: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class AttrRef:
    """A get_attr value (or a view of it) that is a vector in disguise: one dim of size > 1."""
    target: str
    dim: int
