"""Compensation: a removed channel's constant output is folded into what reads it."""
import math

import pytest
import torch
from torch import nn

from netslim.checkpoint import load_checkpoint, save_checkpoint
from netslim.engine.prune import prune


def _zero_half_the_factors(model):
    """Random BN stats and betas; gamma = 0 on every odd channel (those are what 40% prunes)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) or isinstance(m, nn.BatchNorm1d):
            with torch.no_grad():
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight[1::2] = 0.0
                m.bias.copy_(torch.randn(n, generator=g))        # removed channels output act(beta) != 0
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model.eval()


class OneByOne(nn.Module):
    """3x3 conv -> BN -> ReLU -> 1x1 conv (no bias) -> BN -> ReLU -> 1x1 conv with a bias -> pool -> linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.c3(x), 1), 1))


class Flattened(nn.Module):
    """conv -> BN -> ReLU -> max-pool -> flatten -> Linear: the constant reaches the linear per block."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.max_pool2d(torch.relu(self.b1(self.c1(x))), 2), 1))


class Attention(nn.Module):
    """A removed channel multiplied by a map computed from the input: not a constant, so skipped."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        return self.c2(y * x[:, :1])


def _outputs(model, pruned, x):
    with torch.no_grad():
        return model(x), pruned.eval()(x)


def test_zero_factors_with_1x1_and_linear_consumers_prune_exactly():
    x = torch.randn(4, 3, 8, 8)
    for net in (OneByOne(), Flattened()):
        model = _zero_half_the_factors(net)
        for mode in ("slim", "mask"):
            pruned, report = prune(model, 0.4, mode=mode, example_input=x[:1])
            dense, out = _outputs(model, pruned, x)
            torch.testing.assert_close(out, dense, rtol=0, atol=1e-5)
            assert report["compensation"]["folded"] > 0 and report["compensation"]["skipped"] == 0
        plain, _ = prune(model, 0.4, example_input=x[:1], compensate=False)
        dense, out = _outputs(model, plain, x)
        assert (out - dense).abs().max() > 1e-2   # without compensation the constants are lost


def test_fold_goes_into_the_bn_behind_a_conv_and_adds_no_parameter():
    model = _zero_half_the_factors(OneByOne())
    x = torch.randn(2, 3, 8, 8)
    slim, report = prune(model, 0.4, example_input=x[:1])
    comp = report["compensation"]
    assert comp["into_bn_running_mean"] == ["b2"] and comp["added_biases"] == []
    assert comp["into_bias"] == ["c3"]
    assert "biases" not in slim.netslim_meta


def test_compensated_checkpoint_with_an_added_bias_reloads(tmp_path):
    model = _zero_half_the_factors(Flattened())
    model.fc.bias = None                              # the constant has nowhere to go: a bias is made
    x = torch.randn(2, 3, 8, 8)
    slim, report = prune(model, 0.4, example_input=x[:1])
    assert report["compensation"]["added_biases"] == ["fc"] and slim.netslim_meta["biases"] == ["fc"]
    save_checkpoint(tmp_path / "slim.pt", slim)
    fresh = Flattened()
    fresh.fc.bias = None
    reloaded, meta = load_checkpoint(tmp_path / "slim.pt", model=fresh)
    assert meta["biases"] == ["fc"]
    dense, out = _outputs(model, reloaded, x)
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-5)


def test_a_channel_that_is_not_constant_is_skipped_and_slim_still_equals_masked():
    model = _zero_half_the_factors(Attention())
    with torch.no_grad():
        model.b1.bias.abs_().add_(0.1)              # relu(beta) > 0: every removed channel is non-zero
    x = torch.randn(3, 3, 8, 8)
    slim, report = prune(model, 0.4, example_input=x[:1])
    masked, _ = prune(model, 0.4, mode="mask", example_input=x[:1])
    assert report["compensation"]["skipped"] == 4 and report["compensation"]["folded"] == 0
    _, ys = _outputs(model, slim, x)
    _, ym = _outputs(model, masked, x)
    torch.testing.assert_close(ys, ym, rtol=0, atol=1e-6)


