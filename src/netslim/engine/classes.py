"""Step 3: classes. After the walk, decide every gate and how each BatchNorm relates to its input:

- owned: the BN is the only reader of its input (conv -> BN). Pruning its channel also
  removes the producer's output channel, so the input slots join the BN's class.
- tied: its input is read by others but is itself made only of other BN channels
  (depthwise chains, post-activation residual streams); the BN joins that class, so
  all of them are pruned together as one coupled group.
- gather: its input is a stream that must keep its width (a pre-activation residual
  stream, a DenseNet concatenation, the model input). The BN reads only its kept
  channels through an index and runs at the reduced width (`IndexedBatchNorm*`).

A *class* (a set of tied slots) is prunable when it holds BN channels of candidate BNs,
no pinned slot (model input/output, an op we cannot slice), and every value entering it
comes from a BN channel (so zeroing those factors zeroes the whole class: the slim model
then computes exactly what the masked model computes).
"""
from __future__ import annotations

import operator
from itertools import chain

import torch

from .channels import Origins, compress, long_tensor
from .slots import SlotWalk


class Classes:
    """Per-class aggregates, kept up to date through BN merges: counts of the values entering
    a class (from BN channels, from elsewhere, from elsewhere that a gate could not follow)
    and of its readers, and its pins. Lists indexed by a class's root slot."""

    def __init__(self, a: SlotWalk):
        self.a = a
        # Pins in slot order, so a class's first pin (its reported reason) is the same as when
        # every slot was visited. A class without pins has no entry.
        root = compress(a.parent)  # every slot now points at its root: a.parent[s] is find(s)
        self.pins: dict[int, list[tuple[bool, str]]] = {}
        for s in sorted(a.pins):
            self.pins.setdefault(a.parent[s], []).extend(a.pins[s])

        def count(slot_lists: list[list[int]]) -> list[int]:
            """Per root: how many entries of `slot_lists` fall into its class."""
            slots = long_tensor(chain.from_iterable(slot_lists))
            return torch.bincount(root[slots], minlength=len(root)).tolist()

        self.readers_ = count(a.reads)                    # channels conv / linear / BN read
        self.bn = count([o.slots for o in a.origins if o.kind == "bn"])
        # values from outside BatchNorm not yet absorbed (a conv output goes with the BN it feeds)
        self.free = count([o.slots for o in a.origins if o.kind != "bn"])
        # ... of which a gate's class could not follow the channels it multiplies (resolve_gates)
        self.unsliceable = count([unsliceable_slots(a, o) for o in a.origins if o.kind == "free"])

    def readers(self, r: int) -> int:
        """How many channel reads of conv / linear / BN modules reach class r."""
        return self.readers_[r]

    def pinned(self, r: int) -> bool:
        return bool(self.pins.get(r))

    def has_bn_origin(self, r: int) -> bool:
        return self.bn[r] > 0

    def removable(self, r: int) -> bool:
        return not self.pinned(r) and self.free[r] == 0

    def pin(self, r: int | None, reason: str) -> None:
        if r is not None:
            self.pins.setdefault(r, []).append((False, reason))

    def drop_reader(self, r: int) -> None:
        """One read of class r (a tied BN's channel) is no longer a reader of it."""
        self.readers_[r] -= 1

    def own(self, name: str, in_roots: list[int], out_slots: list[int], ins: range | None) -> None:
        """BN `name` is the sole reader of its input classes (roots `in_roots`, classify_bns):
        each input class joins its output channel's, and what produced it (a conv's outputs)
        is absorbed: it goes with the BN channel. The same as, per channel j: absorb,
        drop_reader, merge, with each input class's reads (all of them this BN's) dropped at once.
        ins: _run(in_roots)."""
        find, parent = self.a.find, self.a.parent
        readers, bn, free, unsliceable, pins = self.readers_, self.bn, self.free, self.unsliceable, self.pins
        out_roots = self.a.roots(out_slots)
        outs = _run(out_roots)
        if ins is not None and outs is not None and (ins.stop <= outs.start or outs.stop <= ins.start):
            self._own_runs(ins, outs)
            return
        if _all_distinct(in_roots, out_roots):
            self._own_one_to_one(in_roots, out_roots)
            return
        for r in in_roots:
            readers[r] = 0
        for r, other in zip(in_roots, out_roots):
            if parent[r] != r:  # joined an earlier channel's output class
                r = find(r)
            if parent[other] != other:
                other = find(other)
            free[r] = 0
            if r == other:
                continue
            parent[other] = r
            readers[r] += readers[other]
            bn[r] += bn[other]
            unsliceable[r] += unsliceable[other]
            free[r] = free[other]
            moved = pins.pop(other, None)
            if moved:
                pins.setdefault(r, []).extend(moved)

    def _own_one_to_one(self, in_roots: list[int], out_roots: list[int]) -> None:
        """own() where every channel has its own input class and its own output class (a plain
        conv -> BN: all roots distinct): the general loop's updates without its finds and checks."""
        parent, pins = self.a.parent, self.pins
        readers, bn, free, unsliceable = self.readers_, self.bn, self.free, self.unsliceable
        for r, other in zip(in_roots, out_roots):
            parent[other] = r
            readers[r] = readers[other]  # r's reads were all this BN's: dropped
            bn[r] += bn[other]
            unsliceable[r] += unsliceable[other]
            free[r] = free[other]  # what produced r (a conv's output) goes with the BN channel
            if other in pins:
                moved = pins.pop(other)
                if moved:
                    pins.setdefault(r, []).extend(moved)

    def _own_runs(self, ins: range, outs: range) -> None:
        """_own_one_to_one where the input roots and the output roots are two disjoint runs of
        consecutive slots (a conv's fresh outputs, a BN's): the same updates as slice copies."""
        parent, pins = self.a.parent, self.pins
        readers, bn, free, unsliceable = self.readers_, self.bn, self.free, self.unsliceable
        i, o = slice(ins.start, ins.stop), slice(outs.start, outs.stop)
        parent[o] = ins
        readers[i] = readers[o]
        bn[i] = map(operator.add, bn[i], bn[o])
        unsliceable[i] = map(operator.add, unsliceable[i], unsliceable[o])
        free[i] = free[o]
        if any(map(pins.__contains__, outs)):
            for r, other in zip(ins, outs):
                moved = pins.pop(other, None)
                if moved:
                    pins.setdefault(r, []).extend(moved)

    def merge(self, s_a: int, s_b: int) -> None:
        r, other = self.a.find(s_a), self.a.find(s_b)
        if r == other:
            return
        self.a.parent[other] = r  # what a.union(r, other) does with two roots
        for per_class in (self.readers_, self.bn, self.free, self.unsliceable):
            per_class[r] += per_class[other]
        moved = self.pins.pop(other, None)
        if moved:
            self.pins.setdefault(r, []).extend(moved)


