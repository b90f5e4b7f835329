"""netslim.fuse.optimize_for_inference: same outputs as the model it rewrites, dense or slim."""
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import netslim.models as M
from netslim.fuse import (ClampActivation, FusedConv2d, MaxPool2x2, fold_bn, optimize_for_inference,
                          preactivation_fold)
from netslim.layers import gather_channels, is_indexed_bn
from netslim.engine.prune import prune

SMALL = {
    "resnet": dict(depth=20),
    "densenet": dict(depth=10),
    "vgg": dict(depth=11, width=0.25),
    "resnet-cifar": dict(depth=8),
    "mobilenetv2": dict(width_mult=0.25),
}


def sparsity_like_bn(model, seed=0):
    """BN factors like a sparsity-trained model's, some exactly 0 and some negative."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.weight is not None:
                n = m.num_features
                w = torch.randn(n, generator=g) ** 3 * 0.5
                w[torch.rand(n, generator=g) < 0.1] = 0.0
                m.weight.copy_(w)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def build(arch):
    return sparsity_like_bn(M.build_model(arch, num_classes=10, **SMALL[arch])).eval()


def close(a, b):
    scale = a.abs().max().clamp_min(1e-6)
    assert a.shape == b.shape
    assert float((a - b).abs().max() / scale) < 1e-5, float((a - b).abs().max() / scale)


@pytest.fixture(scope="module")
def pairs():
    torch.manual_seed(0)
    out = {}
    for arch in SMALL:
        dense = build(arch)
        slim, _ = prune(dense, 0.5)
        out[arch] = (dense, slim.eval())
    return out


@pytest.mark.parametrize("arch", sorted(SMALL))
@pytest.mark.parametrize("which", ["dense", "slim"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_same_outputs(pairs, arch, which, channels_last):
    model = pairs[arch][0 if which == "dense" else 1]
    fast = optimize_for_inference(model, channels_last=channels_last)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    kept = xin.clone()
    with torch.inference_mode():
        ref, out = model(x), fast(xin)
        again = fast(xin)
    close(ref, out)
    assert torch.equal(out, again)
    assert torch.equal(xin, kept), "the optimised model wrote into its input"
    # autograd on: FusedConv2d falls back to plain ops (and a NCHW input to a channels-last model)
    close(ref, fast(x).detach())


def test_what_it_rewrites(pairs):
    dense, slim = pairs["resnet"]
    for model in (dense, slim):
        fast = optimize_for_inference(model)
        mods = list(fast.modules())
        # pre-activation ResNet: bn2/bn3 fold into conv1/conv2, bn1 -> clamp, conv3 + residual add in place
        assert sum(isinstance(m, _BatchNorm) for m in mods) == 1          # only the final bn
        assert sum(isinstance(m, ClampActivation) for m in mods) == 6
        fused = [m for m in mods if isinstance(m, FusedConv2d)]
        assert sum(m.relu and not m.add for m in fused) == 12
        assert sum(m.add and m.inplace for m in fused) == 6
    vgg = optimize_for_inference(pairs["vgg"][1])
    assert not any(isinstance(m, _BatchNorm) for m in vgg.modules())
    assert sum(isinstance(m, MaxPool2x2) for m in vgg.modules()) == 4
    # the model itself is not changed
    assert any(is_indexed_bn(m) for m in slim.modules())


def test_original_model_untouched(pairs):
    dense, _ = pairs["resnet"]
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    optimize_for_inference(dense, channels_last=True)
    after = dense.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fold_bn_matches():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True)
    bn = sparsity_like_bn(nn.Sequential(nn.BatchNorm2d(6))).eval()[0]
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        close(bn(conv(x)), fold_bn(conv, bn)(x))


def test_preactivation_fold_every_sign():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -1.0, 0.0, 0.5, -0.3, 0.0, 2.0, -2.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3, -0.4, -0.1, -0.5, 0.0, 0.0]))
        bn.running_mean.copy_(torch.randn(8) * 0.3)
        bn.running_var.copy_(torch.rand(8) + 0.5)
    conv = nn.Conv2d(8, 5, 1, bias=False)
    act, conv2 = preactivation_fold(bn, conv)
    x = torch.randn(4, 8, 6, 6) * 3
    with torch.no_grad():
        close(conv(torch.relu(bn(x))), conv2(act(x)))
    x[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        assert torch.isnan(conv2(act(x))[0, :, 0, 0]).all()
    assert act.sides == "both"


@pytest.mark.parametrize("sign, sides", [(1.0, "min"), (-1.0, "max")])
def test_preactivation_fold_one_sided(sign, sides):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.weight.copy_(sign * (torch.rand(6) + 0.1))
        bn.bias.normal_()
        bn.running_mean.normal_()
    conv = nn.Conv2d(6, 4, 1, bias=True)
    act, conv2 = preactivation_fold(bn, conv)
    assert act.sides == sides
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        close(conv(torch.relu(bn(x))), conv2(act(x)))
        close(conv(torch.relu(bn(x))), conv2(act(x.contiguous(memory_format=torch.channels_last))))


@pytest.mark.parametrize("shape", [(2, 7, 5, 6), (2, 9, 3, 4, 5), (2, 6, 1, 1)])
def test_gather_channels_any_layout(shape):
    x = torch.randn(*shape)
    idx = torch.tensor([4, 0, 2, 3])
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    for t in (x, x.contiguous(memory_format=fmt)):
        y = gather_channels(t, idx)
        assert torch.equal(y, x.index_select(1, idx))
        if len(shape) == 4 and shape[2] > 1:
            # channels-last in, channels-last out: no transposing copy for the next conv
            assert y.is_contiguous(memory_format=fmt) == (t is not x)


def test_in_place_add_only_when_dead():
    class Twice(nn.Module):
        """The residual stream is read again after the add: it must not be overwritten."""

        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            s = self.a(x)
            y = self.b(s) + s
            return y * s

    m = Twice().eval()
    fast = optimize_for_inference(m, torch.zeros(1, 4, 8, 8))
    fused = [mm for mm in fast.modules() if isinstance(mm, FusedConv2d) and mm.add]
    assert fused and not any(mm.inplace for mm in fused)
    x = torch.randn(2, 4, 8, 8)
    with torch.inference_mode():
        close(m(x), fast(x))


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 5, 7, 9), (1, 4, 2, 3)])
def test_maxpool2x2_equals_max_pool2d(shape):
    x = torch.randn(*shape)
    x[0, 0, 0, 0] = float("nan")
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        ref, out = torch.nn.functional.max_pool2d(t, 2), MaxPool2x2()(t)
        assert torch.equal(ref.nan_to_num(), out.nan_to_num()) and torch.equal(ref.isnan(), out.isnan())
