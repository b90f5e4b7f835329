"""The pruning engine's invariants, over every registered model and hand-written ones."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import netslim.models as M
from netslim.checkpoint import load_checkpoint, save_checkpoint
from netslim.errors import ConfigError, PruneError
from netslim.engine.analysis import analyze
from netslim.layers import is_indexed_bn
from netslim.engine.prune import prune
from netslim.engine.slim import apply_plan
from netslim.profile import count

from test_models import SMALL as _SMALL  # the cheapest configuration of every registered model

# resnet at depth 20 (n=2): at depth 11 the last block has a downsample conv, so the final BN
# is the only reader of its input and owns it; the seed's structure (a gather) needs n >= 2.
SMALL = {**_SMALL, "resnet": dict(depth=20)}

PERCENTS = (0.1, 0.4, 0.6, 0.9, 0.99)


def test_every_registered_model_is_covered():
    assert set(M.list_models()) == set(SMALL)


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def build(arch, in_channels=3):
    return randomize_bn(M.build_model(arch, num_classes=10, in_channels=in_channels, **SMALL[arch])).eval()


def bn_widths(model):
    return {n: m.num_features for n, m in model.named_modules() if isinstance(m, _BatchNorm)}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {arch: build(arch) for arch in SMALL}


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_slim_equals_mask_and_never_empties_a_layer(arch, models, tmp_path):
    model = models[arch]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    before = count(model, example_input=x[:1])
    heavy = arch in ("resnet18", "resnet34", "resnet50", "resnet-imagenet", "mobilenetv2")
    for p in PERCENTS if not heavy else (0.4, 0.99):
        slim, report = prune(model, p, example_input=x[:1])
        masked, mreport = prune(model, p, mode="mask", example_input=x[:1])
        slim.eval(), masked.eval()
        with torch.no_grad():
            ys, ym = slim(x), masked(x)
        torch.testing.assert_close(ys, ym, rtol=1e-4, atol=1e-5)
        assert all(w >= 1 for w in bn_widths(slim).values()), "a layer was emptied"
        removed_bns = {n for block in report["removed_blocks"] for n in block["bns"]}  # gone whole (blocks.py)
        assert all(layer["kept"] >= 1 for layer in report["layers"] if not set(layer["bns"]) <= removed_bns)
        after = count(slim, example_input=x[:1])
        assert after["params"] <= before["params"] and after["flops"] <= before["flops"]
        assert report["after"] == after
        assert mreport["effective"]["params"] == after["params"]
        assert mreport["effective"]["flops"] == after["flops"]
        # mask stores the dense shape (plus any bias compensation gave a conv that had none)
        added = sum(masked.get_submodule(n).bias.numel() for n in mreport["compensation"]["added_biases"])
        assert mreport["after"]["params"] == before["params"] + added
    # the model itself is untouched
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)


@pytest.mark.parametrize("arch", ["vgg", "resnet", "densenet", "resnet-cifar", "mobilenetv2", "mlp"])
def test_save_load_and_prune_again(arch, models, tmp_path):
    model = models[arch]
    x = torch.randn(2, 3, 32, 32)
    slim, _ = prune(model, 0.5, example_input=x[:1])
    arch_meta = {"name": arch, "num_classes": 10, "in_channels": 3, **SMALL[arch]}
    path = tmp_path / "pruned.pt"
    save_checkpoint(path, slim, arch=arch_meta)
    assert torch.load(path, weights_only=True)["mode"] == "slim"
    loaded, meta = load_checkpoint(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), slim.eval()(x), rtol=0, atol=0)
    # prune the pruned model again: plans compose, and the result reloads from its file alone
    randomize_bn(loaded, seed=1)
    again, report = prune(loaded, 0.5, example_input=x[:1])
    assert report["channels_kept"] < report["channels_total"]
    save_checkpoint(tmp_path / "again.pt", again, arch=arch_meta)
    reloaded, _ = load_checkpoint(tmp_path / "again.pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), again.eval()(x), rtol=0, atol=0)
    masked_again, _ = prune(loaded, 0.9, mode="mask", example_input=x[:1])
    save_checkpoint(tmp_path / "mask.pt", masked_again, arch=arch_meta)
    m2, meta2 = load_checkpoint(tmp_path / "mask.pt")
    assert meta2["mode"] == "slim+mask"
    with torch.no_grad():
        torch.testing.assert_close(m2(x), masked_again.eval()(x), rtol=0, atol=0)


def seed_rule(model, percent):
    """The seed's vggprune/resprune/denseprune rule, written out independently."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    total = sum(m.weight.numel() for m in bns)
    allw = torch.zeros(total)
    i = 0
    for m in bns:
        allw[i:i + m.weight.numel()] = m.weight.detach().abs()
        i += m.weight.numel()
    y, _ = torch.sort(allw)
    thre = y[int(total * percent)]
    return [int(m.weight.detach().abs().gt(thre).sum()) for m in bns]