def _run(roots: list[int]) -> range | None:
    """`roots` as a range if they are consecutive ascending slots (then all distinct), else None."""
    if not roots or roots[-1] - roots[0] != len(roots) - 1:
        return None
    run = range(roots[0], roots[0] + len(roots))
    return run if roots == list(run) else None


def _all_distinct(in_roots: list[int], out_roots: list[int]) -> bool:
    """Are the roots all distinct, inputs and outputs alike (each channel its own two classes)?"""
    ins = set(in_roots)
    return len(ins) == len(in_roots) and len(set(out_roots)) == len(out_roots) and ins.isdisjoint(out_roots)


def unsliceable_slots(walk: SlotWalk, o: Origins) -> list[int]:
    """The slots of `o` (kind "free") a gate's class could not follow: only a conv / linear
    output channel is sliced with the channels its gate multiplies (resolve_gates)."""
    use = walk.uses.get(o.name)
    if use is None or use.kind not in ("conv", "gconv", "linear"):
        return o.slots
    if o.channel is None:  # entry k is channel k
        return o.slots[len(use.out_slots):]
    return [] if o.channel < len(use.out_slots) else o.slots


def resolve_gates(walk: SlotWalk, cs: Classes) -> list[tuple[int, int]]:
    """Decide every gate and every sigmoid-like value; returns [(follower, leader slot)].

    A gate class may follow its product's BN channels (go when they go) only if nothing
    but such products ever reads its values: no module reads it, nothing pins it, no BN
    channel is in it, and every value in it comes from a conv/linear output (sliced with
    it) or a sigmoid-like op on such. Otherwise it is tied to the product as before, and
    its non-zero values keep those channels (slim == masked either way).
    """
    gated = {walk.find(g) for gs, _, _ in walk.gates for g in gs}

    def dont_care(r: int) -> bool:  # no BN channel in it, and every value from a conv / linear
        return (r in gated and not cs.readers(r) and not cs.pinned(r)
                and not cs.has_bn_origin(r) and not cs.unsliceable[r])

    leader: dict[int, int] = {}

    def follow(slot: int, lead: int) -> None:
        r = walk.find(slot)
        if r in leader and walk.find(leader[r]) != walk.find(lead):
            cs.merge(leader[r], lead)  # one gate for two paths: their channels go together
        leader.setdefault(r, lead)

    for out, src, reason in reversed(walk.derived):  # consumers before producers
        if all(dont_care(walk.find(s)) for s in out):
            for s, x in zip(out, src):
                if cs.has_bn_origin(walk.find(x)):
                    follow(s, x)   # computed from the BN channel itself: x * x.sigmoid()
                else:
                    cs.merge(s, x)  # the gate's producer (fc2 of squeeze-excitation)
                    gated.add(walk.find(s))
        else:
            for s, x in zip(out, src):
                cs.merge(s, x)
            for s in out:
                cs.pin(walk.find(s), reason)
    for gs, xs, _ in walk.gates:
        for g, x in zip(gs, xs):
            if dont_care(walk.find(g)):
                follow(g, x)
            else:
                cs.merge(g, x)
    return [(r, lead) for r, lead in leader.items()]


