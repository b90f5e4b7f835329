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

from .channels import compress
from .slots import SlotWalk


class Classes:
    """Per-class aggregates (origins, readers, pins) kept up to date through BN merges."""

    def __init__(self, a: SlotWalk):
        self.a = a
        self.origin: dict[int, list[tuple]] = {}
        self.readers_: dict[int, list[tuple]] = {}
        self.pins: dict[int, list[tuple[bool, str]]] = {}
        self.free: dict[int, int] = {}        # root -> count of free (non-BN, unabsorbed) origins
        # Only slots with entries. Pins in slot order, so a class's first pin (its reported
        # reason) is the same as when every slot was visited; the order of origins and readers
        # means nothing (they are counted and searched). A class without entries has none here.
        compress(a.parent)  # every slot now points at its root: a.parent[s] is find(s)
        root = a.parent
        for per_slot, per_class in ((a.origin, self.origin), (a.readers, self.readers_)):
            for s, entries in per_slot.items():
                per_class.setdefault(root[s], []).extend(entries)
        for s in sorted(a.pins):
            self.pins.setdefault(root[s], []).extend(a.pins[s])
        for r, origins in self.origin.items():
            self.free[r] = sum(1 for o in origins if o[0] != "bn")

    def readers(self, r: int) -> list[tuple]:
        return self.readers_.get(r, [])

    def pinned(self, r: int) -> bool:
        return bool(self.pins.get(r))

    def has_bn_origin(self, r: int) -> bool:
        return any(o[0] == "bn" for o in self.origin.get(r, []))

    def removable(self, r: int) -> bool:
        return not self.pinned(r) and self.free.get(r, 0) == 0

    def pin(self, r: int | None, reason: str) -> None:
        if r is not None:
            self.pins.setdefault(r, []).append((False, reason))

    def absorb(self, r: int) -> None:
        self.free[r] = 0

    def drop_reader(self, r: int, reader: tuple) -> None:
        lst = self.readers_.get(r, [])
        if reader in lst:
            lst.remove(reader)

    def own(self, name: str, in_slots: list[int], out_slots: list[int]) -> None:
        """BN `name` is the sole reader of its input classes (classify_bns): each input class
        joins its output channel's, and what produced it (a conv's outputs) is absorbed: it goes
        with the BN channel. The same as, per channel j: absorb, drop_reader(("bn", name, j)),
        merge, with each input class's readers (all of them this BN's) dropped at once."""
        find, parent = self.a.find, self.a.parent
        origin, readers, pins, free = self.origin, self.readers_, self.pins, self.free
        for s in in_slots:
            readers.pop(find(s), None)
        for s_in, s_out in zip(in_slots, out_slots):
            r, other = find(s_in), find(s_out)
            free[r] = 0
            if r == other:
                continue
            parent[other] = r
            for per_class in (origin, readers, pins):
                moved = per_class.pop(other, None)
                if moved:
                    per_class.setdefault(r, []).extend(moved)
            free[r] = free.pop(other, 0)

    def merge(self, s_a: int, s_b: int) -> None:
        r, other = self.a.find(s_a), self.a.find(s_b)
        if r == other:
            return
        self.a.parent[other] = r  # what a.union(r, other) does with two roots
        self.origin.setdefault(r, []).extend(self.origin.pop(other, []))
        self.readers_.setdefault(r, []).extend(self.readers_.pop(other, []))
        self.pins.setdefault(r, []).extend(self.pins.pop(other, []))
        self.free[r] = self.free.get(r, 0) + self.free.pop(other, 0)


def resolve_gates(walk: SlotWalk, cs: Classes) -> list[tuple[int, int]]:
    """Decide every gate and every sigmoid-like value; returns [(follower, leader slot)].

    A gate class may follow its product's BN channels (go when they go) only if nothing
    but such products ever reads its values: no module reads it, nothing pins it, no BN
    channel is in it, and every value in it comes from a conv/linear output (sliced with
    it) or a sigmoid-like op on such. Otherwise it is tied to the product as before, and
    its non-zero values keep those channels (slim == masked either way).
    """
    gated = {walk.find(g) for gs, _, _ in walk.gates for g in gs}

    def dont_care(r: int) -> bool:
        return (r in gated and not cs.readers(r) and not cs.pinned(r)
                and all(sliceable_origin(walk, o) for o in cs.origin.get(r, [])))

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


def sliceable_origin(walk: SlotWalk, o: tuple) -> bool:
    kind, name, j = o
    if kind == "derived":
        return True
    use = walk.uses.get(name)
    return kind == "free" and use is not None and use.kind in ("conv", "gconv", "linear") \
        and j < len(use.out_slots)


def classify_bns(walk: SlotWalk, classes: Classes) -> Classes:
    """Decide owned / tied / gather for every BN; returns the final per-class aggregates."""
    for name in walk.bn_order:
        use = walk.uses.get(name)
        if use is None or use.kind != "bn":
            continue
        if use.bn_mode == "gather":      # an IndexedBatchNorm stays a gather
            continue
        in_roots = [walk.find(s) for s in use.in_slots]
        if _sole_reader(classes, name, in_roots):
            classes.own(name, use.in_slots, use.out_slots)
            use.bn_mode = "owned"
            continue
        # Not the sole reader. Per channel: an input made only of other BN channels is
        # tied to them (if they go, this channel must go too, or it would read a removed
        # channel); anything else is a stream that keeps its width, read through a gather.
        modes = set()
        for j, (s_in, s_out) in enumerate(zip(use.in_slots, use.out_slots)):
            root = walk.find(s_in)
            if classes.removable(root) and classes.has_bn_origin(root):
                classes.drop_reader(root, ("bn", name, j))
                classes.merge(root, s_out)
                modes.add("tied")
            else:
                modes.add("gather")
        use.bn_mode = modes.pop() if len(modes) == 1 else "mixed"
    return classes


def _sole_reader(classes: Classes, name: str, in_roots: list[int]) -> bool:
    """Owned: BN `name` alone reads its input classes, none pinned. A class may cover several
    of its channels (a grouped conv ties position j of every group): then all of them read it.
    (Each class's readers are exactly ("bn", name, j) for the channels j in it, each once.)"""
    channels: dict[int, int] = {}
    for root in in_roots:
        channels[root] = channels.get(root, 0) + 1
    for root, count in channels.items():
        readers = classes.readers_.get(root)
        if not readers or len(readers) != count or classes.pins.get(root):
            return False
        seen = set()
        for kind, who, j in readers:
            if kind != "bn" or who != name or j in seen or in_roots[j] != root:
                return False
            seen.add(j)
    return True
