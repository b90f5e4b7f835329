"""The units as a table (analysis.UnitTable) and as Unit objects (Analysis.units, built from
the table on first read): on every zoo architecture they describe the same units, each unit
is one slot class, and the table readers (compensate.removed_bn_channels, plan.removed_roots'
error) give what the per-unit loops gave.
"""
from __future__ import annotations

import random

import pytest
import torch

from netslim.engine.analysis import Analysis, UnitTable, analyze
from netslim.engine.compensate import removed_bn_channels
from netslim.engine.plan import removed_roots
from netslim.errors import PruneError
from zoo import ZOO

X = torch.zeros(1, 3, 32, 32)


def _sizes(an: Analysis) -> list[int]:
    return [len(an.modules[n].out_slots) for n in an.bn_names]


def _assert_same_table(a: UnitTable, b: UnitTable) -> None:
    for name in ("bn_offset", "member_flat", "member_unit", "unit_size", "unit_root"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.layers == b.layers
    assert len(a.layer_units) == len(b.layer_units)
    assert all(torch.equal(x, y) for x, y in zip(a.layer_units, b.layer_units))


def _removed_bn_channels_per_unit(an: Analysis, roots: set[int]) -> dict[str, list[int]]:
    """The per-unit loop removed_bn_channels was before it read the table: the reference."""
    out: dict[str, list[int]] = {}
    for u in an.units:
        if u.root in roots:
            for name, j in u.bn_channels:
                out.setdefault(name, []).append(j)
    return out


@pytest.fixture(scope="module", params=sorted(ZOO))
def analysed(request) -> Analysis:
    torch.manual_seed(0)
    return analyze(ZOO[request.param]().eval(), X, strict=False)


def test_units_are_the_table_and_each_is_one_class(analysed):
    an = analysed
    units = an.units
    assert an.units is units  # built once
    _assert_same_table(UnitTable.of(units, an.bn_names, _sizes(an)), an.table)
    position = {n: k for k, n in enumerate(an.bn_names)}
    seen: set[tuple[str, int]] = set()
    firsts = []
    for u in units:
        assert u.bn_channels, u
        # every member is a channel of its BN in the unit's class, listed BN by BN (graph order), then by channel
        assert all(an.find(an.modules[n].out_slots[j]) == u.root for n, j in u.bn_channels)
        keys = [(position[n], j) for n, j in u.bn_channels]
        assert keys == sorted(keys)
        assert u.layer == tuple(dict.fromkeys(n for n, _ in u.bn_channels))
        assert not seen & set(u.bn_channels)
        seen |= set(u.bn_channels)
        firsts.append(keys[0])
    assert firsts == sorted(firsts)  # units in order of first appearance
    assert an.coupled_layers() == sorted({u.layer for u in units if len(u.layer) > 1})


def test_removed_bn_channels_equals_the_per_unit_loop(analysed):
    an = analysed
    rng = random.Random(0)
    roots = an.table.unit_root.tolist()
    others = sorted({an.find(s) for s in range(len(an.parent))} - set(roots))  # classes that are no unit
    for share in (0.0, 0.1, 0.5, 0.9, 1.0):
        removed = {r for r in roots + others if rng.random() < share}  # (prune's holds gates' roots too)
        got = removed_bn_channels(an, removed)
        assert list(got.items()) == list(_removed_bn_channels_per_unit(an, removed).items())  # order too


def test_an_analysis_built_from_units_builds_its_table():
    """A hand-built Analysis (no table) keeps the units it is given and builds the same table."""
    torch.manual_seed(0)
    an = analyze(ZOO["resnet18-basic"]().eval(), X)
    units = an.units
    again = Analysis(an.modules, units, an.unprunable, an.bn_names, an.parent, an.follows)
    assert again.units is units
    _assert_same_table(again.table, an.table)


def test_a_plan_splitting_a_coupled_unit_names_its_channels():
    """plan.removed_roots reads the offending unit's channels off the table."""
    torch.manual_seed(0)
    model = ZOO["resnet18-basic"]().eval()  # its residual streams are coupled units
    an = analyze(model, X)
    unit = next(u for u in an.units if len(u.layer) > 1)
    (n0, j0), *_ = unit.bn_channels
    mods = dict(model.named_modules())
    plan = {n0: [j for j in range(mods[n0].num_features) if j != j0]}  # drops one member, keeps the rest
    with pytest.raises(PruneError) as err:
        removed_roots(an, plan, mods)
    assert f"coupled channels {unit.bn_channels[:4]}..." in str(err.value)


def test_class_layers_unify_runs_and_tell_equal_counts_apart():
    """A layer seen again after another (A, B, A) is the same layer; classes listing as many
    BNs as the one before but other ones ((0, 1) then (0, 2)) are not."""
    from netslim.engine.analysis import _class_layers

    per_class = [(0,), (1,), (1,), (0,), (0, 1), (0, 2), (0, 2), (0,)]
    entry_bn = torch.tensor([b for bns in per_class for b in bns])
    entry_class = torch.tensor([k for k, bns in enumerate(per_class) for _ in bns])
    class_bns = torch.tensor([len(bns) for bns in per_class])
    class_layer, layers = _class_layers(entry_bn, entry_class, class_bns)
    assert [layers[k] for k in class_layer.tolist()] == per_class
    assert layers == [(0,), (1,), (0, 1), (0, 2)]
    class_layer, layers = _class_layers(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                                        torch.zeros(0, dtype=torch.long))
    assert class_layer.tolist() == [] and layers == []


def test_roots_of_slots_far_from_their_roots_are_finds_and_shorten_the_way():
    """SlotWalk.roots on a forest with long chains (a residual stream after many owned BNs)
    answers find() of every slot, moves no root, and leaves every slot it walked through one
    step from its root."""
    import random
    import torch.fx as fx
    from torch import nn
    from netslim.engine.channels import find_root
    from netslim.engine.slots import SlotWalk

    rng = random.Random(0)
    walk = SlotWalk(nn.Sequential(), fx.GraphModule(nn.Sequential(), fx.Graph()), set())
    walk.new(3000)
    for s in rng.sample(range(3000), 2500):  # random links from higher to lower slots: no cycles
        if s:
            walk.parent[s] = rng.randrange(s)
    ends = []
    for depth in range(1, 8):  # and chains of every depth, walked from their far end
        chain = list(range(3000 - 10 * depth, 3000 - 10 * depth + depth + 1))
        for a, b in zip(chain, chain[1:]):
            walk.parent[b] = a
        ends.append(chain[-1])
    expected = [find_root(list(walk.parent), s) for s in range(3000)]
    slots = rng.sample(range(2900), 800) + ends
    before = list(walk.parent)
    assert walk.roots(slots) == [expected[s] for s in slots]
    assert [find_root(list(walk.parent), s) for s in range(3000)] == expected  # no root moved
    on_the_way = set()
    for s in slots:
        while before[s] != s:
            on_the_way.add(s)
            s = before[s]
    assert all(walk.parent[s] == expected[s] for s in on_the_way)
    assert all(walk.parent[s] in (before[s], expected[s]) for s in range(3000))
    for depth in range(3, 8):  # one chain alone: every slot on it, the deepest one's too
        walk.parent[:] = [max(s - 1, 0) for s in range(depth + 1)]
        assert walk.roots([depth]) == [0] and walk.parent == [0] * (depth + 1)


@pytest.mark.parametrize("n, bound", [(0, 0), (0, 5), (1, 1), (50, 7), (3000, 4000)])
def test_first_appearance_numbers_values_in_order_of_first_appearance(n, bound):
    """_first_appearance: the distinct values in the order they first appear, and each value's
    index into them, as a plain Python pass over the values finds them."""
    from netslim.engine.analysis import _first_appearance

    values = torch.randint(0, max(bound, 1), (n,), generator=torch.Generator().manual_seed(n))
    order: dict[int, int] = {}
    for v in values.tolist():
        order.setdefault(v, len(order))
    distinct, index = _first_appearance(values, bound)
    assert distinct.tolist() == list(order) and index.tolist() == [order[v] for v in values.tolist()]
