"""Tests for netslim.models: registry, pinned sizes, seed compatibility, fx tracing."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from netslim.errors import ConfigError
from netslim.models import build_model, check_depth, list_models, model_info

# The cheapest configuration of every registered model; a new model must add itself here.
SMALL: dict[str, dict] = {
    "vgg": dict(depth=11, width=0.25),
    "resnet": dict(depth=11),
    "densenet": dict(depth=10),
    "resnet-cifar": dict(depth=8),
    "resnet-imagenet": dict(depth=18),
    "resnet18": {},
    "resnet34": {},
    "resnet50": {},
    "mobilenetv2": dict(width_mult=0.25),
    "mlp": dict(hidden=(20, 10)),
}

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@functools.lru_cache(maxsize=None)
def small_model(arch: str, in_channels: int = 3) -> nn.Module:
    """SMALL[arch] with 7 classes in eval mode, built once per session (tests must not change it)."""
    torch.manual_seed(0)
    return build_model(arch, num_classes=7, in_channels=in_channels, **SMALL[arch]).eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_params(*args, **kwargs) -> int:
    """Parameter count without allocating or initialising weights."""
    with torch.device("meta"):
        return n_params(build_model(*args, **kwargs))


def bn(prefix: str) -> list[str]:
    return [f"{prefix}.{k}" for k in BN_KEYS]


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def test_registry_lists_every_family():
    assert sorted(list_models()) == sorted(SMALL)


# --- pinned sizes -----------------------------------------------------------------------

@pytest.mark.parametrize("arch,depth,classes,options,expected", [
    # Network Slimming's models (REFERENCE.md; seed README / paper figures)
    ("vgg", 13, 10, {}, 9_413_066),
    ("vgg", 19, 10, {}, 20_035_018),
    ("vgg", 19, 100, {}, 20_081_188),
    ("resnet", 164, 10, {}, 1_703_258),
    ("resnet", 164, 100, {}, 1_726_388),
    ("densenet", 40, 10, {}, 1_059_298),
    ("densenet", 40, 100, {}, 1_100_428),
    # torchvision's ImageNet models (1000 classes)
    ("resnet18", None, 1000, {}, 11_689_512),
    ("resnet34", None, 1000, {}, 21_797_672),
    ("resnet50", None, 1000, {}, 25_557_032),
    ("resnet-imagenet", 50, 1000, {}, 25_557_032),
    ("mobilenetv2", None, 1000, dict(small_input=False), 3_504_872),
    ("mobilenetv2", None, 1000, dict(small_input=True), 3_504_872),  # strides hold no weights
    # post-activation CIFAR ResNets with 1x1 conv + BN shortcuts (option B)
    ("resnet-cifar", 20, 10, {}, 272_474),
    ("resnet-cifar", 56, 10, {}, 855_770),
    # the paper's MNIST MLP, 784-500-300-10 (BN after each hidden layer, no hidden bias)
    ("mlp", None, 10, dict(image_size=28), 546_610),
])
def test_pinned_parameter_counts(arch, depth, classes, options, expected):
    in_channels = 1 if arch == "mlp" else 3
    assert meta_params(arch, depth, num_classes=classes, in_channels=in_channels, **options) == expected


def test_defaults_are_the_papers_depths():
    assert {a: model_info(a)["default_depth"] for a in ("vgg", "resnet", "densenet", "resnet-cifar")} == \
        {"vgg": 19, "resnet": 164, "densenet": 40, "resnet-cifar": 56}
    assert meta_params("resnet") == 1_703_258


# --- every registered model --------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(SMALL))
@pytest.mark.parametrize("in_channels", [1, 3])
def test_forward_shape(arch, in_channels):
    model = small_model(arch, in_channels)
    with torch.no_grad():
        y = model(torch.randn(2, in_channels, 32, 32))
    assert y.shape == (2, 7)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_fx_trace_matches_eager(arch):
    model = small_model(arch)
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_seed_initialisation(arch):
    model = small_model(arch)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert bns, "every netslim model has BN layers to prune"
    for m in bns:
        assert torch.all(m.weight == 0.5) and torch.all(m.bias == 0)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            assert torch.all(m.bias == 0)


def test_conv_init_is_he_fan_out():
    model = build_model("vgg", 11)
    conv = model.feature[25]                     # 512 -> 512, 3x3: 2.4M samples
    assert isinstance(conv, nn.Conv2d)
    expected = math.sqrt(2.0 / (3 * 3 * 512))
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.01)
    assert conv.weight.mean().item() == pytest.approx(0.0, abs=expected * 0.01)
    assert model.classifier.weight.std().item() == pytest.approx(0.01, rel=0.05)  # the seed's vgg Linear


def test_bn_init_option():
    model = build_model("resnet-cifar", 8, bn_init=1.0)
    assert all(torch.all(m.weight == 1.0) for m in model.modules() if isinstance(m, _BatchNorm))


# --- seed / torchvision key compatibility ---------------------------------------------------

def test_vgg_keys_match_seed():
    # seed vgg(depth=11): feature = [conv, bn, relu] per number, maxpool per 'M'
    conv_at = (0, 4, 8, 11, 15, 18, 22, 25)
    expected = []
    for i in conv_at:
        expected += [f"feature.{i}.weight"] + bn(f"feature.{i + 1}")
    expected += ["classifier.weight", "classifier.bias"]
    assert list(build_model("vgg", 11).state_dict()) == expected


def test_preresnet_keys_match_seed():
    # seed resnet(depth=20): n = 2 blocks per stage; every stage's first block downsamples
    seed = ["conv1.weight"]
    for layer in ("layer1", "layer2", "layer3"):
        for b in (0, 1):
            p = f"{layer}.{b}"
            seed += bn(f"{p}.bn1") + [f"{p}.select.indexes", f"{p}.conv1.weight"]
            seed += bn(f"{p}.bn2") + [f"{p}.conv2.weight"]
            seed += bn(f"{p}.bn3") + [f"{p}.conv3.weight"]
            if b == 0:
                seed += [f"{p}.downsample.0.weight"]
    seed += bn("bn") + ["select.indexes", "fc.weight", "fc.bias"]
    expected = [k for k in seed if not k.endswith("select.indexes")]
    assert list(build_model("resnet", 20).state_dict()) == expected


def test_densenet_keys_match_seed():
    # seed densenet(depth=10): n = 2 layers per dense block
    seed = ["conv1.weight"]
    for block in ("dense1", "trans1", "dense2", "trans2", "dense3"):
        prefixes = [block] if block.startswith("trans") else [f"{block}.0", f"{block}.1"]
        for p in prefixes:
            seed += bn(f"{p}.bn1") + [f"{p}.select.indexes", f"{p}.conv1.weight"]
    seed += bn("bn") + ["select.indexes", "fc.weight", "fc.bias"]
    expected = [k for k in seed if not k.endswith("select.indexes")]
    assert list(build_model("densenet", 10).state_dict()) == expected


def test_densenet_widths_match_seed():
    model = build_model("densenet", 10, growth_rate=12)
    assert model.dense1[1].conv1.in_channels == 24 + 12
    assert model.trans1.conv1.out_channels == 24 + 2 * 12     # no compression
    assert model.fc.in_features == 24 + 6 * 12


def test_torchvision_key_names():
    with torch.device("meta"):  # keys and shapes only: skip initialising 40M weights
        r18, r50, mb = (build_model(a, num_classes=c).state_dict()
                        for a, c in (("resnet18", 10), ("resnet50", 1000), ("mobilenetv2", 10)))
    assert "layer1.0.downsample.0.weight" not in r18
    assert r18["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert "layer2.0.downsample.1.running_var" in r18
    assert r18["fc.weight"].shape == (10, 512)
    assert r50["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert r50["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    for key in ("features.0.0.weight", "features.0.1.running_mean", "features.1.conv.0.0.weight",
                "features.1.conv.1.weight", "features.1.conv.2.weight", "features.2.conv.0.0.weight",
                "features.2.conv.1.0.weight", "features.2.conv.2.weight", "features.2.conv.3.weight",
                "features.18.0.weight", "classifier.1.weight"):
        assert key in mb, key
    assert mb["features.18.0.weight"].shape == (1280, 320, 1, 1)


# --- family options ------------------------------------------------------------------------

def test_vgg_width_and_cfg():
    model = build_model("vgg", 11, width=0.25)
    convs = [m.out_channels for m in model.feature if isinstance(m, nn.Conv2d)]
    assert convs == [16, 32, 64, 64, 128, 128, 128, 128]
    assert model.classifier.in_features == 128
    model = build_model("vgg", cfg=[8, "M", 16, "M", 16, "M", 32, "M", 32], in_channels=1)
    assert [m.out_channels for m in model.feature if isinstance(m, nn.Conv2d)] == [8, 16, 16, 32, 32]
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    tiny = build_model("vgg", 11, width=0.001)
    assert all(m.out_channels == 1 for m in tiny.feature if isinstance(m, nn.Conv2d))


def test_mobilenetv2_small_input_keeps_resolution():
    x = torch.randn(1, 3, 32, 32)
    small = build_model("mobilenetv2", width_mult=0.25).eval()
    large = build_model("mobilenetv2", width_mult=0.25, small_input=False).eval()
    assert small.features(x).shape[-2:] == (4, 4)
    assert large.features(x).shape[-2:] == (1, 1)
    assert small.features[0][0].stride == (1, 1) and large.features[0][0].stride == (2, 2)


def test_resnet_imagenet_on_small_inputs():
    model = build_model("resnet18").eval()
    x = torch.randn(1, 3, 32, 32)
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    assert model.layer4(model.layer3(model.layer2(model.layer1(x)))).shape == (1, 512, 1, 1)


def test_densenet_compression_and_dropout():
    model = build_model("densenet", 10, compression=0.5, drop_rate=0.5)
    assert model.trans1.conv1.out_channels == (24 + 24) // 2
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    traced.eval()
    torch.testing.assert_close(traced(x), traced(x))       # dropout off in eval
    traced.train()
    assert not torch.equal(traced(x), traced(x))           # and on again in train


def test_mlp_shape():
    model = build_model("mlp", in_channels=1, image_size=28)
    assert model.features[0].in_features == 784
    assert [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm1d)] == [500, 300]
    assert model.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


# --- registry errors -------------------------------------------------------------------------

def test_unknown_arch():
    with pytest.raises(ConfigError, match=r"unknown arch 'alexnet'.*vgg.*resnet.*densenet"):
        build_model("alexnet")
    with pytest.raises(ConfigError, match="unknown arch"):
        model_info("alexnet")


@pytest.mark.parametrize("arch,depth,hint", [
    ("resnet", 21, r"depth 21 is not valid for resnet: use 9n\+2 \(e\.g\. 164\)"),
    ("resnet", 2, r"9n\+2"),
    ("densenet", 41, r"3n\+4 \(e\.g\. 40\)"),
    ("resnet-cifar", 21, r"6n\+2"),
    ("vgg", 12, r"11, 13, 16 or 19"),
    ("resnet18", 50, r"use 18$"),
    ("resnet-imagenet", 20, r"18, 34, 50, 101 or 152"),
    ("mobilenetv2", 20, r"takes no depth"),
    ("resnet", "164", r"9n\+2"),
])
def test_bad_depth(arch, depth, hint):
    with pytest.raises(ConfigError, match=hint):
        check_depth(arch, depth)
    with pytest.raises(ConfigError, match=hint):
        build_model(arch, depth)


def test_good_depths_pass():
    for arch, depth in [("resnet", 164), ("resnet", None), ("densenet", 100), ("resnet-cifar", 110),
                        ("vgg", 16), ("resnet50", 50), ("mlp", None)]:
        check_depth(arch, depth)


def test_unknown_option():
    with pytest.raises(ConfigError, match=r"unknown option growth_rate for vgg: valid options are cfg, width, bn_init"):
        build_model("vgg", 11, growth_rate=12)


@pytest.mark.parametrize("arch,options,hint", [
    ("vgg", dict(width=0), "width"),
    ("vgg", dict(cfg=[64, "X"]), "cfg entry 'X'"),
    ("densenet", dict(compression=1.5), "compression"),
    ("densenet", dict(growth_rate=0), "growth_rate"),
    ("densenet", dict(drop_rate=1.0), "drop_rate"),
    ("mobilenetv2", dict(width_mult=-1.0), "width_mult"),
    ("mlp", dict(hidden=()), "hidden"),
    ("resnet", dict(bn_init="half"), "bn_init"),
])
def test_bad_option_values(arch, options, hint):
    with pytest.raises(ConfigError, match=hint):
        with torch.device("meta"):
            build_model(arch, SMALL[arch].get("depth"), **options)


def test_bad_common_arguments():
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("vgg", 11, num_classes=0)
    with pytest.raises(ConfigError, match="in_channels"):
        build_model("vgg", 11, in_channels=0)


def test_model_info_lists_options():
    info = model_info("densenet")
    assert info["depths"] == "3n+4" and info["default_depth"] == 40
    assert info["options"] == {"growth_rate": 12, "compression": 1.0, "drop_rate": 0.0, "bn_init": 0.5}
    assert model_info("mobilenetv2")["depths"] is None
    assert set(model_info("mobilenetv2")["options"]) == {"width_mult", "small_input", "dropout", "bn_init"}