def test_compensate_false_is_the_plain_pruning():
    from netslim.engine.plan import make_plan
    from netslim.engine.slim import apply_plan
    from netslim.engine.analysis import analyze

    model = _zero_half_the_factors(OneByOne())
    x = torch.randn(2, 3, 8, 8)
    plain, report = prune(model, 0.4, example_input=x[:1], compensate=False)
    plan, _, _ = make_plan(model, analyze(model, x[:1]), 0.4)
    _, expected = _outputs(model, apply_plan(model, plan, x[:1]), x)
    _, out = _outputs(model, plain, x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert report["compensation"] is None


def test_the_noise_probe_keeps_its_sample_count_on_larger_inputs():
    """Fewer examples on a larger input, never fewer noise samples than 4 examples at 32x32."""
    from netslim.engine.compensate import noise_batch

    for shape in [(3, 32, 32), (1, 28, 28), (784,), (3, 40, 40), (3, 64, 64), (3, 224, 224), (2, 8, 16, 16)]:
        batch = noise_batch(torch.zeros(1, *shape))
        positions = math.prod(shape[1:])
        assert 1 <= batch <= 4 and batch * positions >= min(4 * positions, 4 * 32 * 32)
    assert noise_batch(torch.zeros(1, 3, 224, 224)) == 1 and noise_batch(torch.zeros(1, 3, 32, 32)) == 4
    assert noise_batch(torch.zeros(1, 3, 40, 40)) == 3


def test_the_folded_constant_of_a_relu_is_its_expectation_over_the_bn_noise():
    """conv -> BN -> ReLU -> 1x1 conv: a removed channel with factor gamma adds
    W E[relu(gamma z + beta)] = W (beta Phi(beta / gamma) + gamma phi(beta / gamma)) to the
    1x1 conv's BN. The stratified noise gets it to 1e-4 from 4 examples of 8x8 (16 examples of
    independent draws were 2e-3 off)."""
    model = _zero_half_the_factors(OneByOne())
    with torch.no_grad():
        model.b1.weight[1::2] = torch.linspace(0.05, 0.3, 4)   # small, not zero: the smallest after b2's zeros
    gamma, beta = model.b1.weight[1::2].detach(), model.b1.bias[1::2].detach()
    normal = torch.distributions.Normal(0.0, 1.0)
    expected_relu = beta * normal.cdf(beta / gamma) + gamma * normal.log_prob(beta / gamma).exp()
    slim, report = prune(model, 0.45, example_input=torch.zeros(1, 3, 8, 8))   # the 8 odd channels
    assert report["channels_kept"] == 8 and report["compensation"]["into_bn_running_mean"][0] == "b2"
    shift = model.b2.running_mean[0::2] - slim.b2.running_mean   # folded into the BN behind c2 (kept: even)
    expected = model.c2.weight[0::2, 1::2, 0, 0].detach() @ expected_relu
    torch.testing.assert_close(shift, expected, rtol=0, atol=1e-4)


class SqueezeExcite(nn.Module):
    """y * sigmoid(fc2(relu(fc1(pool(y))))): the gate comes from every channel, kept ones too."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(y, 1)))))
        return self.c2(y * gate)


class BroadcastByKept(nn.Module):
    """y * z[:, :1]: one channel of another BN's output, broadcast over y's channels."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c3, self.c4 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        z = torch.relu(self.b2(self.c2(x)))
        return self.c3(y * z[:, :1]) + self.c4(z)


class LayerScale(nn.Module):
    """A per-channel parameter times the BN output: a constant stays a constant."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 8).view(1, 8, 1, 1))
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(torch.relu(self.b1(self.c1(x))) * self.scale)


class HandSiLU(nn.Module):
    """y * y.sigmoid(): the gate is computed from the channel itself, a constant when it is removed."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.b1(self.c1(x))
        return self.c2(y * y.sigmoid())


def test_the_analysis_finds_which_removed_channels_a_product_makes_vary():
    """Without running the model: a gate from other channels or an input-dependent broadcast
    factor marks the channels read after the product; a gate from the channel itself, a layer
    scale, and a reader before the product (the squeeze) stay constants."""
    from netslim.engine.analysis import analyze

    x = torch.randn(1, 3, 8, 8)
    every = frozenset(range(8))
    assert analyze(SqueezeExcite(), x).varying_inputs == {"c2": every}   # not fc1: it reads y before
    assert analyze(BroadcastByKept(), x).varying_inputs == {"c3": every}
    assert analyze(Attention(), x).varying_inputs == {"c2": every}
    assert analyze(LayerScale(), x).varying_inputs == {}
    assert analyze(HandSiLU(), x).varying_inputs == {}


def test_channels_gated_by_kept_channels_are_skipped_and_constants_are_folded_exactly():
    x = torch.randn(3, 3, 8, 8)
    # (model, removed channels left alone, folded)
    cases = [(SqueezeExcite(), 4, 4), (BroadcastByKept(), 4, 0), (LayerScale(), 0, 4), (HandSiLU(), 0, 4)]
    for net, skipped, folded in cases:
        model = _zero_half_the_factors(net)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.bias.abs_().add_(0.1)            # relu(beta) > 0: every removed channel is non-zero
        slim, report = prune(model, 0.4, example_input=x[:1])
        masked, _ = prune(model, 0.4, mode="mask", example_input=x[:1])
        comp = report["compensation"]
        assert (comp["skipped"], comp["folded"]) == (skipped, folded), type(net).__name__
        dense, ys = _outputs(model, slim, x)
        _, ym = _outputs(model, masked, x)
        torch.testing.assert_close(ys, ym, rtol=0, atol=1e-6)
        if not skipped:   # constants through 1x1 convs: the pruned model computes what the dense one does
            torch.testing.assert_close(ys, dense, rtol=0, atol=1e-5)


def test_the_constant_a_conv_gets_is_the_spatial_mean_of_its_output():
    """A 1x1 stride-1 conv takes the mean of its input (the mean commutes with it); any other
    conv the mean of what each kernel position reads: the numbers running the conv gives."""
    from netslim.engine.compensate import _contribution
    from netslim.engine.probe import _input_positions, _summary

    g = torch.Generator().manual_seed(0)
    channels = [1, 2, 5]
    convs = [nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1, stride=2), nn.Conv2d(8, 4, 1, padding=1),
             nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(8, 4, 3, padding="same"), nn.Conv2d(8, 4, 1, groups=2),
             nn.Conv2d(8, 4, 4, padding="same", dilation=2), nn.Conv2d(8, 6, (3, 5), stride=(2, 3), padding=(1, 2)),
             nn.Conv2d(8, 4, 3, stride=2, dilation=2, padding=3, groups=4), nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect"),
             nn.Conv1d(8, 4, 3, stride=2, padding=1), nn.Conv3d(8, 4, 3, padding=1)]
    for conv in convs:
        mean = torch.randn(2, 8, *[7] * (conv.weight.dim() - 2), generator=g)
        z = torch.zeros_like(mean)
        z[:, channels] = mean[:, channels]
        with torch.no_grad():
            out = conv._conv_forward(z, conv.weight, None)
            expected = out.transpose(0, 1).reshape(out.shape[1], -1).mean(1)
        recorded = _summary(conv, mean, _input_positions(conv, channels, 1))
        folded = _contribution(conv, 1, recorded, channels, channels)
        torch.testing.assert_close(folded, expected, rtol=0, atol=1e-5, msg=repr(conv))
        # a subset of the recorded channels (the others vary): only theirs is applied
        z[:, 2] = 0
        with torch.no_grad():
            out = conv._conv_forward(z, conv.weight, None)
        subset = _contribution(conv, 1, recorded, channels, [1, 5])
        torch.testing.assert_close(subset, out.transpose(0, 1).reshape(out.shape[1], -1).mean(1), rtol=0, atol=1e-5)