@pytest.mark.parametrize("arch", ["vgg", "resnet", "densenet"])
@pytest.mark.parametrize("percent", [0.2, 0.4, 0.6])
def test_kept_counts_match_the_seed_rule(arch, percent, models):
    model = models[arch]
    slim, report = prune(model, percent, min_channels=1)
    expected = seed_rule(model, percent)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    kept = {layer["name"]: layer["kept"] for layer in report["layers"]}
    for name, want in zip(names, expected):
        if want == 0:  # the seed would crash here; netslim's min_channels guard keeps one
            assert kept[name] == 1 and name in report["guarded"]
        else:
            assert kept[name] == want, name
    widths = bn_widths(slim)
    for name, want in zip(names, expected):
        assert widths[name] == max(want, 1)


def test_seed_structure_of_preact_resnet_and_densenet(models):
    """ResNet prunes inside blocks and gathers what bn1 / the final bn read; DenseNet gathers everywhere."""
    res = models["resnet"]
    an = analyze(res, torch.zeros(1, 3, 32, 32))
    modes = {n: u.bn_mode for n, u in an.modules.items() if u.kind == "bn"}
    assert modes["bn"] == "gather"
    for n, mode in modes.items():
        if n.endswith("bn1"):
            assert mode == "gather", n
        elif n.endswith("bn2") or n.endswith("bn3"):
            assert mode == "owned", n
    slim, _ = prune(res, 0.5)
    for name, m in slim.named_modules():
        if name.endswith(".conv3"):
            orig = res.get_submodule(name)
            assert m.out_channels == orig.out_channels  # the residual stream keeps its width
    dense = models["densenet"]
    an = analyze(dense, torch.zeros(1, 3, 32, 32))
    assert {u.bn_mode for u in an.modules.values() if u.kind == "bn"} == {"gather"}
    slim, _ = prune(dense, 0.5)
    for name, m in slim.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels == dense.get_submodule(name).out_channels  # features keep width
    assert any(is_indexed_bn(m) for m in slim.modules())


def test_percent_zero_prunes_nothing_and_bad_options_fail(models):
    model = models["vgg"]
    same, report = prune(model, 0.0)
    assert report["channels_kept"] == report["channels_total"]
    assert count(same, (3, 32, 32))["params"] == count(model, (3, 32, 32))["params"]
    for bad in (-0.1, 1.0, 1.5, "0.5", float("nan")):
        with pytest.raises(ConfigError):
            prune(model, bad)
    with pytest.raises(ConfigError):
        prune(model, 0.5, min_channels=0)
    with pytest.raises(ConfigError):
        prune(model, 0.5, mode="remove")


def test_guards(models):
    model = models["vgg"]
    _, report = prune(model, 0.9, max_layer_percent=0.5)
    for layer in report["layers"]:
        assert layer["total"] - layer["kept"] <= layer["total"] // 2
    _, report = prune(model, 0.7, round_to=8)
    for layer in report["layers"]:
        assert layer["kept"] % 8 == 0 or layer["kept"] == layer["total"]
    _, report = prune(model, 0.99, min_channels=3)
    assert all(layer["kept"] >= 3 for layer in report["layers"])
    assert report["guarded"]


