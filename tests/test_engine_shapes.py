"""Channel shuffles, channel slicing and untraceable submodules: pruned around, never refused.

Each case used to stop the whole model (issue 13 item 1); slim equals masked in all.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netslim.errors import PruneError
from netslim.engine.prune import prune

from test_prune import randomize_bn


def shuffle(x, groups, how):
    b, c, h, w = x.shape
    if how == "transpose":  # torchvision's ShuffleNetV2
        x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
        return x.view(b, -1, h, w)
    return x.view(b, groups, -1, h, w).permute(0, 2, 1, 3, 4).reshape(b, c, h, w)


class ShuffleNet(nn.Module):
    def __init__(self, how, groups=3):
        super().__init__()
        self.how, self.groups = how, groups
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)  # ShuffleNet: shuffle, then depthwise
        self.bn2 = nn.BatchNorm2d(12)
        self.head = nn.Conv2d(12, 5, 3, padding=1)

    def forward(self, x):
        x = shuffle(F.relu(self.bn1(self.conv1(x))), self.groups, self.how)
        return self.head(self.bn2(self.dw(x)))


class DualPath(nn.Module):
    """DPN-style: x[:, :d] and x[:, d:] with d written in the code."""

    def __init__(self, d=8):
        super().__init__()
        self.d = d
        self.conv = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(3, 10, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(10)
        self.head = nn.Conv2d(12 + 10, 5, 1)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        z = F.relu(self.bn2(self.conv2(x)))
        return self.head(torch.cat([y[:, :self.d] + 0 * y[:, self.d:].mean(1, keepdim=True), y[:, self.d:], z], 1))


class Untraceable(nn.Module):
    """int(x.size(1) * ratio) inside: torch.fx cannot trace this module."""

    def __init__(self, c=12, ratio=0.5):
        super().__init__()
        self.ratio = ratio
        self.conv = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        k = int(x.size(1) * self.ratio)
        if k > 0:
            x = torch.cat([x[:, :k], self.bn(self.conv(x))[:, k:]], 1)
        return x


class AroundUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.block = Untraceable()
        self.conv2 = nn.Conv2d(12, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        x = self.block(F.relu(self.bn1(self.conv1(x))))
        return self.conv3(F.relu(self.bn2(self.conv2(x))))


def slim_and_masked(model, percent=0.5, **kw):
    model = randomize_bn(model).eval()
    x = torch.randn(2, 3, 8, 8)
    slim, report = prune(model, percent, example_input=x[:1], **kw)
    masked, _ = prune(model, percent, mode="mask", example_input=x[:1], **kw)
    with torch.no_grad():
        torch.testing.assert_close(slim(x), masked(x), rtol=1e-5, atol=1e-5)
    return slim, report


@pytest.mark.parametrize("how", ["transpose", "permute"])
@pytest.mark.parametrize("percent", [0.5, 0.8])
def test_channel_shuffle_is_pruned_and_stays_correct(how, percent):
    slim, _ = slim_and_masked(ShuffleNet(how), percent, group_score="mean")
    kept = slim.bn1.num_features
    assert kept < 12 and kept % 3 == 0  # each group keeps the same positions
    assert slim.dw.in_channels == kept == slim.bn2.num_features


def test_channel_slicing_keeps_those_channels_and_prunes_the_rest():
    slim, report = slim_and_masked(DualPath())
    assert slim.bn.num_features == 12 and "indexes the channels" in report["unprunable"]["bn"]
    assert slim.bn2.num_features < 10


def test_untraceable_submodule_is_kept_and_the_rest_is_pruned():
    slim, report = slim_and_masked(AroundUntraceable())
    assert "block" in report["untraceable"]
    assert slim.bn1.num_features == 12  # feeds the opaque module: keeps its width
    assert "block.bn" in report["unprunable"] and slim.block.bn.num_features == 12
    assert slim.bn2.num_features < 16


class NeedsData(nn.Module):
    """Reads a value of its input (int() of a tensor): neither torch.fx nor the meta device
    can run it."""

    def forward(self, x):
        return x * int(x.abs().amax() >= 0)


class AroundNeedsData(AroundUntraceable):
    def __init__(self):
        super().__init__()
        self.block = NeedsData()


def test_shapes_come_from_meta_on_large_inputs_and_from_a_real_forward_where_meta_cannot_run():
    """Above 3x96x96 the trace takes its shapes from a pass on the meta device; a model that
    needs data there falls back to the real forward, with the same shapes and the same plan."""
    from torch.fx.passes.shape_prop import ShapeProp
    from netslim.engine import trace as tracing

    x = torch.randn(1, 3, 100, 100)
    for model, on_meta in ((AroundUntraceable(), True), (AroundNeedsData(), False)):
        model = randomize_bn(model).eval()
        gm = tracing.trace(model, x)
        shapes = [tracing.node_shape(n) for n in gm.graph.nodes]
        assert tracing._propagate_on_meta(gm, x) is on_meta
        with torch.no_grad():
            ShapeProp(gm).propagate(x)
        assert shapes == [tracing.node_shape(n) for n in gm.graph.nodes] and shapes[-1] == (1, 5, 100, 100)
        slim, report = prune(model, 0.5, example_input=x)
        masked, _ = prune(model, 0.5, mode="mask", example_input=x)
        with torch.no_grad():
            torch.testing.assert_close(slim(x), masked(x), rtol=1e-5, atol=1e-5)
        assert "block" in report["untraceable"] and slim.bn2.num_features < 16



def _conv_bn_pair(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())


def test_wide_convs_take_their_shapes_from_meta_even_at_a_small_input(monkeypatch):
    """Below 3x96x96 the real forward is used unless the convs' arithmetic outweighs the meta
    pass's per-node cost (wide convs, few nodes): the same shapes either way, and the traced
    module still runs (its code is written when first called)."""
    from torch.fx.passes.shape_prop import ShapeProp
    from netslim.engine import trace as tracing

    on_meta = []
    real_pass = tracing._propagate_on_meta
    monkeypatch.setattr(tracing, "shapes_by_rule", lambda *args: False)  # the choice for a graph without rules
    monkeypatch.setattr(tracing, "_propagate_on_meta", lambda gm, x: on_meta.append(True) or real_pass(gm, x))
    x = torch.randn(1, 3, 32, 32)
    for width, meta_expected in ((256, True), (8, False)):
        model = randomize_bn(_conv_bn_pair(width)).eval()
        on_meta.clear()
        gm = tracing.trace(model, x)
        assert bool(on_meta) is meta_expected
        shapes = [tracing.node_shape(n) for n in gm.graph.nodes]
        with torch.no_grad():
            ShapeProp(gm).propagate(x)
            assert shapes == [tracing.node_shape(n) for n in gm.graph.nodes] and shapes[-1] == (1, width, 32, 32)
            torch.testing.assert_close(gm(x), model(x))

class TwoBlockers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        x = torch.roll(F.relu(self.bn(self.conv(x))), 1, dims=1)
        x = torch.flip(F.relu(self.bn2(self.conv2(x))), dims=[1])
        return x.mean((2, 3))


def test_an_error_lists_every_blocking_place_with_its_source_line():
    with pytest.raises(PruneError) as e:
        prune(randomize_bn(TwoBlockers()).eval(), 0.5, example_input=torch.zeros(1, 3, 8, 8))
    msg = str(e.value)
    assert "2 op(s)" in msg and "roll" in msg and "flip" in msg
    assert "test_engine_shapes.py:" in msg and "torch.roll(" in msg
    assert "exclude=['bn', 'bn2']" in msg and "\n" not in msg


class ManyOutputs(nn.Module):
    """Nodes that return several tensors, a parameter read as a tensor, a default argument, and a
    tuple as the model's output: every structure the shape pass records."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))

    def forward(self, x, shift: float = 0.0):
        a, b = F.relu(self.bn(self.conv(x))).chunk(2, 1)
        parts = torch.split(a * self.scale + shift, [1, 3], 1)
        return parts[1], b.mean((2, 3)), x.size(1)


