"""netslim.register_module: a user's own module type, described by a rule, prunes like a built-in op."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netslim
from netslim.engine import rules
from netslim.errors import ConfigError, PruneError

from test_prune import randomize_bn


@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
    """Registrations made by a test stay in it (the registry is process-wide)."""
    monkeypatch.setattr(rules, "MODULE_RULES", dict(rules.MODULE_RULES))
    monkeypatch.setattr(rules, "_USER_MODULES", set(rules._USER_MODULES))


def leaky_class() -> type:
    """A fresh module type each test (the registry is process-wide): torch.where is no op
    netslim knows, so the walk stops at it until the type is registered."""
    class LearnedLeaky(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            self.slope = nn.Parameter(torch.linspace(0.05, 0.3, channels))

        def forward(self, x):
            return torch.where(x > 0, x, x * self.slope.view(1, -1, 1, 1))
    return LearnedLeaky


class Net(nn.Module):
    def __init__(self, act: type):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act(8)
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), act(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def sparse_net(act: type) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(Net(act)).eval()


X = torch.randn(4, 3, 8, 8)


def test_an_unknown_module_is_refused_with_the_way_out():
    leaky = leaky_class()
    with pytest.raises(PruneError) as e:
        netslim.prune(sparse_net(leaky), 0.5, example_input=X[:1])
    msg = str(e.value)
    assert "netslim.register_module(LearnedLeaky, netslim.rules.channelwise" in msg  # names the way out
    assert "act1" in msg and "act2" in msg and "exclude=" in msg and "\n" not in msg


def test_a_registered_channelwise_module_prunes_and_reloads(tmp_path):
    leaky = leaky_class()
    netslim.register_module(leaky, netslim.rules.channelwise(params=("slope",)))
    model = sparse_net(leaky)
    slim, report = netslim.prune(model, 0.5, example_input=X[:1])
    masked, _ = netslim.prune(model, 0.5, mode="mask", example_input=X[:1])
    assert slim.bn1.num_features < 8 and slim.bn2.num_features < 12
    assert slim.act1.slope.shape == (slim.bn1.num_features,) and slim.act2.slope.shape == (slim.bn2.num_features,)
    torch.testing.assert_close(slim.act1.slope, model.act1.slope[slim.netslim_meta["plan"]["bn1"]])
    with torch.no_grad():
        torch.testing.assert_close(slim(X), masked(X), rtol=1e-5, atol=1e-5)
    netslim.save_checkpoint(tmp_path / "slim.pt", slim)
    again, _ = netslim.load_checkpoint(tmp_path / "slim.pt", model=Net(leaky))
    with torch.no_grad():
        assert torch.equal(again(X), slim(X))
    twice, _ = netslim.prune(again, 0.3, example_input=X[:1])  # prune again: the plan composes
    assert twice.act1.slope.shape == (twice.bn1.num_features,)


def test_a_channel_the_module_maps_to_non_zero_keeps_its_width():
    """channelwise is checked, not trusted: a shift makes 0 non-zero, so those channels stay."""
    class Shifted(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            self.shift = nn.Parameter(torch.zeros(channels))
            with torch.no_grad():
                self.shift[1:3] = 0.5

        def forward(self, x):
            return torch.relu(x) + self.shift.view(1, -1, 1, 1)

    netslim.register_module(Shifted, netslim.rules.channelwise(params=("shift",)))
    model = sparse_net(Shifted)
    slim, report = netslim.prune(model, 0.5, example_input=X[:1])
    masked, _ = netslim.prune(model, 0.5, mode="mask", example_input=X[:1])
    with torch.no_grad():
        torch.testing.assert_close(slim(X), masked(X), rtol=1e-5, atol=1e-5)
    plan = slim.netslim_meta["plan"]
    for bn, width in (("bn1", 8), ("bn2", 12)):
        assert {1, 2} <= set(plan[bn]) and len(plan[bn]) < width  # the others still go


def test_keeps_channels_keeps_them_and_says_why():
    leaky = leaky_class()
    netslim.register_module(leaky, netslim.rules.keeps_channels("mixes its channels by design"))
    model = sparse_net(leaky)
    slim, report = netslim.prune(model, 0.5, example_input=X[:1])
    assert slim.bn1.num_features == 8 and slim.bn2.num_features == 12
    assert "mixes its channels by design" in report["unprunable"]["bn1"]


def test_register_module_refuses_what_it_cannot_use():
    with pytest.raises(ConfigError):
        netslim.register_module(torch.where, netslim.rules.passthrough())
    with pytest.raises(ConfigError):
        netslim.register_module(leaky_class(), "channelwise")
    with pytest.raises(ConfigError):
        netslim.rules.channelwise(params=(1,))


class BlockWithBN(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.bn(x).transpose(2, 3)  # channel by channel, through an op netslim does not know


def test_a_rule_that_leaves_per_channel_tensors_unsliced_is_refused():
    """passthrough() on a module holding per-channel tensors would give a broken slim model."""
    class Block(BlockWithBN):
        pass

    netslim.register_module(Block, netslim.rules.passthrough())
    with pytest.raises(PruneError, match=r"per-channel tensors its rule does not slice \(bn.weight, bn.bias"):
        netslim.prune(sparse_net(Block), 0.5, example_input=X[:1])


def test_batchnorms_inside_a_registered_module_are_reported():
    """A registered type is one call: BNs inside it are not analysed, and the report says so."""
    class Block(BlockWithBN):
        pass

    netslim.register_module(Block, netslim.rules.keeps_channels("transposes space"))
    slim, report = netslim.prune(sparse_net(Block), 0.5, example_input=X[:1])
    assert "registered with netslim.register_module" in report["unprunable"]["act1.bn"]
    assert "transposes space" in report["unprunable"]["bn1"]
    assert slim.act1.bn.num_features == 8 and slim.bn1.num_features == 8


def test_union_pairs_and_roots_agree_with_one_union_and_one_find_at_a_time():
    """SlotWalk.union_pairs leaves every slot with the root that unions one pair at a time give
    (the same classes and representatives), whether or not its shortcut applies (all roots of
    the pairs distinct: runs of fresh slots; else shared or repeated roots); roots() is find()
    of every slot at any path length."""
    import random
    from netslim.engine.slots import SlotWalk

    def bare_walk():  # the union-find alone
        walk = SlotWalk.__new__(SlotWalk)
        walk.parent = list(range(64))
        return walk

    rng = random.Random(0)
    shortcut_taken = fallback_taken = 0
    for _ in range(300):
        ours, one_by_one = bare_walk(), bare_walk()
        for _ in range(rng.randint(1, 8)):
            n = rng.randint(1, 8)
            if rng.random() < 0.5:  # two runs of consecutive slots
                a0, b0 = rng.randrange(64 - n), rng.randrange(64 - n)
                a, b = list(range(a0, a0 + n)), list(range(b0, b0 + n))
            else:
                a, b = [rng.randrange(64) for _ in range(n)], [rng.randrange(64) for _ in range(n)]
            distinct = len(set(ours.roots(a)) | set(ours.roots(b))) == 2 * n
            shortcut_taken += distinct
            fallback_taken += not distinct
            ours.union_pairs(a, b)
            for x, y in zip(a, b):
                one_by_one.union(x, y)
            probe = [rng.randrange(64) for _ in range(10)]
            assert ours.roots(probe) == [one_by_one.find(s) for s in probe]
            every = list(range(64))
            assert [ours.find(s) for s in every] == [one_by_one.find(s) for s in every]
    assert shortcut_taken > 100 and fallback_taken > 100


class PinnedAroundBN(nn.Module):
    """conv1's output is also returned (pinned where a BN reads it), bn2's output is the model's
    (a pinned class that an owned BN's merge moves onto its input's)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv1(x)
        return self.bn2(self.conv2(F.relu(self.bn1(y)))), y


