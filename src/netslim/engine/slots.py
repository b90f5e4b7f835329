"""Step 2: the slot walk. Every tensor's channel dimension (dim 1) gets one *slot* per
channel, and each op of the traced graph says how slots relate (the tables in rules.py):

- channel-preserving ops (ReLU, pooling, dropout, depthwise conv, ...) pass slots through;
- `+`, `*`, `cat` on other dims tie the slots of their operands (union-find);
- `cat` on dim 1 concatenates slot lists, `flatten` turns C slots into C blocks of H*W
  features for the Linear behind it;
- `split` / `chunk` on dim 1 cut the slot list into equal parts and tie position j of
  every part, so each part keeps the same number of channels and the model's own
  `x.chunk(n, 1)` (or a split size computed from `x.size(1)`) cuts the slim tensor at
  the right places; parts of unequal or hard-coded size keep their width;
- conv / linear read slots (their input channels) and create fresh ones (their outputs);
- a BatchNorm reads slots and creates fresh ones (its scaling factors, the candidates).

An op the walk does not know pins the slots it touches, with the reason (fatal on a BN's
channel path: analysis.py turns it into an error naming the op and the way out).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..layers import is_indexed_bn
from .rules import (_ADD_METHODS, _ADD_OPS, _CAT_OPS, _CHANNEL_MIXING_FUNCTIONS, _CHANNEL_MIXING_NORMS,
                    _DIV_METHODS, _DIV_OPS, _MUL_METHODS, _MUL_OPS, _NONZERO_FUNCTIONS, _NONZERO_METHODS,
                    _NONZERO_MODULES, _PASS_FUNCTIONS, _PASS_METHODS, _PASS_MODULES, _REDUCE_FUNCTIONS,
                    _REDUCE_METHODS, _RESHAPE_METHODS, _SPLIT_FUNCTIONS, _SPLIT_METHODS)
from .trace import node_shape as _shape


def find_root(parent: list[int], s: int) -> int:
    """Union-find root of slot `s`, halving the path on the way."""
    while parent[s] != s:
        parent[s] = parent[parent[s]]
        s = parent[s]
    return s


@dataclass
class ChannelInfo:
    """Slots of a tensor's channel dim; `block` consecutive features per slot after flatten."""
    slots: list[int]
    block: int = 1


@dataclass
class _Grid:
    """The channels of x.view(N, g, C // g, ...) as a g x (C // g) grid of slots (dims 1, 2);
    a channel shuffle transposes it and flattens it back (torchvision's ShuffleNet)."""
    rows: list[list[int]]

    def slots(self) -> list[int]:
        return [s for row in self.rows for s in row]

    def transposed(self) -> "_Grid":
        return _Grid([list(col) for col in zip(*self.rows)])


@dataclass
class ModuleUse:
    """How one parametrised module touches slots; what the surgery needs to slice it."""
    name: str
    kind: str                      # conv | gconv (grouped) | dwconv | linear | bn | bn_passive
    in_slots: list[int] = field(default_factory=list)
    out_slots: list[int] = field(default_factory=list)
    in_block: int = 1
    bn_mode: str = ""              # owned | tied | gather (BN only)
    gather_index: list[int] | None = None   # BN: input position read by channel j
    input_slots: list[int] = field(default_factory=list)  # BN: slots of its whole input tensor


@dataclass
class AttrUse:
    """A per-channel tensor attribute (layer scale...) multiplied into a channel path."""
    target: str                    # its path on the model, e.g. "blocks.0.gamma"
    dim: int                       # the tensor's dimension that holds the channels
    slots: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _AttrRef:
    """A get_attr value (or a view of it) that is a vector in disguise: one dim of size > 1."""
    target: str
    dim: int



def _keeps_channel_dim(idx: Any, shape: tuple | None) -> bool:
    """Does tensor indexing `x[idx]` leave dim 1 whole and in place?"""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if shape is None or any(isinstance(i, fx.Node) or i is None for i in idx) \
            or sum(i is Ellipsis for i in idx) > 1:
        return False
    if any(i is Ellipsis for i in idx):
        k = next(n for n, i in enumerate(idx) if i is Ellipsis)
        idx = idx[:k] + (slice(None),) * (len(shape) - len(idx) + 1) + idx[k + 1:]
    idx = idx + (slice(None),) * (len(shape) - len(idx))
    return len(idx) >= 2 and isinstance(idx[0], slice) and idx[1] == slice(None)


