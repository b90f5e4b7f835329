"""Products honour broadcasting, and a gate is pruned with the channels it multiplies.

A product is zero wherever one factor is: x * gate (squeeze-excitation), x * x.sigmoid()
(hand-written SiLU) and x * gamma (layer scale, a [C], [C,1,1] or [1,C,1,1] parameter or
buffer) stay prunable; the gate's producer (fc2's output channels and bias) and the
layer scale are sliced with the channels. Slim equals masked in every case.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netslim.engine.prune import prune

from test_prune import randomize_bn


class Stem(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)


class SENet(nn.Module):
    """conv-BN-ReLU -> x * sigmoid(fc2(relu(fc1(pool(x))))) -> conv, with Linear or 1x1-conv FCs."""

    def __init__(self, conv_fc: bool, c=16, r=4):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.conv_fc = conv_fc
        self.fc1 = nn.Conv2d(c, r, 1) if conv_fc else nn.Linear(c, r)
        self.fc2 = nn.Conv2d(r, c, 1) if conv_fc else nn.Linear(r, c)
        self.head = nn.Conv2d(c, 5, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        if self.conv_fc:
            g = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        else:
            n, c = x.shape[:2]
            g = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3)))))).view(n, c, 1, 1)
        return self.head(x * g)


class HandSiLU(nn.Module):
    def __init__(self, order: str, c=16):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.order = order
        self.head = nn.Conv2d(c, 5, 3, padding=1)

    def forward(self, x):
        x = self.bn(self.conv(x))
        x = x * x.sigmoid() if self.order == "method" else torch.sigmoid(x) * x
        return self.head(x)


class LayerScale(nn.Module):
    """x + gamma * BN(conv(relu(BN(conv(x))))) with gamma shaped as `shape` (a parameter or a buffer)."""

    def __init__(self, form: str, c=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.conv1 = nn.Conv2d(c, 24, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.conv2 = nn.Conv2d(24, 24, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.form = form
        gamma = torch.rand(24) + 0.5
        shape = {"c11": (24, 1, 1), "1c11": (1, 24, 1, 1)}.get(form, (24,))
        if form == "buffer":
            self.register_buffer("gamma", gamma.view(24, 1, 1))
        else:
            self.gamma = nn.Parameter(gamma.view(shape))
        self.head = nn.Conv2d(24, 5, 1)

    def scale(self, y):
        if self.form == "view":
            return y * self.gamma.view(1, -1, 1, 1)
        if self.form == "index":
            return self.gamma[:, None, None] * y
        return y * self.gamma

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(self.stem(x))))
        y = self.scale(y)
        return self.head(F.relu(self.bn2(self.conv2(y))))


class GateOfPinnedThing(nn.Module):
    """The gate passes through a channel-mixing GroupNorm: it cannot follow, so x keeps its channels."""

    def __init__(self, c=16):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Conv2d(c, c, 1)
        self.gn = nn.GroupNorm(4, c)
        self.head = nn.Conv2d(c, 5, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        g = torch.sigmoid(self.gn(self.fc(F.adaptive_avg_pool2d(x, 1))))
        return self.head(x * g)


class GateReadElsewhere(nn.Module):
    """The gate is also read by a conv: its values matter, so x keeps its channels."""

    def __init__(self, c=16):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Conv2d(c, c, 1)
        self.side = nn.Conv2d(c, 5, 1)
        self.head = nn.Conv2d(c, 5, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        g = torch.sigmoid(self.fc(F.adaptive_avg_pool2d(x, 1)))
        return self.head(x * g) + self.side(g)


def slim_and_masked(model, percent=0.5):
    model = randomize_bn(model).eval()
    x = torch.randn(2, 3, 8, 8)
    slim, report = prune(model, percent, example_input=x[:1])
    masked, _ = prune(model, percent, mode="mask", example_input=x[:1])
    with torch.no_grad():
        torch.testing.assert_close(slim(x), masked(x), rtol=1e-5, atol=1e-5)
    return model, slim, report


@pytest.mark.parametrize("conv_fc", [True, False], ids=["conv-fc", "linear-fc"])
def test_squeeze_excitation_is_pruned_with_its_gate(conv_fc):
    model, slim, _ = slim_and_masked(SENet(conv_fc))
    kept = slim.bn.num_features
    assert kept < 16
    fc2 = slim.fc2
    assert (fc2.out_channels if conv_fc else fc2.out_features) == kept and fc2.bias.shape == (kept,)
    assert (slim.fc1.in_channels if conv_fc else slim.fc1.in_features) == kept


@pytest.mark.parametrize("order", ["method", "function"])
def test_hand_written_silu_is_prunable(order):
    _, slim, _ = slim_and_masked(HandSiLU(order))
    assert slim.bn.num_features < 16


@pytest.mark.parametrize("form", ["c11", "1c11", "vector-view", "index", "buffer"])
def test_layer_scale_is_sliced_with_the_channels(form):
    form = "view" if form == "vector-view" else form
    _, slim, _ = slim_and_masked(LayerScale(form))
    kept = slim.bn1.num_features
    assert kept < 24 and slim.gamma.numel() == kept
    assert isinstance(slim.gamma, nn.Parameter) == (form != "buffer")


@pytest.mark.parametrize("cls", [GateOfPinnedThing, GateReadElsewhere])
def test_a_gate_that_cannot_follow_keeps_the_channels(cls):
    _, slim, report = slim_and_masked(cls())
    assert slim.bn.num_features == 16 and "bn" in report["unprunable"]


class UnsliceableScale(nn.Module):
    """A per-channel scale computed in forward (not an attribute): an error naming the op."""

    def __init__(self, c=16):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.head = nn.Conv2d(c, 5, 1)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.head(x * torch.arange(16.0).view(16, 1, 1))


def test_a_per_channel_scale_netslim_cannot_slice_is_a_prune_error():
    from netslim.errors import PruneError
    with pytest.raises(PruneError, match="per-channel tensor"):
        prune(randomize_bn(UnsliceableScale()).eval(), 0.5, example_input=torch.zeros(1, 3, 8, 8))