def test_mask_stays_zero_through_finetuning(models):
    model = models["resnet"]
    masked, _ = prune(model, 0.6, mode="mask")
    masked.train()
    from netslim.sparsity import BNSparsity
    opt = torch.optim.SGD(masked.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sr = BNSparsity(masked, 1e-4)
    zero_before = {n: (m.weight == 0).clone() for n, m in masked.named_modules()
                   if isinstance(m, _BatchNorm) and hasattr(m, "netslim_mask")}
    assert any(z.any() for z in zero_before.values())
    for _ in range(3):
        x = torch.randn(8, 3, 32, 32)
        loss = F.cross_entropy(masked(x), torch.randint(0, 10, (8,)))
        opt.zero_grad()
        loss.backward()
        sr.step()
        opt.step()
    for n, m in masked.named_modules():
        if n in zero_before:
            z = zero_before[n]
            assert torch.all(m.weight[z] == 0) and torch.all(m.bias[z] == 0)
            assert torch.all(m.weight.grad[z] == 0)



def test_slimming_a_masked_model_strips_its_masks(models):
    """slice_in_place strips the masks (buffer and pre-hook) off the modules it walked."""
    from netslim.engine.mask import _hold_masked_factors

    masked, _ = prune(models["resnet"], 0.5, mode="mask")
    assert any("netslim_mask" in m._buffers for m in masked.modules())
    slim, _ = prune(masked, 0.3)
    for name, m in slim.named_modules():
        assert "netslim_mask" not in m._buffers, name
        assert _hold_masked_factors not in m._forward_pre_hooks.values(), name

# --- hand-written models: the cases general pruners get wrong ------------------------------

class PostActBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (self.down(x) if self.down is not None else x))


class PostActNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.b1 = PostActBlock(8, 8, 1)
        self.b2 = PostActBlock(8, 16, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = self.b2(self.b1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, c, expand=4):
        super().__init__()
        h = c * expand
        self.pw = nn.Conv2d(c, h, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(h)
        self.dw = nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False)
        self.bn2 = nn.BatchNorm2d(h)
        self.pj = nn.Conv2d(h, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu6(self.bn1(self.pw(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        return x + self.bn3(self.pj(y))


class BranchNet(nn.Module):
    """Concat of two branches, a depthwise inverted residual, flatten (with spatial size) into Linear."""
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 10, 1), nn.BatchNorm2d(10), nn.ReLU())
        self.mix = nn.Conv2d(16, 8, 1, bias=False)
        self.mix_bn = nn.BatchNorm2d(8)
        self.ir = InvertedResidual(8)
        self.head_bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = torch.cat([self.a(x), self.b(x)], dim=1)
        x = F.relu(self.mix_bn(self.mix(x)))
        x = self.ir(x)
        x = F.max_pool2d(F.relu(self.head_bn(x)), 8)
        return self.fc(x.view(x.size(0), -1))


class InputBNNet(nn.Module):
    """A BN right on the input (no conv before it), functional ops only."""
    def __init__(self):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.conv(F.relu(self.bn0(x)))
        x = torch.relu(self.bn(x)).mean((2, 3))
        return self.fc(x)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(48, 32), nn.BatchNorm1d(32)
        self.fc2, self.bn2 = nn.Linear(32, 16), nn.BatchNorm1d(16)
        self.fc3 = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = F.relu(self.bn1(self.fc1(x)))
        return self.fc3(F.relu(self.bn2(self.fc2(x))))


class ChunkNet(nn.Module):
    """Channel splits: chunk into a branch and a pass-through (ShuffleNet v2's unit, no shuffle),
    a split sized from the tensor, and a hard-coded split that must keep its width."""
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv2 = nn.Conv2d(16, 12, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(6, 10, 1)
        self.bn3 = nn.BatchNorm2d(10)
        self.fc = nn.Linear(4 + 6, 5)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, dim=1)
        x = torch.cat([self.branch(a), b], dim=1)
        x = F.relu(self.bn2(self.conv2(x)))
        p, q = torch.split(x, x.size(1) // 2, dim=1)      # computed from the tensor: follows it
        x = p * q
        y = F.relu(self.bn3(self.conv3(x)))
        u, v = torch.split(y, [4, 6], dim=1)               # hard-coded sizes: keep the width
        return self.fc(torch.cat([u.mean((2, 3)), v.amax((2, 3))], dim=1))


class GroupNet(nn.Module):
    """Grouped convs (ResNeXt's), one with a channel multiplier (groups == in_channels < out)."""
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.gconv = nn.Conv2d(16, 24, 3, padding=1, groups=4, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.pw = nn.Sequential(nn.Conv2d(24, 12, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.mult = nn.Conv2d(12, 24, 3, padding=1, groups=12)
        self.bn2 = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.gconv(self.stem(x))))
        return self.fc(F.relu(self.bn2(self.mult(self.pw(x)))).mean((2, 3)))


HAND = {
    "chunk": (ChunkNet, (3, 8, 8)),
    "groups": (GroupNet, (3, 8, 8)),
    "postact": (PostActNet, (3, 16, 16)),
    "branches": (BranchNet, (3, 32, 32)),
    "inputbn": (InputBNNet, (3, 8, 8)),
    "mlp": (MLP, (3, 4, 4)),
}


@pytest.mark.parametrize("name", sorted(HAND))
@pytest.mark.parametrize("percent", [0.3, 0.7, 0.95])
def test_hand_written_models(name, percent, tmp_path):
    cls, shape = HAND[name]
    torch.manual_seed(1)
    model = randomize_bn(cls(), seed=2).eval()
    x = torch.randn(4, *shape)
    slim, report = prune(model, percent, example_input=x[:1])
    masked, _ = prune(model, percent, mode="mask", example_input=x[:1])
    with torch.no_grad():
        torch.testing.assert_close(slim.eval()(x), masked.eval()(x), rtol=1e-4, atol=1e-5)
    assert all(w >= 1 for w in bn_widths(slim).values())
    assert count(slim, example_input=x[:1])["params"] <= count(model, example_input=x[:1])["params"]
    # reload with a fresh instance of the user's class: the plan rebuilds the structure
    save_checkpoint(tmp_path / "p.pt", slim)
    loaded, _ = load_checkpoint(tmp_path / "p.pt", model=cls())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), slim(x), rtol=0, atol=0)


def test_post_activation_residual_is_one_coupled_group():
    model = randomize_bn(PostActNet()).eval()
    an = analyze(model, torch.zeros(1, 3, 16, 16))
    layers = an.coupled_layers()
    # stage 1 stream: stem bn + b1.bn2; stage 2 stream: b2.bn2 + the downsample BN
    assert ("bn", "b1.bn2") in layers
    assert ("b2.bn2", "b2.down.1") in layers or ("b2.down.1", "b2.bn2") in layers
    for score in ("max", "mean", "sum"):
        slim, report = prune(model, 0.5, group_score=score, example_input=torch.zeros(1, 3, 16, 16))
        assert slim.b1.conv2.out_channels == slim.bn.num_features  # never half-pruned
    slim, report = prune(model, 0.5, skip_coupled=True, example_input=torch.zeros(1, 3, 16, 16))
    assert slim.bn.num_features == 8 and slim.b2.bn2.num_features == 16
    assert "b1.bn2" in report["unprunable"]


class SharedBNNet(nn.Module):
    """One BatchNorm called at two places (weights shared), then a BN of its own."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1) for i in range(3))
        self.bn, self.bn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.bn(self.c1(x)).relu()
        x = self.bn(self.c2(x)).relu()
        x = self.bn2(self.c3(x)).relu()
        return self.fc(x.mean((2, 3)))


def test_a_batchnorm_called_twice_keeps_its_width_and_the_rest_prunes():
    # bn is in the analysis' BN list with no unit: the flat per-channel tables count it anyway
    model = randomize_bn(SharedBNNet(), seed=1).eval()
    x = torch.randn(2, 3, 8, 8)
    slim, report = prune(model, 0.4, example_input=x[:1])
    masked, _ = prune(model, 0.4, mode="mask", example_input=x[:1])
    assert slim.bn.num_features == 8 and slim.bn2.num_features < 8
    assert report["channels_total"] == 16 and report["channels_kept"] == 8 + slim.bn2.num_features
    assert torch.allclose(slim(x), masked(x), atol=1e-5)


def test_channel_splits():
    model = randomize_bn(ChunkNet(), seed=3).eval()
    x = torch.randn(2, 3, 8, 8)
    slim, report = prune(model, 0.5, example_input=x[:1])
    # chunk(2): both halves keep the same count, so the slim model's own chunk cuts right
    assert slim.stem[1].num_features % 2 == 0 and slim.stem[1].num_features < 16
    assert slim.branch[0].in_channels == slim.stem[1].num_features // 2
    assert slim.bn2.num_features % 2 == 0 and slim.bn2.num_features < 12
    assert slim.bn3.num_features == 10  # split into [4, 6] written in the code
    assert "unequal parts [4, 6]" in report["unprunable"]["bn3"]


def test_grouped_convs_keep_their_groups_and_prune_within_them():
    model = randomize_bn(GroupNet(), seed=5).eval()
    x = torch.randn(2, 3, 8, 8)
    # group score mean: a class ties a channel of every group, and their max is rarely small
    slim, report = prune(model, 0.5, group_score="mean", example_input=x[:1])
    g = slim.gconv
    assert g.groups == 4 and g.in_channels % 4 == 0 and g.out_channels % 4 == 0
    assert g.in_channels < 16 and g.out_channels < 24  # pruned inside the groups
    assert slim.stem[1].num_features == g.in_channels and slim.bn1.num_features == g.out_channels
    # one input channel per group: pruning one would change `groups`, so all are tied
    assert slim.mult.groups == 12 and slim.mult.in_channels == 12 and slim.pw[1].num_features == 12
    assert slim.mult.out_channels % 12 == 0
    with torch.no_grad():
        masked, _ = prune(model, 0.5, mode="mask", group_score="mean", example_input=x[:1])
        torch.testing.assert_close(slim(x), masked(x), rtol=1e-4, atol=1e-5)


def test_input_bn_gathers():
    model = randomize_bn(InputBNNet()).eval()
    slim, _ = prune(model, 0.5, example_input=torch.zeros(1, 3, 8, 8))
    assert slim.conv.in_channels <= 3
    assert is_indexed_bn(slim.bn0) or slim.bn0.num_features == 3


class UnknownOpNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.roll(x, 1, dims=1)  # channel mixing netslim cannot slice
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class HardCodedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.view(-1, 128))


class ControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.bn(self.conv(x))
        if x.sum() > 0:
            x = x * 2
        return x.mean((2, 3))


def test_unknown_op_is_an_error_with_a_way_out():
    model = randomize_bn(UnknownOpNet()).eval()
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(PruneError, match=r"roll.*exclude"):
        prune(model, 0.5, example_input=x)
    slim, report = prune(model, 0.5, example_input=x, exclude=["bn"])
    assert slim.bn.num_features == 8 and slim.bn2.num_features < 8
    assert report["unprunable"]["bn"] == "excluded"


def test_hard_coded_view_and_control_flow_errors():
    with pytest.raises(PruneError, match=r"hard-coded size.*flatten"):
        prune(randomize_bn(HardCodedView()).eval(), 0.5, example_input=torch.zeros(1, 3, 4, 4))
    with pytest.raises(PruneError, match="cannot trace"):
        prune(ControlFlow().eval(), 0.5, example_input=torch.zeros(1, 3, 4, 4))
    with pytest.raises(PruneError, match="names no module"):
        prune(randomize_bn(UnknownOpNet()).eval(), 0.5, example_input=torch.zeros(1, 3, 8, 8), exclude=["nope"])


def test_apply_plan_rejects_inconsistent_plans():
    model = randomize_bn(PostActNet()).eval()
    x = torch.zeros(1, 3, 16, 16)
    with pytest.raises(PruneError, match="coupled"):
        apply_plan(model, {"bn": [0, 1, 2]}, x)  # half of a coupled group
    with pytest.raises(PruneError, match="not a BatchNorm"):
        apply_plan(model, {"conv": [0]}, x)


def test_the_analysis_converts_each_slot_list_once_to_a_read_only_array():
    """slot_array memoises the analysis's lists as index arrays (the steps after it read the
    same lists many times): the same list gives the same array, which nobody can write, and
    a list that is only equal, or one made after another was freed, gets its own."""
    from zoo import ZOO
    model = ZOO["resnet18-basic"]().eval()
    analysis = analyze(model, torch.randn(1, 3, 32, 32))
    for use in analysis.modules.values():
        array = analysis.slot_array(use.in_slots)
        assert array.tolist() == use.in_slots and analysis.slot_array(use.in_slots) is array
        with pytest.raises(ValueError, match="read-only"):
            array[:1] = -1
        assert analysis.slot_array(list(use.in_slots)) is not array
    for i in range(200):  # temporaries: a freed list's id is reused at once, its array must not be
        assert analysis.slot_array([i, i + 1]).tolist() == [i, i + 1]