def test_pruning_leaves_the_model_untouched_and_shares_no_tensor_with_it():
    """The compensated copy shares the conv and linear weights with the model until slicing;
    whatever slicing leaves whole (c3, fc) is copied before the slim model is returned."""
    model = _zero_half_the_factors(OneByOne())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for mode in ("slim", "mask"):
        pruned, _ = prune(model, 0.4, mode=mode, example_input=torch.zeros(1, 3, 8, 8))
        with torch.no_grad():
            for t in (*pruned.parameters(), *pruned.buffers()):
                t.add_(1) if t.is_floating_point() else None   # training the pruned model...
        for key, value in model.state_dict().items():            # ... leaves the user's model alone
            assert torch.equal(value, before[key]), (mode, key)
        storages = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        assert not any(t.untyped_storage().data_ptr() in storages for t in (*pruned.parameters(), *pruned.buffers()))


# ---------------------------------------------------------------------------------------
# The probe on the removed channels only (probe._RestrictedProbe) against the full forward

def _both_probes(monkeypatch):
    """From here on, each compensation runs the restricted probe and the full forward and
    checks that what they record is the same, bit for bit; returns, per probe, whether the
    restricted one answered (False: it sent the compensation to the full forward)."""
    from netslim.engine import probe

    answered = []
    restricted = probe._RestrictedProbe.run

    def run(self, example_input, batch):
        seen = restricted(self, example_input, batch)
        answered.append(seen is not None)
        if seen is not None:
            full = probe._full_probe(self.mods[""], self.removed, self.consumers, self.in_blocks,
                                     example_input, batch)
            assert seen.keys() == full.keys()
            for name in full:
                assert torch.equal(seen[name], full[name]), name
        return seen

    monkeypatch.setattr(probe._RestrictedProbe, "run", run)
    return answered