def _show_index(idx: Any) -> str:
    def one(i):
        if isinstance(i, slice):
            return ":".join("" if v is None else str(v) for v in (i.start, i.stop)) + \
                (f":{i.step}" if i.step is not None else "")
        return "..." if i is Ellipsis else str(i)
    return "x[" + ", ".join(one(i) for i in (idx if isinstance(idx, tuple) else (idx,))) + "]"


_RESHAPE_ONLY = {"view", "reshape", "unsqueeze", "squeeze", "expand", "expand_as", "to", "float", "half",
                 "double", "contiguous", "clone", torch.reshape, torch.unsqueeze, torch.squeeze}


def _only_reshapes(node: fx.Node) -> bool:
    """Does `node` only change the shape of its first argument (a view, an index of None/:)?"""
    if node.target is operator.getitem and len(node.args) > 1:
        idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        return all(i is None or i is Ellipsis or i == slice(None) for i in idx)
    return node.op in ("call_method", "call_function") and node.target in _RESHAPE_ONLY



class SlotWalk:
    def __init__(self, model: nn.Module, gm: fx.GraphModule, exclude: set[str]):
        self.model = model
        self.gm = gm
        self.exclude = exclude
        # modules traced as one opaque call: {name: why}; their channels keep their width
        self.opaque = {n: f"excluded module {n}" for n in exclude}
        self.opaque.update({n: f"module {n}, which torch.fx cannot trace ({why})"
                            for n, why in getattr(gm, "netslim_untraceable", {}).items()})
        self.blockers: dict[str, fx.Node] = {}  # fatal pin reason -> the node that raised it
        self.mods = dict(model.named_modules())
        self.parent: list[int] = []
        self.origin: dict[int, list[tuple]] = {}   # slot -> [(kind, name, j)], kind: bn | free
        self.readers: dict[int, list[tuple]] = {}  # slot -> [(kind, name, j)]
        self.pins: dict[int, list[tuple[bool, str]]] = {}  # slot -> [(fatal, reason)]
        self.chans: dict[fx.Node, Any] = {}
        self.uses: dict[str, ModuleUse] = {}
        self.bn_order: list[str] = []
        self.calls: dict[str, int] = {}
        # x * g where only x holds BN channels: (g's slots, x's slots, node), resolved later
        self.gates: list[tuple[list[int], list[int], str]] = []
        # sigmoid-like outputs: (their slots, their input's slots, why they are not zero)
        self.derived: list[tuple[list[int], list[int], str]] = []
        self.attr_refs: dict[fx.Node, _AttrRef] = {}
        self.attr_uses: dict[str, AttrUse] = {}

    # union-find -------------------------------------------------------------------------
    def new(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, s: int) -> int:
        return find_root(self.parent, s)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def pin(self, slots: Iterable[int], reason: str, fatal: bool = False) -> None:
        for s in slots:
            self.pins.setdefault(s, []).append((fatal, reason))

    def fresh(self, node: fx.Node, reason: str | None = None, fatal: bool = False) -> Any:
        """New slots for every channel-carrying tensor `node` returns (pinned if reason)."""
        def one(shape):
            if shape is None or len(shape) < 2:
                return None
            slots = self.new(int(shape[1]))
            if reason:
                self.pin(slots, reason, fatal)
            for s in slots:  # values from outside any BatchNorm
                self.origin.setdefault(s, []).append(("free", str(node.name), 0))
            return ChannelInfo(slots)
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape"):  # several outputs
            return tuple(one(tuple(m.shape)) if hasattr(m, "shape") else None for m in meta)
        return one(_shape(node))

    # ------------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.chans[node] = self.visit(node)
            self.track_attr(node)

    def track_attr(self, node: fx.Node) -> None:
        """Follow a tensor attribute with one non-trivial dim through views of it."""
        if node.op == "get_attr":
            # A parameter or buffer of the model. fx also stores tensors the code creates as
            # plain attributes (_tensor_constant0): the slim model would create them unchanged.
            owner_name, _, attr = str(node.target).rpartition(".")
            owner = self.mods.get(owner_name)
            t = None
            if owner is not None and (attr in owner._parameters or attr in owner._buffers):
                t = getattr(owner, attr)
            if torch.is_tensor(t):
                big = [d for d, n in enumerate(t.shape) if n > 1]
                if len(big) == 1:
                    self.attr_refs[node] = _AttrRef(str(node.target), big[0])
        elif node.args and node.args[0] in self.attr_refs and _only_reshapes(node):
            self.attr_refs[node] = self.attr_refs[node.args[0]]

    def info(self, arg) -> ChannelInfo | None:
        if isinstance(arg, fx.Node):
            c = self.chans.get(arg)
            return c if isinstance(c, ChannelInfo) else None
        return None

    def tensor_inputs(self, node: fx.Node) -> list[ChannelInfo]:
        out = []
        for a in node.all_input_nodes:
            c = self.chans.get(a)
            if isinstance(c, ChannelInfo):
                out.append(c)
            elif isinstance(c, tuple):
                out.extend(x for x in c if isinstance(x, ChannelInfo))
            elif isinstance(c, _Grid):
                out.append(ChannelInfo(c.slots()))
        return out

    def unknown(self, node: fx.Node, what: str, fatal: bool = True) -> Any:
        """An op whose channel semantics we do not know: its inputs and outputs keep their width."""
        reason = f"{what} (node {node.name})"
        if fatal:
            self.blockers[reason] = node
        for c in self.tensor_inputs(node):
            self.pin(c.slots, reason, fatal)
        return self.fresh(node, reason, fatal)

    def visit(self, node: fx.Node) -> Any:
        op = node.op
        if op == "placeholder":
            return self.fresh(node, "model input")
        if op == "get_attr":
            return self.fresh(node, f"tensor attribute {node.target}")
        if op == "output":
            for c in self.tensor_inputs(node):
                self.pin(c.slots, "model output")
            return None
        if op == "call_module":
            return self.visit_module(node, self.mods[node.target])
        if op in ("call_function", "call_method") and node.args and \
                isinstance(self.chans.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None, _Grid):
            return self.grid_op(node, self.chans[node.args[0]])
        if op == "call_function":
            return self.visit_function(node)
        if op == "call_method":
            return self.visit_method(node)
        return self.unknown(node, f"op {op}")

    # modules ----------------------------------------------------------------------------
    def visit_module(self, node: fx.Node, m: nn.Module) -> Any:
        name = node.target
        x = self.info(node.args[0]) if node.args else None
        if name in self.opaque and not isinstance(m, _BatchNorm):
            return self.unknown(node, self.opaque[name], fatal=False)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, _BatchNorm, _InstanceNorm)):
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.calls[name] > 1 or name in self.uses:
                # A weight-shared module called twice: its two call sites would have to agree.
                use = self.uses.pop(name, None)
                if use:
                    self.pin(use.in_slots + use.out_slots, f"module {name} is called more than once")
                return self.unknown(node, f"module {name} is called more than once", fatal=False)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return self.conv(node, name, m, x)
        if isinstance(m, nn.Linear):
            return self.linear(node, name, m, x)
        if isinstance(m, _BatchNorm):
            return self.batchnorm(node, name, m, x)
        if isinstance(m, _InstanceNorm):
            return self.instancenorm(node, name, m, x)
        if isinstance(m, _CHANNEL_MIXING_NORMS):
            return self.unknown(node, f"{type(m).__name__} {name} normalises across channels", fatal=False)
        if isinstance(m, nn.LayerNorm):
            return self.layernorm(node, name, m, x)
        if isinstance(m, nn.Flatten):
            return self.flatten(node, x, m.start_dim, m.end_dim)
        if isinstance(m, _PASS_MODULES):
            return self.passthrough(node, x)
        if isinstance(m, _NONZERO_MODULES):
            return self.nonzero(node, x, f"{type(m).__name__} {name} maps 0 to a non-zero value")
        return self.unknown(node, f"module {name} ({type(m).__name__})")

    def passthrough(self, node: fx.Node, x: ChannelInfo | None) -> Any:
        """An op that keeps every channel where it is (activation, pooling, dropout...)."""
        if x is None:
            return self.fresh(node)
        shape = _shape(node)
        if shape is not None and len(shape) >= 2:
            if x.block == 1 and shape[1] == len(x.slots):
                return x
            if x.block > 1 and len(shape) == 2 and shape[1] == len(x.slots) * x.block:
                return x  # e.g. dropout between flatten and the classifier
        return self.unknown(node, f"op {node.target} changes the channel layout")

    def conv(self, node, name, m, x: ChannelInfo | None):
        if x is None or x.block != 1 or len(x.slots) != m.in_channels:
            return self.unknown(node, f"conv {name} input")
        if m.groups == 1:
            out = self.new(m.out_channels)
            for j, s in enumerate(x.slots):
                self.readers.setdefault(s, []).append(("conv", name, j))
            for j, s in enumerate(out):
                self.origin.setdefault(s, []).append(("free", name, j))
            self.uses[name] = ModuleUse(name, "conv", list(x.slots), out)
            return ChannelInfo(out)
        if m.groups == m.in_channels == m.out_channels:
            # Depthwise: output channel j is input channel j scaled; they live and die together.
            if m.bias is not None:
                for j, s in enumerate(x.slots):  # a bias makes a zeroed input channel non-zero
                    self.origin.setdefault(s, []).append(("free", name, j))
            self.uses[name] = ModuleUse(name, "dwconv", list(x.slots), list(x.slots))
            return ChannelInfo(list(x.slots))
        # Grouped: every group must keep as many input (and output) channels as the others,
        # so the conv stays a valid grouped conv with the same `groups`. Position j of every
        # group is tied into one slot class: they are kept or removed together.
        g = m.groups
        out = self.new(m.out_channels)
        for slots in (x.slots, out):
            per = len(slots) // g
            for i in range(1, g):
                for j in range(per):
                    self.union(slots[j], slots[i * per + j])
        for j, s in enumerate(x.slots):
            self.readers.setdefault(s, []).append(("conv", name, j))
        for j, s in enumerate(out):
            self.origin.setdefault(s, []).append(("free", name, j))
        self.uses[name] = ModuleUse(name, "gconv", list(x.slots), out)
        return ChannelInfo(out)

    def linear(self, node, name, m, x: ChannelInfo | None):
        in_shape = _shape(node.args[0])
        if x is None or in_shape is None or len(in_shape) != 2 or len(x.slots) * x.block != m.in_features:
            if x is not None:
                self.pin(x.slots, f"linear {name} reads a tensor whose features are not its channels")
            return self.fresh(node, f"linear {name} output on a non-channel layout")
        out = self.new(m.out_features)
        for j, s in enumerate(x.slots):
            self.readers.setdefault(s, []).append(("linear", name, j))
        for j, s in enumerate(out):
            self.origin.setdefault(s, []).append(("free", name, j))
        self.uses[name] = ModuleUse(name, "linear", list(x.slots), out, in_block=x.block)
        return ChannelInfo(out)

    def batchnorm(self, node, name, m, x: ChannelInfo | None):
        if x is None or x.block != 1:
            return self.unknown(node, f"batchnorm {name} input")
        if m.weight is None:
            # Non-affine BN: no scaling factor to judge by; it only follows its input. In eval
            # it maps a zeroed channel to -running_mean / sqrt(running_var + eps), not to 0.
            if m.running_mean is not None:
                self.pin(x.slots, f"non-affine BatchNorm {name} maps 0 to -running_mean/sqrt(running_var+eps), "
                                  "not to 0")
            return self.passive_norm(name, x)
        index = m.keep_index.tolist() if is_indexed_bn(m) else list(range(len(x.slots)))
        if len(index) != m.num_features or (not is_indexed_bn(m) and len(x.slots) != m.num_features):
            return self.unknown(node, f"batchnorm {name} input")
        out = self.new(m.num_features)
        for j, s in enumerate(out):
            self.origin.setdefault(s, []).append(("bn", name, j))
        for j, i in enumerate(index):
            self.readers.setdefault(x.slots[i], []).append(("bn", name, j))
        self.uses[name] = ModuleUse(name, "bn", [x.slots[i] for i in index], out,
                                    bn_mode="gather" if is_indexed_bn(m) else "", gather_index=index,
                                    input_slots=list(x.slots))
        self.bn_order.append(name)
        return ChannelInfo(out)

    def passive_norm(self, name: str, x: ChannelInfo) -> ChannelInfo:
        """A per-channel norm without scaling factors: follows its input, sliced with it."""
        self.uses[name] = ModuleUse(name, "bn_passive", list(x.slots), list(x.slots))
        return ChannelInfo(list(x.slots))

    def instancenorm(self, node, name, m, x: ChannelInfo | None):
        """Per-sample, per-channel statistics: a zero channel stays 0 unless an affine shift
        or running statistics (used in eval) move it."""
        if x is None or x.block != 1 or len(x.slots) != m.num_features:
            return self.unknown(node, f"{type(m).__name__} {name} input")
        if m.affine or m.track_running_stats:
            self.pin(x.slots, f"{type(m).__name__} {name} maps 0 to a non-zero value "
                              "(affine shift or running statistics)")
        return self.passive_norm(name, x)

    def layernorm(self, node, name, m, x: ChannelInfo | None):
        shape = _shape(node.args[0]) if node.args else None
        if x is None:
            return self.fresh(node)
        if shape is None or len(shape) - len(m.normalized_shape) <= 1:
            return self.unknown(node, f"LayerNorm {name} normalises across channels", fatal=False)
        if m.bias is not None:  # normalises within a channel, then shifts: 0 -> bias
            self.pin(x.slots, f"LayerNorm {name} adds a bias: it maps 0 to a non-zero value")
        return self.passthrough(node, x)

    def flatten(self, node, x: ChannelInfo | None, start: int, end: int):
        shape_in = _shape(node.args[0] if node.args else None)
        if x is None:
            return self.fresh(node)
        if shape_in is None or x.block != 1:
            return self.unknown(node, "flatten")
        nd = len(shape_in)
        start = start % nd
        end = end % nd
        if start >= 2:
            return self.passthrough(node, x)
        if start == 1 and end == nd - 1:
            block = 1
            for d in shape_in[2:]:
                block *= int(d)
            return ChannelInfo(x.slots, block)
        return self.unknown(node, f"flatten({start}, {end}) mixes the channel dimension")

    # functions / methods ----------------------------------------------------------------
    def visit_function(self, node: fx.Node) -> Any:
        t = node.target
        args = node.args
        if t in _PASS_FUNCTIONS:
            return self.passthrough(node, self.info(args[0]))
        if t in _NONZERO_FUNCTIONS:
            return self.nonzero(node, self.info(args[0]), f"{getattr(t, '__name__', t)} maps 0 to a non-zero value")
        if t in _CHANNEL_MIXING_FUNCTIONS:  # functional norms: weights come as tensors we do not slice
            return self.unknown(node, f"{t.__name__} normalises with tensors netslim does not slice", fatal=False)
        if t in _ADD_OPS:
            return self.binary(node, args[:2], additive=True)
        if t in _MUL_OPS:
            return self.product(node, args[:2])
        if t in _DIV_OPS:
            if not isinstance(args[1], fx.Node):
                return self.passthrough(node, self.info(args[0]))
            return self.unknown(node, "division by a tensor")
        if t in _CAT_OPS:
            tensors = args[0] if args else node.kwargs.get("tensors")
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
            return self.cat(node, tensors, dim)
        if t is torch.flatten:
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, self.info(args[0]), start, end)
        if t in _REDUCE_FUNCTIONS:
            return self.reduce(node)
        if t is operator.getitem:
            return self.getitem(node)
        if t in _SPLIT_FUNCTIONS:
            return self.split(node)
        if t is getattr or _shape(node) is None and not self.tensor_inputs(node):
            return self.fresh(node)
        if _shape(node) is None and node.meta.get("tensor_meta") is None:
            return None  # a size, a shape, a python value
        return self.unknown(node, f"function {getattr(t, '__name__', t)}")

    def visit_method(self, node: fx.Node) -> Any:
        t = node.target
        x = self.info(node.args[0]) if node.args else None
        if t in ("size", "dim", "numel") or (node.meta.get("tensor_meta") is None and x is None):
            return None
        if t in _PASS_METHODS:
            return self.passthrough(node, x)
        if t in _NONZERO_METHODS:
            return self.nonzero(node, x, f"{t} maps 0 to a non-zero value")
        if t in _ADD_METHODS:
            return self.binary(node, node.args[:2], additive=True)
        if t in _MUL_METHODS:
            return self.product(node, node.args[:2])
        if t in _DIV_METHODS and len(node.args) > 1 and not isinstance(node.args[1], fx.Node):
            return self.passthrough(node, x)
        if t in _REDUCE_METHODS:
            return self.reduce(node)
        if t in _RESHAPE_METHODS:
            return self.reshape(node, x)
        if t in _SPLIT_METHODS:
            return self.split(node)
        return self.unknown(node, f"method .{t}()")

    def binary(self, node, operands, additive: bool):
        out_shape = _shape(node)
        if out_shape is None:
            return None
        infos = []
        for a in operands:
            if isinstance(a, fx.Node):
                c = self.info(a)
                s = _shape(a)
                if c is not None and s is not None and len(s) == len(out_shape) and len(s) >= 2 \
                        and s[1] == out_shape[1]:
                    infos.append(c)
                elif additive and s is not None and len(s) > 0:
                    # adding a tensor broadcast over channels: zero channels become non-zero
                    infos.append(None)
                    for c2 in self.tensor_inputs(node):
                        self.pin(c2.slots, f"{node.name} adds a tensor broadcast over channels")
            elif additive and a not in (0, 0.0):
                for c2 in self.tensor_inputs(node):
                    self.pin(c2.slots, f"{node.name} adds the constant {a}")
        infos = [c for c in infos if c is not None]
        if not infos:
            return self.fresh(node)
        first = infos[0]
        for c in infos[1:]:
            if len(c.slots) != len(first.slots) or c.block != first.block:
                return self.unknown(node, f"{node.name} combines tensors of different channel layouts")
            for a, b in zip(first.slots, c.slots):
                self.union(a, b)
        return first

    def nonzero(self, node: fx.Node, x: ChannelInfo | None, reason: str) -> Any:
        """A channel-wise op with f(0) != 0 (sigmoid...). Its output gets slots of its own: if
        it only ever gates a product with BN channels, those channels stay prunable; if anything
        else reads it, resolve_gates ties it back to its input, which then keeps its channels."""
        out = self.passthrough(node, x)
        if x is None or out is not x:
            return out
        slots = self.new(len(x.slots))
        for j, s in enumerate(slots):
            self.origin[s] = [("derived", str(node.name), j)]
        self.derived.append((slots, list(x.slots), f"{reason} ({node.name})"))
        return ChannelInfo(slots, x.block)

    def product(self, node: fx.Node, operands) -> Any:
        """x * y honouring broadcasting. A product is zero wherever one factor is: when exactly
        one operand holds BN channels, the other is a gate that follows those channels (its
        producer is sliced with them), and a per-channel tensor attribute (layer scale) is
        sliced with them too."""
        out_shape = _shape(node)
        if out_shape is None or len(out_shape) < 2:
            return self.binary(node, operands, additive=False)
        width = int(out_shape[1])
        infos: list[ChannelInfo] = []
        attrs: list[_AttrRef] = []
        for a in operands:
            shape = _shape(a) if isinstance(a, fx.Node) else None
            if shape is None:
                continue  # a Python number or a non-tensor: scales every channel alike
            d = len(shape) - len(out_shape) + 1  # the operand's dim broadcast onto the channels
            per_channel = width > 1 and 0 <= d < len(shape) and int(shape[d]) == width
            c = self.info(a)
            if per_channel and a in self.attr_refs:
                attrs.append(self.attr_refs[a])
            elif per_channel and c is not None and len(shape) == len(out_shape):
                infos.append(c)
            elif per_channel:
                return self.unknown(node, f"{node.name} multiplies by a per-channel tensor netslim cannot slice")
            # else: broadcast over the channels; a zero channel stays zero
        if not infos:
            return self.fresh(node, f"{node.name}: a product of per-channel tensors netslim does not follow"
                              if attrs else None)
        first = infos[0]
        if any(c.block != first.block or len(c.slots) != len(first.slots) for c in infos):
            return self.unknown(node, f"{node.name} combines tensors of different channel layouts")
        carriers = [c for c in infos if self.from_bn(c)]
        if len(carriers) == 1 and len(infos) > 1:
            out = carriers[0]
            for c in infos:
                if c is not out:
                    self.gates.append((list(c.slots), list(out.slots), str(node.name)))
        else:
            out = first
            for c in infos[1:]:
                for a, b in zip(first.slots, c.slots):
                    self.union(a, b)
        for ref in attrs:
            self.attr_use(ref, out.slots)
        return out

    def from_bn(self, c: ChannelInfo) -> bool:
        return any(o[0] == "bn" for s in c.slots for o in self.origin.get(s, ()))

    def attr_use(self, ref: _AttrRef, slots: list[int]) -> None:
        prev = self.attr_uses.get(ref.target)
        if prev is None:
            self.attr_uses[ref.target] = AttrUse(ref.target, ref.dim, list(slots))
        else:  # one tensor scaling two paths: their channels go together
            for a, b in zip(prev.slots, slots):
                self.union(a, b)

    def cat(self, node, tensors, dim):
        infos = [self.info(t) for t in tensors]
        out_shape = _shape(node)
        if out_shape is None or any(c is None for c in infos):
            return self.unknown(node, "torch.cat of non-tensors")
        dim = dim % len(out_shape)
        if dim == 1:
            if any(c.block != 1 for c in infos):
                return self.unknown(node, "torch.cat of flattened features")
            return ChannelInfo([s for c in infos for s in c.slots])
        first = infos[0]
        for c in infos[1:]:
            for a, b in zip(first.slots, c.slots):
                self.union(a, b)
        return first

    def split(self, node):
        """torch.split / torch.chunk / x.split / x.chunk: a tuple of parts of the input's slots."""
        x = self.info(node.args[0]) if node.args else None
        shape_in = _shape(node.args[0]) if node.args else None
        meta = node.meta.get("tensor_meta")
        if x is None or shape_in is None or not isinstance(meta, (tuple, list)) or hasattr(meta, "shape"):
            return self.unknown(node, f"{node.name}: a split netslim cannot follow")
        shapes = [tuple(m.shape) for m in meta]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if not isinstance(dim, int):
            return self.unknown(node, f"{node.name}: split along a computed dimension")
        dim %= len(shape_in)
        if dim != 1:  # along batch or space: every part has all the channels
            return tuple(x for _ in shapes)
        if x.block != 1:
            return self.unknown(node, f"{node.name}: split of flattened features")
        sizes = [int(sh[1]) for sh in shapes]
        parts, start = [], 0
        for n in sizes:
            parts.append(x.slots[start:start + n])
            start += n
        how = node.args[1] if len(node.args) > 1 else (node.kwargs.get("chunks") or
                                                        node.kwargs.get("split_size_or_sections") or
                                                        node.kwargs.get("split_size"))
        is_chunk = node.target in (torch.chunk, "chunk")
        # The slim model runs the same forward code on a narrower tensor. chunk(n) cuts it into
        # equal parts, and so does a split size computed from the tensor (an fx node); a size
        # written in the code (an int or a list) would cut the slim tensor in the wrong places.
        follows_width = is_chunk or isinstance(how, fx.Node)
        if follows_width and len(set(sizes)) == 1:
            for part in parts[1:]:
                for a, b in zip(parts[0], part):
                    self.union(a, b)
        else:
            why = "unequal parts" if len(set(sizes)) > 1 else "a size written in the code"
            self.pin(x.slots, f"{node.name} splits the channels into {why} {sizes}; they keep their width")
        return tuple(ChannelInfo(part) for part in parts)

    def reduce(self, node):
        x = self.info(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        shape_in = _shape(node.args[0])
        if x is None:
            return self.fresh(node)
        if dims is None or shape_in is None:
            return self.unknown(node, f"{node.name} reduces over the channel dimension")
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [d % len(shape_in) for d in dims]
        if 1 in dims or 0 in dims:
            return self.unknown(node, f"{node.name} reduces over the channel dimension")
        return self.passthrough(node, x)

    def getitem(self, node):
        src = self.chans.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        idx = node.args[1]
        if isinstance(src, tuple) and isinstance(idx, int):
            return src[idx]
        if isinstance(src, ChannelInfo):
            if _keeps_channel_dim(idx, _shape(node.args[0])):  # batch / spatial indexing only
                return self.passthrough(node, src)
            # x[:, :d] (DPN) cuts at a position the slim model would not move: like a split
            # with written sizes, those channels keep their width; the rest is still pruned.
            return self.unknown(node, f"{node.name} indexes the channels ({_show_index(idx)}); "
                                      "they keep their width", fatal=False)
        return self.fresh(node) if node.meta.get("tensor_meta") is not None else None

    def grid_op(self, node: fx.Node, grid: _Grid) -> Any:
        """transpose(1, 2) / permute(0, 2, 1, ...) / contiguous / flatten back of a channel grid."""
        t, nd = node.target, len(_shape(node.args[0]) or ())
        rest = list(node.args[1:])
        if t in ("contiguous", "clone", torch.clone):
            return grid
        if t in ("transpose", torch.transpose) and len(rest) == 2 and sorted(d % nd for d in rest) == [1, 2]:
            return grid.transposed()
        if t in ("permute", torch.permute):
            dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            if [d % nd for d in dims] == [0, 2, 1, *range(3, nd)]:
                return grid.transposed()
        if t in ("view", "reshape", torch.reshape, "flatten", torch.flatten):
            shape_in, shape_out = _shape(node.args[0]), _shape(node)
            if t in ("flatten", torch.flatten):
                merges = rest[:2] == [1, 2]
            else:
                sizes = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
                merges = len(sizes) >= 2 and not (isinstance(sizes[1], int) and sizes[1] != -1)
            if merges and shape_in and shape_out and len(shape_out) == len(shape_in) - 1 \
                    and shape_out[1] == shape_in[1] * shape_in[2] and shape_out[2:] == shape_in[3:]:
                return ChannelInfo(grid.slots())
        return self.unknown(node, f"{node.name} uses the channel grid of a shuffle in a way netslim cannot follow",
                            fatal=False)

    def grid(self, node: fx.Node, x: ChannelInfo, sizes: list) -> Any:
        """x.view(N, g, C // g, ...) with g written in the code: every group keeps the same
        positions (tied, like a grouped conv), so the slim model's own view still cuts right."""
        shape_out = _shape(node)
        g, m = int(shape_out[1]), int(shape_out[2])
        if not isinstance(sizes[1], int) or sizes[1] == -1 or (isinstance(sizes[2], int) and sizes[2] != -1):
            return self.unknown(node, f"{node.name} views the channels as a grid of sizes netslim cannot follow "
                                      "(write the group count, compute the rest from x.size(1)); they keep "
                                      "their width", fatal=False)
        rows = [x.slots[i * m:(i + 1) * m] for i in range(g)]
        for row in rows[1:]:
            for a, b in zip(rows[0], row):
                self.union(a, b)
        return _Grid(rows)

    def reshape(self, node, x):
        shape_in, shape_out = _shape(node.args[0]), _shape(node)
        if x is None or shape_out is None:
            return self.fresh(node)
        if node.target == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, x, start, end)
        sizes = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) \
            else list(node.args[1:])
        if (x.block == 1 and len(sizes) >= 3 and len(shape_in) >= 2 and len(shape_out) == len(shape_in) + 1
                and shape_out[0] == shape_in[0] and shape_out[1] * shape_out[2] == shape_in[1]
                and shape_out[3:] == shape_in[2:]):
            return self.grid(node, x, sizes)
        if (x.block == 1 and len(sizes) >= 2 and len(shape_in) >= 2 and len(shape_out) >= 2
                and shape_out[:2] == shape_in[:2] and not (isinstance(sizes[1], int) and sizes[1] != -1)):
            # batch and channel dims unchanged, the channel size follows the tensor: x.view(n, c, 1, 1)
            # stays right at any width (the other sizes describe one channel's elements)
            return x
        literal = [a for a in node.args[1:] if isinstance(a, int) and a != -1]
        literal += [a for a in node.args[1:] if isinstance(a, (tuple, list))
                    for a in a if isinstance(a, int) and a != -1]
        if literal:
            return self.unknown(node, f"x.{node.target}() with a hard-coded size {tuple(literal)}; "
                                      "use torch.flatten(x, 1) or sizes from x.size()")
        if x.block == 1 and len(shape_in) >= 2 and len(shape_out) == 2 and shape_out[0] == shape_in[0]:
            block = 1
            for d in shape_in[2:]:
                block *= int(d)
            return ChannelInfo(x.slots, block)
        if len(shape_out) >= 2 and shape_out[:2] == shape_in[:2]:
            return x
        return self.unknown(node, f"x.{node.target}() moves the channel dimension")
