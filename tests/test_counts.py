"""The report's counts read off the analysis's graph (engine/counts.py) equal profile.count's
forward, exactly, or are not read off the graph at all."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netslim.engine.analysis import analyze
from netslim.engine.counts import GraphCount
from netslim.engine.plan import make_plan, removed_roots
from netslim.engine.prune import prune
from netslim.engine.slim import apply_plan, removed_slots
from netslim.profile import count
from zoo import ZOO
from test_zoo import skew_bn

# The zoo architectures whose graph the counter refuses (profile.count counts them): a test
# that fails when one more falls back, or one less.
FALLS_BACK = {"untraceable-submodule": "a submodule torch.fx cannot trace is one opaque call"}


def kept_slots(model, analysis, plan):
    return ~removed_slots(analysis, removed_roots(analysis, plan, dict(model.named_modules())))


@pytest.mark.parametrize("arch", sorted(ZOO))
def test_graph_counts_equal_profile_count_on_every_zoo_architecture(arch):
    torch.manual_seed(0)
    model = skew_bn(ZOO[arch]()).eval()
    x = torch.randn(1, 3, 32, 32)
    analysis = analyze(model, x, strict=False)
    counter = GraphCount.of(model, analysis)
    assert (counter is None) == (arch in FALLS_BACK)
    if counter is None:
        return
    assert counter.count(model) == count(model, example_input=x)
    for percent in (0.3, 0.5, 0.7, 0.95):
        plan, _, _ = make_plan(model, analysis, percent)
        slim = apply_plan(model, plan, x, analysis=analysis, branches=[])
        assert counter.count(slim, kept_slots(model, analysis, plan)) == count(slim, example_input=x), percent
    # the whole call, slim and mask (whose `after` keeps the dense shapes, with compensated biases)
    for mode in ("slim", "mask"):
        pruned, report = prune(model, 0.5, mode=mode, example_input=x)
        assert report["before"] == count(model, example_input=x)
        assert report["after"] == count(pruned, example_input=x), mode
    assert report["effective"]["macs"] < report["after"]["macs"]


def test_slim_widths_that_disagree_with_the_modules_are_refused_not_counted():
    """The widths read off the slots are checked against every conv, linear and BN: counting the
    dense model as if it were sliced (or a slice whose slots are not its plan's) gives None."""
    torch.manual_seed(0)
    model = skew_bn(ZOO["resnet18-basic"]()).eval()
    x = torch.randn(1, 3, 32, 32)
    analysis = analyze(model, x)
    counter = GraphCount.of(model, analysis)
    plan, _, _ = make_plan(model, analysis, 0.5)
    assert counter.count(model, kept_slots(model, analysis, plan)) is None
    other, _, _ = make_plan(model, analysis, 0.3)
    slim = apply_plan(model, plan, x, analysis=analysis, branches=[])
    assert counter.count(slim, kept_slots(model, analysis, other)) is None
    assert counter.count(slim, kept_slots(model, analysis, plan)) == count(slim, example_input=x)


class ConvBnNet(nn.Module):
    """(what `head` does) -> conv -> BN -> ReLU -> conv -> BN -> ReLU -> (what `tail` does) -> pool -> fc."""

    def __init__(self, tail=None, head=None):
        super().__init__()
        self.head = head
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.tail = tail

    def forward(self, x):
        if self.head is not None:
            x = self.head(x)
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn(self.conv(x))))))
        if self.tail is not None:
            x = self.tail(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class FunctionalConv(nn.Module):  # on the input image: no BN channel reaches it
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3, 1, 1))

    def forward(self, x):
        return F.conv2d(x, self.weight)


class MyAvgPool(nn.AvgPool2d):  # a user's subclass: traced through, but profile.count hooks it
    def forward(self, x):
        return super().forward(x)


class TrainOnlyPool(nn.Module):
    """A pool applied only in training: a trace in training mode holds it, an eval count not."""

    def __init__(self):
        super().__init__()
        self.extra = nn.AvgPool2d(3, 1, 1)

    def forward(self, x):
        return self.extra(x) if self.training else x


class TokenLinear(nn.Module):  # a Linear on [N, C, L]: dim 1 is not its features
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(x.flatten(2)).view_as(x)