class OneRemovedChannel(nn.Module):
    """Two BNs whose products a 1x1 conv and a 3x3 conv read, each with one channel removed
    at 1/16 (a 1x1 conv's recorded mean then runs over a single probed channel)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.p1, self.p3 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.p1(torch.relu(self.b1(self.c1(x)))).mean() + self.p3(torch.relu(self.b2(self.c2(x)))).mean()


def _one_removed_channel():
    model = _zero_half_the_factors(OneRemovedChannel())
    with torch.no_grad():
        for bn in (model.b1, model.b2):
            bn.weight[1::2] = torch.tensor([0.05, 0.3, 0.4, 0.5])  # channel 1 is the smallest
            bn.weight[0::2] += 1.0
            bn.bias.abs_().add_(0.1)   # relu(beta + gamma z) varies: the order of the sum shows
    return model


def test_the_probe_on_the_removed_channels_records_what_the_full_forward_does(monkeypatch):
    """Residual adds (in place too), concatenations, pooling, flatten before a linear, several
    percents: the same noise, drawn in the same order, reaches the same channels."""
    from zoo import ZOO
    from test_zoo import skew_bn

    answered = _both_probes(monkeypatch)
    x = torch.randn(1, 3, 32, 32)
    models = [skew_bn(ZOO[name]()) for name in ("resnet-bottleneck", "resnet18-basic", "densenet-bc", "dpn",
                                                 "googlenet", "mobilenet-v2")]
    for model in models:
        for percent in (0.3, 0.7):
            prune(model, percent, example_input=x)
    for net in (OneByOne(), Flattened()):
        prune(_zero_half_the_factors(net), 0.4, example_input=torch.randn(1, 3, 8, 8))
    _, report = prune(_one_removed_channel(), 1 / 16, example_input=x)
    assert report["compensation"]["into_bias"] == ["p1", "p3"]
    assert answered == [True] * 15


# The tests/zoo architectures the restricted probe answers for (at 32x32, 50%); the others
# go to the full forward: SiLU, hard-swish or sigmoid on a probed path (efficientnet-b0,
# mobilenet-v3-small, yolov8-style), a consumer reading a squeeze-excitation product or a
# depthwise conv's output (ghostnet, pnasnet-a, pnasnet-b, regnety, senet), a channel shuffle
# (the shufflenets: x.size() on a probed path).
PROBED_ZOO = {"convnext-bn", "deep-residual-stack", "densenet-bc", "dla", "dpn", "googlenet", "mobilenet-v1",
              "mobilenet-v2", "preact-resnet", "regnetx", "repvgg", "resnet-bottleneck", "resnet18-basic",
              "resnext29", "untraceable-submodule", "vgg11"}


def test_which_zoo_architectures_the_restricted_probe_answers_for(monkeypatch):
    from zoo import ZOO
    from test_zoo import skew_bn

    answered = _both_probes(monkeypatch)
    probed = set()
    for name in sorted(ZOO):
        answered.clear()
        prune(skew_bn(ZOO[name]()), 0.5, example_input=torch.randn(1, 3, 32, 32))
        if answered == [True]:
            probed.add(name)
    assert probed == PROBED_ZOO


def _probe_fallback(caplog, monkeypatch, model, percent, why):
    """Pruning `model` sends the compensation to the full forward, logging `why`."""
    import logging

    answered = _both_probes(monkeypatch)
    monkeypatch.setattr(logging.getLogger("netslim"), "propagate", True)  # a CLI test may have set it off
    with caplog.at_level(logging.DEBUG, logger="netslim.engine.probe"):
        _, report = prune(model, percent, example_input=torch.randn(1, 3, 8, 8))
    assert answered == [False] and report["compensation"]["folded"] > 0
    assert why in caplog.text, caplog.text


class SiLUAfterBN(OneByOne):
    def forward(self, x):
        return self.c3(nn.functional.silu(self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))))


class DepthwiseBetween(nn.Module):
    """BN -> ReLU -> depthwise conv -> 1x1 conv: the consumer reads the depthwise conv's outputs."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.pw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.pw(self.dw(torch.relu(self.b1(self.c1(x)))))