def _recorded(gm):
    """Every node's tensor_meta, with each TensorMetadata as its shape."""
    def shapes(meta):
        if meta is None or hasattr(meta, "shape"):
            return None if meta is None else tuple(meta.shape)
        return type(meta).__name__, [shapes(m) if m is None or hasattr(m, "shape") or isinstance(m, (tuple, list))
                                     else m for m in meta]
    return [(n.name, shapes(n.meta.get("tensor_meta"))) for n in gm.graph.nodes]


@pytest.mark.parametrize("size", [8, 100])  # the real forward; the meta pass
def test_the_shape_pass_records_what_shapeprop_records(size):
    """trace's own shape pass (record_shapes) leaves the same tensor_meta as torch.fx's ShapeProp on
    every node, the output included: single tensors, several outputs, sizes (no entry)."""
    from torch.fx.passes.shape_prop import ShapeProp
    from netslim.engine import trace as tracing

    model, x = randomize_bn(ManyOutputs()).eval(), torch.randn(1, 3, size, size)
    gm = tracing.trace(model, x)
    ours = _recorded(gm)
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)
    with torch.no_grad():
        ShapeProp(gm).propagate(x)
    assert ours == _recorded(gm)
    assert dict(ours)["output"] == ("tuple", [(1, 3, size, size), (1, 4), 3])
    assert dict(ours)["split"][0] == "tuple" and dict(ours)["size"] is None


def test_the_shape_pass_frees_each_value_after_its_last_reader():
    """Like fx.Interpreter, record_shapes drops a value once no later node reads it: each node
    that has readers is let go exactly once, by the last of them."""
    from netslim.engine import trace as tracing

    gm = tracing.trace(ManyOutputs().eval(), torch.randn(1, 3, 8, 8))
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    freed = {}
    for node, done_with in tracing._steps(gm.graph):
        for gone in done_with:
            assert gone not in freed
            freed[gone] = node
    assert freed == {n: max(n.users, key=order.get) for n in gm.graph.nodes if n.users}


def test_a_model_that_fails_on_the_example_names_the_failing_op():
    """The error is the op's own (ShapeProp wrapped it as 'ShapeProp error for: node=...')."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(10, 2))
    with pytest.raises(PruneError, match=r"of shape \(1, 3, 8, 8\) failed \(mat1 and mat2 shapes cannot be "
                                         r"multiplied.*pass a matching example_input"):
        prune(model.eval(), 0.5, example_input=torch.randn(1, 3, 8, 8))
