"""Whole residual branches removed when every BN factor in them is under the threshold
(blocks.py): pre- and post-activation ResNets, MobileNetV2's inverted residuals, a plain
`x + f(x)` in the model's own forward, torchvision's `out += identity`."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import netslim
from netslim import cli
from netslim.checkpoint import load_checkpoint, save_checkpoint
from netslim.errors import PruneError
from netslim.engine.prune import prune
from netslim.engine.slim import apply_plan
from zoo import ZOO
from zoo.classic import conv_bn_relu, pool_linear

from test_zoo import assert_same, bn_channels, skew_bn


class TorchvisionBasicBlock(nn.Module):
    """torchvision's BasicBlock: one shared ReLU module, `out += identity`."""

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TorchvisionResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.layer1 = nn.Sequential(TorchvisionBasicBlock(8, 8), TorchvisionBasicBlock(8, 8))
        self.layer2 = nn.Sequential(TorchvisionBasicBlock(8, 16, 2), TorchvisionBasicBlock(16, 16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return pool_linear(self.layer2(self.layer1(self.stem(x))), self.fc)


class AddInForward(nn.Module):
    """`x + f(x)` written in the model's own forward, no block module around it."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.f = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                               nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.g = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.f(x))
        x = F.relu(self.g(x) + x)
        return pool_linear(x, self.fc)


class PreActBiasBlock(nn.Module):
    """A pre-activation block whose last conv has a bias: with its BNs masked it outputs the
    bias, not 0, so it must stay."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=True)

    def forward(self, x):
        return x + self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))


class PreActBiasNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(PreActBiasBlock(), PreActBiasBlock())
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return pool_linear(F.relu(self.bn(self.blocks(self.stem(x)))), self.fc)


def seed_preresnet():
    return netslim.build_model("resnet", depth=11, num_classes=10, in_channels=3)


# (factory, the branches whose factors are made tiny: {block: branch modules with weights})
CASES = {
    "seed preresnet (pre-activation)": (seed_preresnet, {
        "layer2.0": ["layer2.0.bn1", "layer2.0.conv1", "layer2.0.bn2", "layer2.0.conv2", "layer2.0.bn3",
                     "layer2.0.conv3"]}),
    "post-activation bottleneck": (ZOO["resnet-bottleneck"], {
        "layers.1": ["layers.1.conv1", "layers.1.bn1", "layers.1.conv2", "layers.1.bn2", "layers.1.conv3",
                     "layers.1.bn3"]}),
    "torchvision basic block, out += identity": (TorchvisionResNet, {
        "layer1.1": ["layer1.1.conv1", "layer1.1.bn1", "layer1.1.conv2", "layer1.1.bn2"],
        "layer2.0": ["layer2.0.conv1", "layer2.0.bn1", "layer2.0.conv2", "layer2.0.bn2"]}),
    "mobilenet-v2 inverted residual": (ZOO["mobilenet-v2"], {
        "features.5": [f"features.5.conv.{i}" for i in (0, 1, 3, 4, 6, 7)]}),
    "x + f(x) in the model's forward": (AddInForward, {"": [f"f.{i}" for i in (0, 1, 3, 4)]}),
}