class DepthwiseBeside(DepthwiseBetween):
    """cat([y, dw(y)]) -> 1x1 conv: the probe holds y's removed channels, not the depthwise conv's."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        return self.pw(torch.cat([y, self.dw(y)], 1))


class WritesASharedTensor(nn.Module):
    """relu_ on y.contiguous(), which is y itself here (a copy in a channels-last model)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.b1(self.c1(x))
        z = y.contiguous().relu_()
        return self.c2(torch.cat([y, z], 1))


def test_an_op_the_probe_cannot_prove_exact_sends_it_to_the_full_forward(caplog, monkeypatch):
    cases = [(SiLUAfterBN(), "node silu"),
             (DepthwiseBetween(), "consumer pw's input holds no probed channel"),
             (DepthwiseBeside(), "consumer pw reads a channel the probe does not hold"),
             (WritesASharedTensor(), "writes in place a tensor b1 shares"),
             (LayerScale(), "consumer c2's input holds no probed channel")]
    channels_last = _zero_half_the_factors(OneByOne()).to(memory_format=torch.channels_last)
    cases = [(_zero_half_the_factors(net), why) for net, why in cases] + [(channels_last, "channels-last")]
    for model, why in cases:
        caplog.clear()
        monkeypatch.undo()
        _probe_fallback(caplog, monkeypatch, model, 0.4, why)


