"""make_plan, global_threshold and removed_roots against a plain-Python reading of their rules
(plan.py computes them with NumPy: per layer, and per flat position)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from netslim.engine.analysis import analyze
from netslim.engine.plan import global_threshold, make_plan, removed_roots
from netslim.errors import PruneError

FACTORS = {
    "b1": [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4],
    "b2": [0.01, 0.03, 0.03, 0.02, 0.03, 0.0, 0.01, 0.02],  # all under the threshold, with ties
    "b3": [0.5, 0.45, 0.05, 0.55, 0.65, 0.04],
}


class Chain(nn.Module):
    """Three conv-BN-ReLU layers whose channels are pruned independently."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)
        with torch.no_grad():
            for name, factors in FACTORS.items():
                getattr(self, name).weight.copy_(torch.tensor(factors))

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(x.mean((2, 3)))


def reference_plan(percent, min_channels=1, max_layer_percent=None, round_to=1):
    """The seed's threshold and the guards, channel by channel: a guard keeps the best-scoring
    channels, ties in channel order."""
    factors = {n: torch.tensor(f).tolist() for n, f in FACTORS.items()}  # as float32 stores them
    values = sorted(v for f in factors.values() for v in f)
    threshold = values[int(len(values) * percent)]
    plan, kept_counts = {}, {}
    for name, f in factors.items():
        n = len(f)
        keep = sum(v > threshold for v in f)
        if max_layer_percent is not None:
            keep = max(keep, n - int(n * max_layer_percent))
        keep = max(keep, min(min_channels, n))
        if round_to > 1 and keep % round_to:
            keep = min(n, -(-keep // round_to) * round_to)
        best_first = sorted(range(n), key=lambda j: -f[j])  # sorted() is stable
        kept_counts[name] = keep
        if keep < n:
            plan[name] = sorted(best_first[:keep])
    return plan, threshold, kept_counts


@pytest.fixture(scope="module")
def chain():
    model = Chain().eval()
    return model, analyze(model, torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("options", [{}, {"min_channels": 3}, {"min_channels": 4}, {"max_layer_percent": 0.5},
                                     {"round_to": 4}, {"min_channels": 2, "round_to": 3}],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "rule")
def test_make_plan_keeps_what_the_rule_and_the_guards_say(chain, options):
    model, analysis = chain
    plan, threshold, decisions = make_plan(model, analysis, 0.5, **options)
    want, want_threshold, kept_counts = reference_plan(0.5, **options)
    assert threshold == want_threshold
    assert plan == want
    for d in decisions:
        (name,) = d.bns
        assert d.kept == d.channels_kept == kept_counts[name]


def test_global_threshold_is_the_sorted_element():
    values = torch.randint(0, 50, (1000,)).float() / 7  # many ties
    for percent in (0.0, 0.1, 0.5, 0.731, 0.999):
        assert global_threshold(values, percent) == float(torch.sort(values)[0][int(1000 * percent)])


def test_removed_roots_reads_a_plan_in_any_order_and_type(chain):
    model, analysis = chain
    mods = dict(model.named_modules())
    want = removed_roots(analysis, {"b1": [0, 2, 4], "b3": [1, 3]}, mods)
    assert want
    for plan in ({"b1": [4, 0, 2, 0], "b3": [3, 1, 3]}, {"b1": np.array([2, 4, 0]), "b3": torch.tensor([3, 1])},
                 {"b1": [np.int64(0), 2.0, 4], "b3": (1, 3)}):
        assert removed_roots(analysis, plan, mods) == want


@pytest.mark.parametrize("kept, bad", [([9, 0], 9), ([3, -1], -1), ([0, 8, 2], 8)])
def test_removed_roots_refuses_a_channel_out_of_range_wherever_it_is_listed(chain, kept, bad):
    model, analysis = chain
    with pytest.raises(PruneError, match=f"keeps channel {bad} of b1, which has 8"):
        removed_roots(analysis, {"b1": kept}, dict(model.named_modules()))


@pytest.mark.parametrize("kept", [[0, 2**63], [float("nan")], [1e30], [0, None], ["one"]])
def test_removed_roots_refuses_what_is_no_channel_number(chain, kept):
    """A plan read from a damaged checkpoint: one clear error, not NumPy's."""
    model, analysis = chain
    with pytest.raises(PruneError, match="the plan lists a channel of b1 that is not a channel number"):
        removed_roots(analysis, {"b1": kept}, dict(model.named_modules()))