def with_dead_branches(factory, dead: dict[str, list[str]]) -> nn.Module:
    torch.manual_seed(0)
    model = skew_bn(factory()).eval()
    mods = dict(model.named_modules())
    with torch.no_grad():
        for modules in dead.values():
            for name in modules:
                if isinstance(mods[name], _BatchNorm):
                    mods[name].weight.mul_(1e-4)  # far under any threshold, betas unchanged
    return model


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("case", sorted(CASES))
def test_dead_branches_are_removed_whole(case, tmp_path):
    factory, dead = CASES[case]
    model = with_dead_branches(factory, dead)
    x = torch.randn(2, 3, 32, 32)
    slim, report = prune(model, 0.5, example_input=x[:1])
    masked, masked_report = prune(model, 0.5, mode="mask", example_input=x[:1])
    assert sorted(b["block"] for b in report["removed_blocks"]) == sorted(dead)
    assert masked_report["removed_blocks"] == report["removed_blocks"]
    for b in report["removed_blocks"]:
        assert sorted(b["modules"]) == sorted(dead[b["block"]])
    assert_same(outputs(slim, x), outputs(masked, x), rtol=1e-4, atol=1e-5)
    left = dict(slim.named_modules())
    assert not [m for modules in dead.values() for m in modules if m in left], "the branch's modules stay"
    assert report["channels_total"] - report["channels_kept"] == bn_channels(model) - bn_channels(slim)
    # what keeping min_channels per layer (the flag off) costs instead
    kept, kept_report = prune(model, 0.5, example_input=x[:1], remove_blocks=False)
    assert kept_report["removed_blocks"] == [] and kept_report["remove_blocks"] is False
    dead_bns = {m for modules in dead.values() for m in modules if isinstance(model.get_submodule(m), _BatchNorm)}
    dead_layers = [layer for layer in kept_report["layers"] if set(layer["bns"]) <= dead_bns]
    assert dead_layers and all(layer["kept"] == 1 and layer["guard"] == "min_channels" for layer in dead_layers)
    assert all(n in dict(kept.named_modules()) for n in dead_bns)
    assert report["after"]["params"] < kept_report["after"]["params"]
    assert report["after"]["flops"] < kept_report["after"]["flops"]
    assert report["effective"] == masked_report["effective"] == report["after"]
    # save -> load into a fresh dense instance -> the same outputs; pruning it again works
    save_checkpoint(tmp_path / "slim.pt", slim)
    loaded, meta = load_checkpoint(tmp_path / "slim.pt", model=factory())
    assert all(meta["plan"][n] == [] for n in dead_bns)
    assert_same(outputs(loaded, x), outputs(slim, x), rtol=0, atol=0)
    again, _ = prune(skew_bn(loaded, seed=1), 0.5, example_input=x[:1])
    again_masked, _ = prune(loaded, 0.5, mode="mask", example_input=x[:1])
    assert_same(outputs(again, x), outputs(again_masked, x), rtol=1e-4, atol=1e-5)
    # a masked model's removed branch stays removed when it is pruned to slim later
    from_mask, from_mask_report = prune(masked, 0.0, example_input=x[:1])
    assert sorted(b["block"] for b in from_mask_report["removed_blocks"]) == sorted(dead)
    assert_same(outputs(from_mask, x), outputs(masked, x), rtol=1e-4, atol=1e-5)


def test_seed_rule_without_compensation_is_one_flag_away():
    factory, dead = CASES["seed preresnet (pre-activation)"]
    model = with_dead_branches(factory, dead)
    plain, report = prune(model, 0.5, compensate=False, remove_blocks=False)
    assert report["removed_blocks"] == [] and report["compensation"] is None
    # every layer keeps the channels above the seed's threshold, at least one
    for layer in report["layers"]:
        bn = model.get_submodule(layer["name"])
        assert layer["kept"] == max(int((bn.weight.abs() > report["threshold"]).sum()), 1)


def test_a_branch_ending_in_a_biased_conv_stays():
    """Masking its BNs leaves conv2's bias: removing it would change the output."""
    torch.manual_seed(0)
    model = skew_bn(PreActBiasNet()).eval()
    with torch.no_grad():
        for name in ("blocks.1.bn1", "blocks.1.bn2"):
            model.get_submodule(name).weight.mul_(1e-4)
    x = torch.randn(2, 3, 32, 32)
    slim, report = prune(model, 0.5, example_input=x[:1])
    masked, _ = prune(model, 0.5, mode="mask", example_input=x[:1])
    assert report["removed_blocks"] == []
    assert {"blocks.1.bn1", "blocks.1.bn2"} <= set(report["guarded"])
    assert_same(outputs(slim, x), outputs(masked, x), rtol=1e-4, atol=1e-5)


def test_a_plan_emptying_a_layer_outside_a_branch_is_refused():
    torch.manual_seed(0)
    model = ZOO["vgg11"]().eval()
    with pytest.raises(PruneError, match="not a whole residual branch"):
        apply_plan(model, {"features.1": []}, torch.zeros(1, 3, 32, 32))


