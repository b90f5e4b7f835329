"""trace's shapes by rule (trace.shapes_by_rule): a graph made only of ops with a shape formula
gets every node's tensor_meta without a forward, exactly as the forward records it; anything
the rules are not sure of leaves the shapes to the forward, which also reports the errors."""
import operator
import random

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from netslim.engine import trace as tracing
from netslim.errors import PruneError
from netslim.models import build_model

from test_prune import randomize_bn


def _forward_metas(gm, x):
    """Every node's (shape, dtype, requires_grad, stride) from torch.fx's ShapeProp (a real forward)."""
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)
    with torch.no_grad():
        ShapeProp(gm).propagate(x)
    return _metas(gm)


def _metas(gm):
    return {n.name: None if n.meta.get("tensor_meta") is None else tuple(n.meta["tensor_meta"][:4])
            for n in gm.graph.nodes}


class Functional(nn.Module):
    """The functional and method forms the rules know (DenseNet's), and a broadcast product."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1), nn.Hardsigmoid())
        self.fc = nn.Linear(16 * 2 * 2, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)), inplace=True)
        y = y * self.gate(y) + 1.0
        y = torch.cat([y, torch.sigmoid(y)], 1)
        y = F.avg_pool2d(y, 2, ceil_mode=True)
        y = F.adaptive_avg_pool2d(y, 2)
        return self.fc(y.flatten(1))


@pytest.mark.parametrize("make, size", [
    (lambda: build_model("mobilenetv2", num_classes=10), 32),
    (lambda: build_model("resnet50", num_classes=10), 32),
    (lambda: build_model("resnet18", num_classes=10), 45),
    (lambda: build_model("densenet", num_classes=10), 32),
    (lambda: build_model("vgg", num_classes=10), 32),
    (Functional, 9),
])
def test_rules_record_what_the_forward_records(make, size):
    """Shape, dtype, requires_grad and stride of every node, the output included, as ShapeProp's."""
    model, x = randomize_bn(make()).eval(), torch.randn(1, 3, size, size)
    gm = tracing.trace(model, x)
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)
    assert tracing.shapes_by_rule(gm, x)
    ours = _metas(gm)
    assert all(meta is not None for meta in ours.values())
    assert ours == _forward_metas(gm, x)


def _rule_vs_forward(module_or_fn, in_shape, is_module=True):
    """(the rules' output shape or None, the forward's output shape or None if it raised)."""
    model = nn.Sequential(module_or_fn) if is_module else _Call(module_or_fn)
    x = torch.randn(*in_shape)
    try:
        with torch.no_grad():
            expected = tuple(model.eval()(x).shape)
    except Exception:
        expected = None
    gm = fx.GraphModule(model, tracing.Tracer(set()).trace(model))
    got = tuple(gm.graph.output_node().meta["tensor_meta"].shape) if tracing.shapes_by_rule(gm, x) else None
    return got, expected


