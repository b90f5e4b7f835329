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

Ops that move channels around (cat, split, views, shuffles) are in layout.py. An op the
walk does not know pins the slots it touches, with the reason (fatal on a BN's
channel path: analysis.py turns it into an error naming the op and the way out).
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers import is_indexed_bn
from . import rules
from .channels import AttrRef, AttrUse, ChannelInfo, Grid, ModuleUse, Origins, find_root
from .layout import LayoutSteps
from .rules import Rule
from .trace import node_shape as _shape


_RESHAPE_ONLY = {"view", "reshape", "unsqueeze", "squeeze", "expand", "expand_as", "to", "float", "half",
                 "double", "contiguous", "clone", torch.reshape, torch.unsqueeze, torch.squeeze}


def _only_reshapes(node: fx.Node) -> bool:
    """Does `node` only change the shape of its first argument (a view, an index of None/:)?"""
    if node.target is operator.getitem and len(node.args) > 1:
        idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        return all(i is None or i is Ellipsis or i == slice(None) for i in idx)
    return node.op in ("call_method", "call_function") and node.target in _RESHAPE_ONLY



class SlotWalk(LayoutSteps):
    def __init__(self, model: nn.Module, gm: fx.GraphModule, exclude: set[str],
                 modules: dict[str, nn.Module] | None = None):
        """modules: dict(model.named_modules()), if the caller has it at hand."""
        self.model = model
        self.gm = gm
        self.exclude = exclude
        # modules traced as one opaque call: {name: why}; their channels keep their width
        self.opaque = {n: f"excluded module {n}" for n in exclude}
        self.opaque.update({n: f"module {n}, which torch.fx cannot trace ({why})"
                            for n, why in getattr(gm, "netslim_untraceable", {}).items()})
        self.blockers: dict[str, fx.Node] = {}  # fatal pin reason -> the node that raised it
        self.mods = modules if modules is not None else dict(model.named_modules())
        self.parent: list[int] = []
        # Per op, not per slot (a ResNet-50 has ~100k slots): where slot values come from, which
        # slots a conv / linear / BN reads (one entry per channel it reads), and per slot whether
        # it holds BN channels (for products).
        self.origins: list[Origins] = []
        self.reads: list[list[int]] = []
        self.is_bn = bytearray()
        self.pins: dict[int, list[tuple[bool, str]]] = {}  # slot -> [(fatal, reason)]
        self.chans: dict[fx.Node, Any] = {}
        self.uses: dict[str, ModuleUse] = {}
        self.bn_order: list[str] = []
        self.calls: dict[str, int] = {}
        # x * g where only x holds BN channels: (g's slots, x's slots, the product), resolved later
        self.gates: list[tuple[list[int], list[int], fx.Node]] = []
        # sigmoid-like outputs: (their slots, their input's slots, why they are not zero)
        self.derived: list[tuple[list[int], list[int], str]] = []
        # Where a removed channel may stop being a constant (classes.varying_inputs): products by
        # a gate or by a tensor broadcast over the channels that varies with the input
        # (`y * x[:, :1]`: those slots are listed), one bit each, and per node the products before it.
        self.varying: list[tuple[list[int], fx.Node]] = []
        self.product_bit: dict[fx.Node, int] = {}
        self.after_products: dict[fx.Node, int] = {}  # node -> OR of the bits of the products before it
        self.dynamic: set[fx.Node] = set()  # nodes whose value depends on the model input
        self.attr_refs: dict[fx.Node, AttrRef] = {}
        self.attr_uses: dict[str, AttrUse] = {}

    # union-find -------------------------------------------------------------------------
    def new(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.is_bn.extend(bytes(n))
        return list(range(start, start + n))

    def find(self, s: int) -> int:
        return find_root(self.parent, s)

    def roots(self, slots: list[int]) -> list[int]:
        """find() of every slot, one step of all slots at a time (a list lookup a slot and
        step, not a find call a slot). Where every slot is at most two steps from its root
        (after compress, and after the BN merges that follow it) that is all. Where it is
        further (a residual stream, whose classes each owned BN moves one step further from
        their root: ResNet-50's grow by one a block), every slot on the way is then pointed
        straight at its root, as find's path compression would (it moves no root), so the
        next walk over these classes is short again."""
        parent = self.parent
        up = [parent[s] for s in slots]
        top = [parent[r] for r in up]
        if top == up:  # every slot one step from its root
            return up
        higher = [parent[r] for r in top]
        if higher == top:  # two steps
            return top
        steps = [slots, up, top]
        while higher != steps[-1]:
            steps.append(higher)
            higher = [parent[r] for r in higher]
        root = steps[-1]
        for on_the_way in steps[:-2]:  # the last but one already points at the root
            for s, r in zip(on_the_way, root):
                parent[s] = r
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def union_pairs(self, a_slots: list[int], b_slots: list[int]) -> None:
        """union(a, b) for every pair of zip(a_slots, b_slots), in order. Where the pairs' roots
        are all distinct (two tensors whose channels are not tied yet: a residual add) no union
        sees another's effect, and each pair's second root points at its first at once."""
        ra, rb = self.roots(a_slots), self.roots(b_slots)
        if len(ra) == len(rb) and len(set(ra).union(rb)) == 2 * len(ra):
            parent = self.parent
            for r, other in zip(ra, rb):
                parent[other] = r
            return
        for a, b in zip(a_slots, b_slots):
            self.union(a, b)

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
            self.origins.append(Origins("free", str(node.name), slots, channel=0))  # from outside any BN
            return ChannelInfo(slots)
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape"):  # several outputs
            return tuple(one(tuple(m.shape)) if hasattr(m, "shape") else None for m in meta)
        return one(_shape(node))

    # ------------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" or any(a in self.dynamic for a in node.all_input_nodes):
                self.dynamic.add(node)
            self.chans[node] = self.visit(node)
            after = 0
            for a in node.all_input_nodes:
                after |= self.after_products.get(a, 0)
            if node in self.product_bit:
                after |= 1 << self.product_bit[node]
            if after:
                self.after_products[node] = after
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
                    self.attr_refs[node] = AttrRef(str(node.target), big[0])
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
            elif isinstance(c, Grid):
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
                isinstance(self.chans.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None, Grid):
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
        rule = rules.module_rule(m)
        if rule is None:
            return self.unknown(node, f"module {name} ({type(m).__name__})")
        if rule.kind in _WEIGHTED_KINDS:
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.calls[name] > 1 or name in self.uses:
                # A weight-shared module called twice: its two call sites would have to agree.
                use = self.uses.pop(name, None)
                if use:
                    self.pin(use.in_slots + use.out_slots, f"module {name} is called more than once")
                return self.unknown(node, f"module {name} is called more than once", fatal=False)
        return MODULE_STEPS[rule.kind](self, node, rule, m, name, x)

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
            return self.reads_and_creates(name, "conv", x, m.out_channels)
        if m.groups == m.in_channels == m.out_channels:
            # Depthwise: output channel j is input channel j scaled; they live and die together.
            if m.bias is not None:  # a bias makes a zeroed input channel non-zero
                self.origins.append(Origins("free", name, list(x.slots)))
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
                self.union_pairs(slots[:per], slots[i * per:(i + 1) * per])
        return self.reads_and_creates(name, "gconv", x, out)

    def linear(self, node, name, m, x: ChannelInfo | None):
        in_shape = _shape(node.args[0])
        if x is None or in_shape is None or len(in_shape) != 2 or len(x.slots) * x.block != m.in_features:
            if x is not None:
                self.pin(x.slots, f"linear {name} reads a tensor whose features are not its channels")
            return self.fresh(node, f"linear {name} output on a non-channel layout")
        return self.reads_and_creates(name, "linear", x, m.out_features)

    def reads_and_creates(self, name: str, kind: str, x: ChannelInfo, out: int | list[int]) -> ChannelInfo:
        """A conv / linear `name` reads x's slots and creates `out` fresh ones (or those slots)."""
        out = self.new(out) if isinstance(out, int) else out
        self.reads.append(list(x.slots))
        self.origins.append(Origins("free", name, out))
        self.uses[name] = ModuleUse(name, kind, list(x.slots), out, in_block=x.block)
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
        self.origins.append(Origins("bn", name, out))
        self.is_bn[len(self.is_bn) - len(out):] = b"\x01" * len(out)  # the slots new() just made
        read = [x.slots[i] for i in index] if is_indexed_bn(m) else list(x.slots)  # index: 0, 1, ... otherwise
        self.reads.append(read)
        self.uses[name] = ModuleUse(name, "bn", read, out,
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

    def channelwise(self, node: fx.Node, rule: Rule, m: nn.Module, name: str, x: ChannelInfo | None) -> Any:
        """A module whose output channel j depends on input channel j alone (a registered
        rules.channelwise): channels pass through, its per-channel tensors are sliced with them,
        and a channel it maps 0 to a non-zero value keeps its width."""
        label = f"{type(m).__name__} {name}"
        if len(node.args) != 1 or node.kwargs or x is None or x.block != 1:
            return self.unknown(node, f"{label}: a channelwise module netslim can slice takes one tensor "
                                      "with channels in dim 1")
        out = self.module_passthrough(node, rule, m, name, x)
        if out is not x:
            return out
        for p in rule.params:
            t = m._parameters.get(p, m._buffers.get(p))
            if t is None or t.dim() <= rule.dim or t.shape[rule.dim] not in (1, len(x.slots)):
                return self.unknown(node, f"{label}: {p!r} is not a parameter or buffer with "
                                          f"{len(x.slots)} (or 1) entries along dim {rule.dim}")
        for j in self.maps_zero_elsewhere(m, _shape(node.args[0])):
            self.pin([x.slots[j]], f"{label} maps 0 to a non-zero value (channel {j})")
        self.uses[name] = ModuleUse(name, "channelwise", list(x.slots), list(x.slots),
                                    params=rule.params, param_dim=rule.dim)
        return x

    def module_passthrough(self, node: fx.Node, rule: Rule, m: nn.Module, name: str, x: ChannelInfo | None) -> Any:
        """A module that keeps channels in place. Per-channel tensors its rule does not name would
        keep their size in the slim model (and break it): refused, naming them."""
        width = len(x.slots) if x is not None else 0
        unlisted = [n for n, t in (*m.named_parameters(), *m.named_buffers())
                    if width > 1 and width in t.shape and n not in rule.params]
        if unlisted:
            how = "channelwise(params=(...))" if rule.kind == "passthrough" else "channelwise(params=(...)) naming all"
            return self.unknown(node, f"{type(m).__name__} {name} holds per-channel tensors its rule does not slice "
                                      f"({', '.join(unlisted[:4])}); register it with netslim.rules.{how}, or "
                                      "keeps_channels(why)")
        return self.passthrough(node, x)

    @staticmethod
    def maps_zero_elsewhere(m: nn.Module, shape: tuple) -> list[int]:
        """Channels j where m(0)[:, j] != 0: run once on zeros, in eval mode, like the trace."""
        like = next((t for t in [*m.parameters(), *m.buffers()] if t.is_floating_point()), None)
        zeros = torch.zeros(shape, dtype=like.dtype if like is not None else None,
                            device=like.device if like is not None else None)
        was_training = m.training
        try:
            with torch.no_grad():
                y = m.eval()(zeros)
        finally:
            m.train(was_training)
        return torch.nonzero(y.transpose(0, 1).reshape(y.shape[1], -1).ne(0).any(1)).flatten().tolist()

    # functions / methods ----------------------------------------------------------------
    def visit_function(self, node: fx.Node) -> Any:
        t = node.target
        rule = rules.function_rule(t)
        if rule is not None:
            x = self.info(node.args[0]) if node.args else None
            return CALL_STEPS[rule.kind](self, node, rule, getattr(t, "__name__", str(t)), x)
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
        rule = rules.method_rule(t)
        if rule is not None:
            return CALL_STEPS[rule.kind](self, node, rule, t, x)
        return self.unknown(node, f"method .{t}()")

    def divide(self, node: fx.Node, x: ChannelInfo | None) -> Any:
        """x / 2 scales every channel alike; x / tensor is not followed."""
        if len(node.args) > 1 and not isinstance(node.args[1], fx.Node):
            return self.passthrough(node, x)
        return self.unknown(node, "division by a tensor")

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
            self.union_pairs(first.slots, c.slots)
        return first

    def nonzero(self, node: fx.Node, x: ChannelInfo | None, reason: str) -> Any:
        """A channel-wise op with f(0) != 0 (sigmoid...). Its output gets slots of its own: if
        it only ever gates a product with BN channels, those channels stay prunable; if anything
        else reads it, resolve_gates ties it back to its input, which then keeps its channels."""
        out = self.passthrough(node, x)
        if x is None or out is not x:
            return out
        slots = self.new(len(x.slots))
        self.origins.append(Origins("derived", str(node.name), slots))
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
        attrs: list[AttrRef] = []
        varies = False  # a factor broadcast over the channels depends on the input
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
            else:  # broadcast over the channels: a zero channel stays zero, a constant one may vary
                varies = varies or a in self.dynamic
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
                    self.gates.append((list(c.slots), list(out.slots), node))
            self.product_bit.setdefault(node, len(self.product_bit))
        else:
            out = first
            for c in infos[1:]:
                self.union_pairs(first.slots, c.slots)
        for ref in attrs:
            self.attr_use(ref, out.slots)
        if varies:
            self.varying.append((list(out.slots), node))
            self.product_bit.setdefault(node, len(self.product_bit))
        return out

    def from_bn(self, c: ChannelInfo) -> bool:
        return any(self.is_bn[s] for s in c.slots)

    def attr_use(self, ref: AttrRef, slots: list[int]) -> None:
        prev = self.attr_uses.get(ref.target)
        if prev is None:
            self.attr_uses[ref.target] = AttrUse(ref.target, ref.dim, list(slots))
        else:  # one tensor scaling two paths: their channels go together
            self.union_pairs(prev.slots, slots)

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

# name, input), functions and methods (walk, node, rule, label, first input).
_WEIGHTED_KINDS = {"conv", "linear", "batchnorm", "instancenorm", "channelwise"}  # sliced per module
MODULE_STEPS: dict[str, Callable[..., Any]] = {
    "conv": lambda w, node, rule, m, name, x: w.conv(node, name, m, x),
    "linear": lambda w, node, rule, m, name, x: w.linear(node, name, m, x),
    "batchnorm": lambda w, node, rule, m, name, x: w.batchnorm(node, name, m, x),
    "instancenorm": lambda w, node, rule, m, name, x: w.instancenorm(node, name, m, x),
    "layernorm": lambda w, node, rule, m, name, x: w.layernorm(node, name, m, x),
    "flatten": lambda w, node, rule, m, name, x: w.flatten(node, x, m.start_dim, m.end_dim),
    "passthrough": lambda w, node, rule, m, name, x: w.module_passthrough(node, rule, m, name, x),
    "nonzero": lambda w, node, rule, m, name, x: w.nonzero(node, x, f"{type(m).__name__} {name} {rule.reason}"),
    "keeps_channels": lambda w, node, rule, m, name, x: w.unknown(node, f"{type(m).__name__} {name} {rule.reason}",
                                                                  fatal=False),
    "channelwise": lambda w, node, rule, m, name, x: w.channelwise(node, rule, m, name, x),
}
CALL_STEPS: dict[str, Callable[..., Any]] = {
    "passthrough": lambda w, node, rule, label, x: w.passthrough(node, x),
    "nonzero": lambda w, node, rule, label, x: w.nonzero(node, x, f"{label} {rule.reason}"),
    "keeps_channels": lambda w, node, rule, label, x: w.unknown(node, f"{label} {rule.reason}", fatal=False),
    "add": lambda w, node, rule, label, x: w.binary(node, node.args[:2], additive=True),
    "mul": lambda w, node, rule, label, x: w.product(node, node.args[:2]),
    "div": lambda w, node, rule, label, x: w.divide(node, x),
    "cat": lambda w, node, rule, label, x: w.cat_call(node),
    "flatten": lambda w, node, rule, label, x: w.flatten_call(node, x),
    "reduce": lambda w, node, rule, label, x: w.reduce(node),
    "getitem": lambda w, node, rule, label, x: w.getitem(node),
    "split": lambda w, node, rule, label, x: w.split(node),
    "reshape": lambda w, node, rule, label, x: w.reshape(node, x),
}