@pytest.mark.parametrize("arch", ["convnext-bn", "ghostnet", "resnext29", "resnet-bottleneck", "mobilenet-v2",
                                  "pinned"])
def test_an_owned_bn_with_one_class_per_channel_merges_as_the_general_loop_does(arch, monkeypatch):
    """classify_bns' shortcuts for a BN whose channels each have their own input and output
    class (conv -> BN), and for one whose input and output classes are two runs of consecutive
    slots (copied as slices), leave every slot's class, every class aggregate and every BN's
    mode exactly as the per-channel loop they skip (convnext-bn, ghostnet: classes fed from
    outside BN and gates; grouped convs in resnext29 take the loop; "pinned": pins on both sides)."""
    from zoo import ZOO
    from netslim.engine import classes as cls
    from netslim.engine.analysis import varying_inputs
    from netslim.engine.channels import compress
    from netslim.engine.slots import SlotWalk
    from netslim.engine.trace import trace

    model = (PinnedAroundBN() if arch == "pinned" else ZOO[arch]()).eval()
    gm = trace(model, torch.randn(1, 3, 32, 32))

    def classified():
        walk = SlotWalk(model, gm, set())
        walk.run()
        varying_inputs(walk)
        cs = cls.Classes(walk)
        cls.resolve_gates(walk, cs)
        cls.classify_bns(walk, cs)
        return (compress(walk.parent).tolist(), cs.readers_, cs.bn, cs.free, cs.unsliceable,
                {r: p for r, p in cs.pins.items() if p}, {n: u.bn_mode for n, u in walk.uses.items() if u.kind == "bn"})

    shortcut = classified()
    runs = []
    monkeypatch.setattr(cls.Classes, "_own_runs", lambda self, ins, outs: runs.append(ins) or
                        cls.Classes._own_one_to_one(self, list(ins), list(outs)))
    assert classified() == shortcut and (runs or arch == "resnext29")  # the run shortcut is taken
    monkeypatch.setattr(cls, "_run", lambda roots: None)
    assert classified() == shortcut
    monkeypatch.setattr(cls, "_all_distinct", lambda in_roots, out_roots: False)
    assert classified() == shortcut