def test_budget_search_counts_removed_blocks():
    factory, dead = CASES["post-activation bottleneck"]
    model = with_dead_branches(factory, dead)
    x = torch.zeros(1, 3, 32, 32)
    slim, report = prune(model, target_flops=0.5, example_input=x)
    assert [b["block"] for b in report["removed_blocks"]] == ["layers.1"]
    assert report["after"]["flops"] <= 0.5 * report["before"]["flops"]
    assert report["after"] == netslim.count(slim, (3, 32, 32))


def test_cli_prints_the_removed_blocks(tmp_path, capsys):
    factory, dead = CASES["seed preresnet (pre-activation)"]
    model = with_dead_branches(factory, dead)
    ckpt = tmp_path / "sparse.pt"
    save_checkpoint(ckpt, model, arch={"name": "resnet", "depth": 11, "num_classes": 10, "in_channels": 3},
                    input_size=[3, 32, 32])
    assert cli.main(["prune", "--checkpoint", str(ckpt), "--percent", "0.5", "--no-eval",
                     "--save", str(tmp_path / "p")]) == 0
    printed = capsys.readouterr().out
    assert "removed block layer2.0: its branch layer2.0.bn1, layer2.0.conv1" in printed
    assert "the removed blocks' channels are dropped, not folded" in printed
    assert cli.main(["prune", "--checkpoint", str(ckpt), "--percent", "0.5", "--no-eval", "--no-remove-blocks",
                     "--save", str(tmp_path / "q")]) == 0
    assert "removed block" not in capsys.readouterr().out


def test_bench_blocks_smoke(tmp_path):
    """benchmarks/bench_blocks.py runs, and block removal drops layers at about the same MACs."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_blocks.py"
    out = tmp_path / "blocks.json"
    done = subprocess.run([sys.executable, str(script), "--models", "resnet-cifar-56", "--batch", "1",
                           "--runtimes", "eager", "--rounds", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    row, = json.loads(out.read_text())
    dense, kept, removed = row["conv_layers"]
    assert row["removed_blocks"] == row["silenced"] > 0
    assert dense == kept > removed
    assert row["macs"][2] <= row["macs"][1] < row["macs"][0] and all(ms > 0 for ms in row["ms"])


class _Three(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(3, 6), conv_bn_relu(6, 4), conv_bn_relu(4, 5))
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return pool_linear(self.body(x), self.head)


@pytest.mark.parametrize("small", [0, 1, 2])
@pytest.mark.parametrize("half", [False, True], ids=["joined", "bn-by-bn"])
def test_any_dead_bn_is_the_per_bn_rule(half, small):
    """BlockRemoval._any_dead_bn (all factors joined; BN by BN where dtypes differ) says
    what `every |factor| <= threshold, masked channels aside` says of some BN (`small`: the
    one with the smallest factors)."""
    from netslim.engine.analysis import analyze
    from netslim.engine.blocks import BlockRemoval

    torch.manual_seed(0)
    model = _Three().eval()
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    with torch.no_grad():
        for k, bn in enumerate(bns):
            bn.weight.copy_(torch.rand(bn.num_features) * (0.05 if k == small else 1) + (0.01 if k == small else 0.3))
    analysis = analyze(model, torch.randn(1, 3, 16, 16))
    if half:  # after the analysis, whose forward it would break
        bns[2].half()
    factors = bns[small].weight.detach().float().abs().sort().values
    masked = {analysis.bn_names[small]: [int(bns[small].weight.float().argmax())]}  # a mask took the largest
    for masked_out, threshold, dead in [({}, float(factors[-1]) - 1e-3, False), ({}, float(factors[-1]), True),
                                        (masked, float(factors[-2]) - 1e-3, False), (masked, float(factors[-2]), True),
                                        ({}, 0.0, False)]:
        removal = BlockRemoval(model, analysis, torch.randn(1, 3, 16, 16), masked_out=masked_out)
        assert removal._any_dead_bn(threshold) is dead, (masked_out, threshold)