class _Call(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _agrees(got, expected):
    """The rule answers the forward's shape, or steps aside (never a shape where the op refuses)."""
    return got is None or got == expected


def test_pooling_and_conv_shapes_match_the_ops_on_many_arguments():
    """Every answer the rules give equals the op's own output shape, over random kernels,
    strides, paddings, dilations, ceil modes and input sizes (edge cases included: windows in
    the right padding, paddings over half the kernel, outputs of size < 1); and the rules do
    answer most of the valid cases."""
    rng = random.Random(0)
    answered = checked = 0
    for _ in range(400):
        k, s, p, d = rng.randint(1, 5), rng.randint(1, 4), rng.randint(0, 3), rng.randint(1, 3)
        ceil = rng.random() < 0.5
        shape = (1, 2, rng.randint(1, 12), rng.randint(1, 12))
        cases = [(nn.MaxPool2d(k, s, p, d, ceil_mode=ceil), True),
                 (nn.AvgPool2d(k, s, p, ceil_mode=ceil), True),
                 (lambda x, k=k, s=s, p=p, c=ceil: F.avg_pool2d(x, k, s, p, c), False),
                 (nn.Conv2d(2, 3, k, s, p, d), True),
                 (nn.Conv2d(2, 4, (k, 1), (s, 1), (p, 0), (d, 1), groups=2, bias=False), True)]
        for op, is_module in cases:
            got, expected = _rule_vs_forward(op, shape, is_module)
            assert _agrees(got, expected), (op, shape, got, expected)
            checked += expected is not None
            answered += got is not None
    assert answered == checked  # every valid case here has a rule


@pytest.mark.parametrize("op, shape, answered", [
    (nn.Flatten(), (1, 2, 3, 4), True), (nn.Flatten(2, 3), (1, 2, 3, 4), True), (nn.Flatten(0, -2), (1, 2, 3), True),
    (lambda x: torch.flatten(x, 1), (1, 2, 3, 4), True), (lambda x: x.flatten(-3, -2), (1, 2, 3, 4), True),
    (lambda x: torch.flatten(x, 2, 1), (1, 2, 3, 4), False),  # start after end: the op refuses
    (nn.AdaptiveAvgPool2d((3, None)), (1, 2, 5, 6), True), (nn.AdaptiveAvgPool2d(4), (2, 5, 6), True),
    (lambda x: F.adaptive_avg_pool2d(x, (1, 2)), (1, 2, 5, 6), True),
    (nn.Linear(6, 3), (1, 2, 6), True), (nn.Linear(5, 3), (1, 6), False),
    (nn.BatchNorm1d(4), (2, 4), True), (nn.BatchNorm1d(4), (2, 4, 3), True), (nn.BatchNorm2d(4), (1, 3, 2, 2), False),
    (nn.BatchNorm2d(4), (1, 4, 2), False), (nn.Conv1d(2, 3, 3), (1, 2, 5), True),
    (nn.Conv3d(2, 3, 2, padding=1), (1, 2, 3, 3, 3), True), (nn.Conv2d(3, 4, 3), (1, 2, 8, 8), False),
    (nn.Conv2d(2, 4, 5), (1, 2, 3, 3), False), (nn.Conv2d(4, 4, 3, groups=2), (1, 4, 5, 5), True),
    (lambda x: torch.cat([x, x * 2.0], 1), (1, 2, 3), True), (lambda x: torch.cat((x, x), dim=-1), (1, 2, 3), True),
    (lambda x: torch.cat([x, x.transpose(1, 2)], 1), (1, 2, 3), False),  # transpose has no rule
    (lambda x: x + x.mean((2, 3), keepdim=True), (1, 2, 3, 3), False),  # nor mean
    (lambda x: operator.mul(2, x) - 1, (1, 2, 3), True), (lambda x: torch.add(x, 1, alpha=2), (1, 2, 3), False),
    (nn.GELU(approximate="tanh"), (1, 2, 3), True), (nn.ReLU6(), (1, 2), True), (nn.Dropout(), (1, 3), True),
    (lambda x: F.relu(x, inplace=True), (1, 2), True), (lambda x: F.relu(x, True).sigmoid(), (1, 2), True),
])
def test_every_answer_is_the_ops_own(op, shape, answered):
    got, expected = _rule_vs_forward(op, shape, isinstance(op, nn.Module))
    assert _agrees(got, expected), (got, expected)
    assert (got is not None) == answered


def test_the_rules_step_aside_for_anything_they_do_not_model():
    """An op without a rule, a forward hook or a forward set on the module, a parameter of
    another dtype, a channels-last example or one that requires grad, a padding mode or a BN
    the rules do not model: no shapes recorded (the forward records them)."""
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    x = torch.randn(1, 3, 8, 8)
    gm = tracing.trace(conv, x)
    assert tracing.shapes_by_rule(gm, x)

    def refused(model, example):
        gm = fx.GraphModule(model, tracing.Tracer(set()).trace(model))
        ok = tracing.shapes_by_rule(gm, example)
        assert all("tensor_meta" not in n.meta for n in gm.graph.nodes)
        return not ok

    assert refused(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softmax(1)), x)
    hooked = nn.Sequential(nn.Conv2d(3, 4, 3))
    hooked[0].register_forward_hook(lambda m, i, o: o[:, :2])
    assert refused(hooked, x)
    own_forward = nn.Sequential(nn.Conv2d(3, 4, 3))
    own_forward[0].forward = lambda t: t[:, :2]
    assert refused(own_forward, x)
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert refused(nn.Sequential(nn.Conv2d(3, 4, 3)), x)
    finally:
        handle.remove()
    assert refused(nn.Sequential(nn.Conv2d(3, 4, 3)).double(), x)
    assert refused(nn.Sequential(nn.Conv2d(3, 4, 3)), x.to(memory_format=torch.channels_last))
    assert refused(nn.Sequential(nn.Conv2d(3, 4, 3)), x.clone().requires_grad_())
    assert refused(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")), torch.randn(1, 3, 8, 8))
    assert refused(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)), torch.randn(1, 3, 8, 8))
    assert refused(_Call(lambda x: x.view(1, -1)), torch.randn(1, 3, 8, 8))
    assert refused(_StarArgs(), x)