def _fallback_cases():
    hooked = ConvBnNet()
    # work outside every counted module, which profile.count's op counter sees: 8 MACs
    hooked.conv2.register_forward_pre_hook(lambda m, args: [torch.mv(torch.ones(2, 4), torch.ones(4))] and None)
    return {
        "F.conv2d in a forward": ConvBnNet(head=FunctionalConv()).eval(),
        "a user's AvgPool2d subclass": ConvBnNet(MyAvgPool(3, 1, 1)).eval(),
        "a forward hook": hooked.eval(),
        "training-mode branch": ConvBnNet(TrainOnlyPool()).train(),
        "a Linear on a 3-d tensor": ConvBnNet(TokenLinear()).eval(),
    }


@pytest.mark.parametrize("case", sorted(_fallback_cases()))
def test_what_the_graph_cannot_prove_is_counted_by_profile_count(case):
    torch.manual_seed(0)
    model = skew_bn(_fallback_cases()[case])
    x = torch.randn(1, 3, 8, 8)
    counter = GraphCount.of(model, analyze(model, x, strict=False))
    assert counter is None or counter.count(model) is None
    for mode in ("slim", "mask"):
        pruned, report = prune(model, 0.5, mode=mode, example_input=x, compensate=False)
        assert report["before"] == count(model, example_input=x), mode
        assert report["after"] == count(pruned, example_input=x), mode


def test_a_model_in_training_mode_is_counted_from_the_graph_when_no_class_reads_training():
    torch.manual_seed(0)
    model = skew_bn(ConvBnNet(nn.Dropout(0.5))).train()
    x = torch.randn(1, 3, 8, 8)
    counter = GraphCount.of(model, analyze(model, x))
    assert counter is not None and counter.count(model) == count(model, example_input=x)
    assert model.training


def test_removed_blocks_are_counted_by_profile_count():
    """blocks.py rewrites a removed branch's block: its graph is not the analysis's."""
    from test_blocks import CASES, with_dead_branches

    model = with_dead_branches(*CASES["post-activation bottleneck"])
    x = torch.randn(1, 3, 32, 32)
    for mode in ("slim", "mask"):
        pruned, report = prune(model, 0.5, mode=mode, example_input=x)
        assert report["removed_blocks"]
        assert report["before"] == count(model, example_input=x)
        assert report["after"] == count(pruned, example_input=x)
    slim, slim_report = prune(model, 0.5, example_input=x)
    assert report["effective"] == slim_report["after"] == count(slim, example_input=x)


def test_a_masked_models_hook_is_counted_from_the_graph_and_others_are_not():
    torch.manual_seed(0)
    model = skew_bn(ZOO["mobilenet-v2"]()).eval()
    x = torch.randn(1, 3, 32, 32)
    masked, _ = prune(model, 0.5, mode="mask", example_input=x)
    counter = GraphCount.of(masked, analyze(masked, x))
    assert counter is not None and counter.count(masked) == count(masked, example_input=x)


@pytest.mark.parametrize("compensate", [True, False])
@pytest.mark.parametrize("mode", ["slim", "mask"])
def test_the_pruned_model_owns_every_tensor(mode, compensate):
    """compensate=False slices a copy that shares the model's weights (deepcopy memo) until
    own_tensors: the result still shares nothing with the model, which stays untouched."""
    torch.manual_seed(0)
    model = skew_bn(ZOO["resnet18-basic"]()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, _ = prune(model, 0.4, mode=mode, example_input=torch.zeros(1, 3, 32, 32), compensate=compensate)
    with torch.no_grad():
        for t in (*pruned.parameters(), *pruned.buffers()):
            t.add_(1) if t.is_floating_point() else None
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    storages = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    assert not any(t.untyped_storage().data_ptr() in storages for t in (*pruned.parameters(), *pruned.buffers()))


def test_count_params_of_the_callers_modules_counts_a_shared_parameter_once():
    """count_params(model, modules) (prune passes the modules it walked) equals
    count_params(model): a tied weight and a module reached twice count once."""
    from netslim.profile import count_params

    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4, bias=False), shared, shared, nn.BatchNorm1d(4))
    model[1].weight = model[0].weight
    modules = dict(model.named_modules())
    assert count_params(model, modules) == count_params(model) == 20 + 20 + 8