def test_an_error_in_the_probe_or_a_module_out_of_the_graph_sends_it_to_the_full_forward(caplog, monkeypatch):
    import logging

    from netslim.engine import probe

    def fails(*args):
        raise RuntimeError("planted")

    monkeypatch.setattr(probe._RestrictedProbe, "flatten", fails)
    _probe_fallback(caplog, monkeypatch, _zero_half_the_factors(Flattened()), 0.4, "RuntimeError: planted")
    caplog.clear()
    monkeypatch.undo()
    graph = probe.fx.symbolic_trace(nn.Sequential())  # none of the model's modules
    monkeypatch.setattr(probe, "_full_probe", lambda *args: "full")
    model = _zero_half_the_factors(OneByOne())
    monkeypatch.setattr(logging.getLogger("netslim"), "propagate", True)
    with caplog.at_level(logging.DEBUG, logger="netslim.engine.probe"):
        assert probe.consumer_inputs(model, graph, {"b1": [1]}, {"c2": [1]}, {"c2": 1}, torch.zeros(1, 3, 8, 8),
                                     batch=1) == "full"
    assert "b1 is not in the traced graph" in caplog.text



def test_the_constant_a_linear_gets_is_its_weight_times_the_recorded_features():
    """A Linear after a flatten reads in_block features per channel: the constant is the weight
    times those of the folded channels (all recorded ones, or a subset when others vary)."""
    from netslim.engine.compensate import _contribution
    from netslim.engine.probe import _input_positions, _summary

    linear, block, channels = nn.Linear(8 * 4, 3), 4, [1, 2, 5]
    x = torch.randn(2, 8 * 4, generator=torch.Generator().manual_seed(0))
    recorded = _summary(linear, x, _input_positions(linear, channels, block))
    for folded in (channels, [1, 5]):
        z = torch.zeros(8 * 4)
        z[_input_positions(linear, folded, block)] = x.mean(0)[_input_positions(linear, folded, block)]
        torch.testing.assert_close(_contribution(linear, block, recorded, channels, folded), linear.weight.detach() @ z,
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch,channels,spatial", [(4, 3, (8, 8)), (1, 5, (2, 2)), (2, 40, (3,)), (1, 1, (4, 4))])
def test_the_stratified_draw_reads_each_channel_from_its_offset_in_one_permuted_ring(batch, channels, spatial):
    """_StratifiedNormal.draw, written out: the n midpoint quantiles permuted once, channel c
    reading n of them cyclically from offset c * max(n // channels, 1), batch then space."""
    from netslim.engine.probe import _StratifiedNormal

    z = _StratifiedNormal(torch.Generator().manual_seed(0)).draw(batch, channels, spatial)
    n = batch * math.prod(spatial)
    quantiles = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n).float()
    ring = quantiles[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    step = max(n // channels, 1)
    assert z.shape == (batch, channels, *spatial)
    for c in range(channels):
        assert torch.equal(z[:, c].reshape(-1), ring[(c * step + torch.arange(n)) % n]), c


def test_the_probe_runs_in_eval_mode_and_restores_every_module_s_mode():
    """A model in training mode (one submodule in eval) is compensated as in eval mode (the
    dropout on the probed path is the identity) and keeps each module's mode."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with torch.no_grad():
        for bn in (model[1], model[5]):
            bn.weight.copy_(torch.rand(8) + 0.5)
            bn.weight[::2] = 0.0
            bn.bias.copy_(torch.rand(8))
    model.train()
    model[5].eval()
    modes = {n: m.training for n, m in model.named_modules()}
    x = torch.zeros(1, 3, 8, 8)
    in_training, report = prune(model, 0.5, example_input=x)
    in_eval, _ = prune(copy.deepcopy(model).eval(), 0.5, example_input=x)
    assert report["compensation"]["folded"] > 0
    assert {n: m.training for n, m in in_training.named_modules()} == modes
    assert {n: m.training for n, m in model.named_modules()} == modes
    state = in_eval.state_dict()
    assert all(torch.equal(state[k], v) for k, v in in_training.state_dict().items())