class _StarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, *xs):  # xs: a tuple of the example (not a tensor)
        return self.act(xs)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, y=None):
        return self.conv(x)


def test_a_refused_graph_gets_its_shapes_from_the_forward():
    """trace falls back to the forward when the rules step aside: a second input (with a
    default), an op without a rule; the shapes are ShapeProp's."""
    for model, x in [(_TwoInputs(), torch.randn(1, 3, 8, 8)),
                     (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softmax(1), nn.Flatten()), torch.randn(1, 3, 8, 8))]:
        gm = tracing.trace(model.eval(), x)
        ours = _metas(gm)
        assert ours["output"] is not None
        if isinstance(model, _TwoInputs):
            assert ours["y"] is None
            continue
        assert ours == _forward_metas(gm, x)


def test_a_mismatched_example_is_reported_by_the_forward():
    """Where the op would refuse the example the rules step aside, and the forward says why."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(PruneError, match=r"of shape \(1, 2, 8, 8\) failed \(.*channels.*pass a matching"):
        tracing.trace(model.eval(), torch.randn(1, 2, 8, 8))


class _Mixed(nn.Module):
    """Arguments of every kind fx lowers: keyword arguments (tensors among them), a parameter
    and a buffer read directly, a tensor constant, tuples, None, a submodule called twice, a
    chunk unpacked by count."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))
        self.register_buffer("shift", torch.zeros(1, 8, 1, 1))
        self.const = torch.full((1,), 2.0)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)), inplace=False) * self.scale + self.shift * self.const
        a, b = list(y.chunk(2, 1))
        a = self.block(self.block(a))
        y = torch.cat(tensors=(a, b), dim=1).view(y.size(0), 8, y.size(2), -1)
        return F.interpolate(y, size=None, scale_factor=2.0, mode="nearest").flatten(1).sum(-1, keepdim=True)


@pytest.mark.parametrize("make", [_Mixed, lambda: build_model("mobilenetv2", num_classes=10),
                                  lambda: build_model("densenet", num_classes=10)])
def test_the_tracer_builds_the_graph_fx_builds(make):
    """Our Tracer (its own copies of the module stack and scope, create_arg's shortcuts) makes
    the graph fx.Tracer makes: node names, ops, targets, arguments, every meta entry."""
    class FxTracer(tracing.Tracer):  # our leaves, fx's own bookkeeping
        def __init__(self):
            fx.Tracer.__init__(self)
            self.opaque, self.record_stack_traces = set(), False
        create_arg = fx.Tracer.create_arg

    def described(graph):
        def by_name(a):
            return fx.node.map_arg(a, lambda node: node.name)
        return [(n.name, n.op, n.target, by_name(n.args), by_name(n.kwargs),
                 {k: (type(v), list(v.items()) if isinstance(v, dict) else v) for k, v in n.meta.items()})
                for n in graph.nodes]
    our_tracer, fx_tracer = tracing.Tracer(set()), FxTracer()
    ours, theirs = our_tracer.trace(make()), fx_tracer.trace(make())  # each stores its constants
    assert described(ours) == described(theirs)
    assert our_tracer.node_name_to_scope == fx_tracer.node_name_to_scope
    assert any(len(n.meta.get("nn_module_stack", ())) > 1 for n in ours.nodes)