def varying_inputs(walk: SlotWalk) -> dict[str, frozenset[int]]:
    """{conv/linear name: its input positions whose value may vary with the model input even
    when every BN channel behind them is removed}. Call right after the walk (`walk.parent`
    then holds the walk's own classes: slots tied by adds and products, not yet by gates or BNs).

    A removed BN channel outputs a constant (beta), and every op the walk follows keeps a
    constant constant, except a product whose other factor is not: a gate computed from other
    channels (squeeze-excitation, `x * conv(k).sigmoid()`) or a tensor broadcast over the channels
    that depends on the input (`y * x[:, :1]`). Such a product marks its class, and only a
    reader after it (in the graph) sees values that vary: the squeeze of squeeze-excitation
    reads the same channels before the product, still constants. Compensation skips the marked positions (a constant
    folded there would be wrong) instead of probing the model to find them. A gate computed
    from the channel's own class (`x * x.sigmoid()`), a number and a tensor attribute (layer
    scale) keep it constant.
    """
    if not walk.product_bit:
        return {}
    compress(walk.parent)
    root = walk.parent
    source = {o: s for out, src, _ in walk.derived for o, s in zip(out, src)}  # sigmoid-like -> input

    def from_itself(gate: int | None, carrier_root: int) -> bool:
        """Is the gate a function of the carrier's own class (through sigmoid-like ops)?"""
        while gate is not None:
            if root[gate] == carrier_root:
                return True
            gate = source.get(gate)
        return False

    made_vary: dict[int, int] = {}  # class -> bits of the products that make its values vary
    for slots, node in walk.varying:
        for s in slots:
            made_vary[root[s]] = made_vary.get(root[s], 0) | 1 << walk.product_bit[node]
    for gates, carriers, node in walk.gates:
        for g, x in zip(gates, carriers):
            if not from_itself(g, root[x]):
                made_vary[root[x]] = made_vary.get(root[x], 0) | 1 << walk.product_bit[node]
    out = {}
    for node, after in walk.after_products.items():
        use = walk.uses.get(node.target) if node.op == "call_module" else None
        if use is not None and use.kind in ("conv", "gconv", "linear"):
            positions = frozenset(j for j, s in enumerate(use.in_slots) if made_vary.get(root[s], 0) & after)
            if positions:
                out[use.name] = positions
    return out


def classify_bns(walk: SlotWalk, classes: Classes) -> Classes:
    """Decide owned / tied / gather for every BN; returns the final per-class aggregates."""
    for name in walk.bn_order:
        use = walk.uses.get(name)
        if use is None or use.kind != "bn":
            continue
        if use.bn_mode == "gather":      # an IndexedBatchNorm stays a gather
            continue
        in_roots = walk.roots(use.in_slots)
        in_run = _run(in_roots)
        if _sole_reader(classes, in_roots, in_run):
            classes.own(name, in_roots, use.out_slots, in_run)
            use.bn_mode = "owned"
            continue
        # Not the sole reader. Per channel: an input made only of other BN channels is
        # tied to them (if they go, this channel must go too, or it would read a removed
        # channel); anything else is a stream that keeps its width, read through a gather.
        modes = set()
        for j, (s_in, s_out) in enumerate(zip(use.in_slots, use.out_slots)):
            root = walk.find(s_in)
            if classes.removable(root) and classes.has_bn_origin(root):
                classes.drop_reader(root)
                classes.merge(root, s_out)
                modes.add("tied")
            else:
                modes.add("gather")
        use.bn_mode = modes.pop() if len(modes) == 1 else "mixed"
    return classes


def _sole_reader(classes: Classes, in_roots: list[int], run: range | None) -> bool:
    """Owned: a BN alone reads its input classes (roots `in_roots`, `run` if consecutive: _run),
    none pinned. A class may cover several of its channels (a grouped conv ties position j of
    every group): then all of them read it. (Each channel j of the BN is one read of class
    in_roots[j]: a class read exactly as many times as it holds channels of the BN has no other reader.)"""
    readers, pins = classes.readers_, classes.pins
    if run is not None:  # consecutive slots (a conv's outputs): each read once, none pinned
        return readers[run.start:run.stop].count(1) == len(run) and not any(map(pins.get, run))
    if len(set(in_roots)) == len(in_roots):  # one class per channel (the common case): read once
        return all(readers[root] == 1 and not pins.get(root) for root in in_roots)
    channels: dict[int, int] = {}
    for root in in_roots:
        channels[root] = channels.get(root, 0) + 1
    return all(readers[root] == count and not pins.get(root) for root, count in channels.items())
