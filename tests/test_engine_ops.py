"""Every op rule the engine holds (engine/rules.py) is tested here.

A pruned channel is all zeros in the masked model and absent from the slim one, so an op
between a BatchNorm and the next conv may pass it only if it maps 0 to 0 (else the two
models differ). Each passthrough and nonzero rule is run here on an input whose channel 1
is zero, each channelwise rule is pruned behind a BN; a rule without a case below fails
`test_every_rule_has_a_case`. Adding support for an op: one rule, one case.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netslim.engine import rules
from netslim.engine.prune import prune

from test_prune import randomize_bn

# module class -> (constructor, input rank)
MODULE_CASES = {
    nn.ReLU: (nn.ReLU, 4), nn.ReLU6: (nn.ReLU6, 4), nn.LeakyReLU: (lambda: nn.LeakyReLU(0.1), 4),
    nn.ELU: (nn.ELU, 4), nn.CELU: (nn.CELU, 4), nn.SELU: (nn.SELU, 4), nn.GELU: (nn.GELU, 4),
    nn.SiLU: (nn.SiLU, 4), nn.Mish: (nn.Mish, 4), nn.Hardswish: (nn.Hardswish, 4),
    nn.Hardtanh: (nn.Hardtanh, 4), nn.Tanh: (nn.Tanh, 4), nn.Softsign: (nn.Softsign, 4),
    nn.Tanhshrink: (nn.Tanhshrink, 4), nn.Softshrink: (nn.Softshrink, 4), nn.Hardshrink: (nn.Hardshrink, 4),
    nn.RReLU: (nn.RReLU, 4),
    nn.Dropout: (nn.Dropout, 4), nn.Dropout1d: (nn.Dropout1d, 3), nn.Dropout2d: (nn.Dropout2d, 4),
    nn.Dropout3d: (nn.Dropout3d, 5), nn.AlphaDropout: (nn.AlphaDropout, 4), nn.Identity: (nn.Identity, 4),
    nn.MaxPool1d: (lambda: nn.MaxPool1d(2), 3), nn.MaxPool2d: (lambda: nn.MaxPool2d(2), 4),
    nn.MaxPool3d: (lambda: nn.MaxPool3d(2), 5), nn.AvgPool1d: (lambda: nn.AvgPool1d(3, 1, 1), 3),
    nn.AvgPool2d: (lambda: nn.AvgPool2d(3, 1, 1), 4), nn.AvgPool3d: (lambda: nn.AvgPool3d(3, 1, 1), 5),
    nn.AdaptiveAvgPool1d: (lambda: nn.AdaptiveAvgPool1d(1), 3),
    nn.AdaptiveAvgPool2d: (lambda: nn.AdaptiveAvgPool2d(1), 4),
    nn.AdaptiveAvgPool3d: (lambda: nn.AdaptiveAvgPool3d(1), 5),
    nn.AdaptiveMaxPool1d: (lambda: nn.AdaptiveMaxPool1d(2), 3),
    nn.AdaptiveMaxPool2d: (lambda: nn.AdaptiveMaxPool2d(2), 4),
    nn.AdaptiveMaxPool3d: (lambda: nn.AdaptiveMaxPool3d(2), 5),
    nn.Upsample: (lambda: nn.Upsample(scale_factor=2, mode="bilinear"), 4),
    nn.UpsamplingNearest2d: (lambda: nn.UpsamplingNearest2d(scale_factor=2), 4),
    nn.UpsamplingBilinear2d: (lambda: nn.UpsamplingBilinear2d(scale_factor=2), 4),
    nn.ZeroPad1d: (lambda: nn.ZeroPad1d(1), 3), nn.ZeroPad2d: (lambda: nn.ZeroPad2d(1), 4),
    nn.ZeroPad3d: (lambda: nn.ZeroPad3d(1), 5),
    nn.ReflectionPad1d: (lambda: nn.ReflectionPad1d(1), 3), nn.ReflectionPad2d: (lambda: nn.ReflectionPad2d(1), 4),
    nn.ReflectionPad3d: (lambda: nn.ReflectionPad3d(1), 5),
    nn.ReplicationPad1d: (lambda: nn.ReplicationPad1d(1), 3),
    nn.ReplicationPad2d: (lambda: nn.ReplicationPad2d(1), 4),
    nn.ReplicationPad3d: (lambda: nn.ReplicationPad3d(1), 5),
}
NONZERO_MODULE_CASES = {nn.Sigmoid: nn.Sigmoid, nn.Hardsigmoid: nn.Hardsigmoid, nn.Softplus: nn.Softplus,
                        nn.LogSigmoid: nn.LogSigmoid}

FUNCTION_CASES = {
    torch.relu: torch.relu, torch.relu_: lambda x: torch.relu_(x.clone()), F.relu: F.relu,
    F.relu_: lambda x: F.relu_(x.clone()), F.relu6: F.relu6, F.leaky_relu: F.leaky_relu, F.elu: F.elu,
    F.celu: F.celu, F.selu: F.selu, F.gelu: F.gelu, F.silu: F.silu, F.mish: F.mish, F.hardswish: F.hardswish,
    F.hardtanh: F.hardtanh, torch.tanh: torch.tanh, F.tanh: F.tanh, F.softsign: F.softsign,
    F.dropout: lambda x: F.dropout(x, 0.5, training=False), F.dropout1d: lambda x: F.dropout1d(x[..., 0], 0.5, False),
    F.dropout2d: lambda x: F.dropout2d(x, 0.5, False), F.dropout3d: lambda x: F.dropout3d(x[..., None], 0.5, False),
    F.alpha_dropout: lambda x: F.alpha_dropout(x, 0.5, False),
    F.max_pool1d: lambda x: F.max_pool1d(x[..., 0], 2), F.max_pool2d: lambda x: F.max_pool2d(x, 2),
    F.max_pool3d: lambda x: F.max_pool3d(x[..., None].expand(-1, -1, -1, -1, 2), 2),
    F.avg_pool1d: lambda x: F.avg_pool1d(x[..., 0], 3, 1, 1), F.avg_pool2d: lambda x: F.avg_pool2d(x, 3, 1, 1),
    F.avg_pool3d: lambda x: F.avg_pool3d(x[..., None], 1),
    F.adaptive_avg_pool1d: lambda x: F.adaptive_avg_pool1d(x[..., 0], 1),
    F.adaptive_avg_pool2d: lambda x: F.adaptive_avg_pool2d(x, 1),
    F.adaptive_avg_pool3d: lambda x: F.adaptive_avg_pool3d(x[..., None], 1),
    F.adaptive_max_pool1d: lambda x: F.adaptive_max_pool1d(x[..., 0], 1),
    F.adaptive_max_pool2d: lambda x: F.adaptive_max_pool2d(x, 1),
    F.adaptive_max_pool3d: lambda x: F.adaptive_max_pool3d(x[..., None], 1),
    F.interpolate: lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"),
    torch.clone: torch.clone, torch.Tensor.contiguous: torch.Tensor.contiguous,
}
NONZERO_FUNCTION_CASES = {torch.sigmoid: torch.sigmoid, F.sigmoid: F.sigmoid, F.hardsigmoid: F.hardsigmoid,
                          F.softplus: F.softplus, torch.exp: torch.exp}
METHOD_CASES = {name: (lambda x, name=name: getattr(x.clone(), name)()) for name in
                ("relu", "relu_", "contiguous", "clone", "detach", "float", "double", "tanh", "tanh_")}
METHOD_CASES.update({"half": lambda x: x.half(), "bfloat16": lambda x: x.bfloat16(),
                     "to": lambda x: x.to(torch.float64)})
NONZERO_METHOD_CASES = {name: (lambda x, name=name: getattr(x.clone(), name)()) for name in rules.NONZERO_METHODS}
# channelwise modules (per-channel weights sliced with the channels): constructor for 8 channels
CHANNELWISE_MODULE_CASES = {nn.PReLU: lambda: nn.PReLU(8)}
# every other built-in rule kind is the walk's own code, covered by the engine's model tests
STRUCTURAL_KINDS = {"conv", "linear", "batchnorm", "instancenorm", "layernorm", "flatten", "keeps_channels",
                    "add", "mul", "div", "cat", "reduce", "getitem", "split", "reshape"}


def table(rules_by_op: dict, kind: str) -> set:
    return {op for op, rule in rules_by_op.items() if rule.kind == kind}


def with_zero_channel(rank: int) -> torch.Tensor:
    x = torch.randn(2, 4, *([6] * (rank - 2)))
    x[:, 1] = 0
    return x


def test_every_rule_has_a_case():
    assert table(rules.BUILTIN_MODULE_RULES, "passthrough") == set(MODULE_CASES)
    assert table(rules.BUILTIN_MODULE_RULES, "nonzero") == set(NONZERO_MODULE_CASES)
    assert table(rules.BUILTIN_MODULE_RULES, "channelwise") == set(CHANNELWISE_MODULE_CASES)
    assert table(rules.FUNCTION_RULES, "passthrough") == set(FUNCTION_CASES)
    assert table(rules.FUNCTION_RULES, "nonzero") == set(NONZERO_FUNCTION_CASES)
    assert table(rules.METHOD_RULES, "passthrough") == set(METHOD_CASES)
    assert table(rules.METHOD_RULES, "nonzero") == set(NONZERO_METHOD_CASES)
    covered = {"passthrough", "nonzero", "channelwise"} | STRUCTURAL_KINDS
    for by_op in (rules.BUILTIN_MODULE_RULES, rules.FUNCTION_RULES, rules.METHOD_RULES):
        assert {r.kind for r in by_op.values()} <= covered


def test_every_rule_kind_has_a_step_and_every_module_use_a_slicer():
    """The rule drives both the analysis (slots.py) and the slicing (slim.py)."""
    from netslim.engine.slim import SLICERS
    from netslim.engine.channels import USE_KINDS
    from netslim.engine.slots import CALL_STEPS, MODULE_STEPS

    assert {r.kind for r in rules.MODULE_RULES.values()} <= set(MODULE_STEPS)  # users' rules too
    assert {r.kind for r in rules.FUNCTION_RULES.values()} | {r.kind for r in rules.METHOD_RULES.values()} \
        <= set(CALL_STEPS)
    assert set(SLICERS) == set(USE_KINDS)


@pytest.mark.parametrize("cls", list(CHANNELWISE_MODULE_CASES), ids=lambda c: c.__name__)
def test_channelwise_modules_are_sliced_with_the_channels(cls):
    op = CHANNELWISE_MODULE_CASES[cls]()
    with torch.no_grad():
        for p in op.parameters():
            p.uniform_(0.1, 0.9)
    model = randomize_bn(ConvBnOpConv(op)).eval()
    x = torch.randn(2, 3, 8, 8)
    slim, _ = prune(model, 0.5, example_input=x[:1])
    masked, _ = prune(model, 0.5, mode="mask", example_input=x[:1])
    kept = slim.bn.num_features
    assert kept < 8 and all(p.shape[0] == kept for p in slim.op.parameters())
    with torch.no_grad():
        torch.testing.assert_close(slim(x), masked(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", list(MODULE_CASES), ids=lambda c: c.__name__)
def test_zero_preserving_modules_map_a_zero_channel_to_zero(cls):
    make, rank = MODULE_CASES[cls]
    y = make().eval()(with_zero_channel(rank))
    assert y[:, 1].abs().max() == 0 and y[:, 0].abs().max() > 0


@pytest.mark.parametrize("fn", list(FUNCTION_CASES), ids=lambda f: getattr(f, "__name__", str(f)))
def test_zero_preserving_functions_map_a_zero_channel_to_zero(fn):
    y = FUNCTION_CASES[fn](with_zero_channel(4))
    assert y[:, 1].abs().max() == 0 and y[:, 0].abs().max() > 0


@pytest.mark.parametrize("name", sorted(METHOD_CASES))
def test_zero_preserving_methods_map_a_zero_channel_to_zero(name):
    y = METHOD_CASES[name](with_zero_channel(4))
    assert y[:, 1].abs().max() == 0


def test_the_non_zero_tables_really_map_zero_elsewhere():
    zero = torch.zeros(1, 2, 3, 3)
    for make in NONZERO_MODULE_CASES.values():
        assert make()(zero).abs().min() > 0
    for fn in list(NONZERO_FUNCTION_CASES.values()) + list(NONZERO_METHOD_CASES.values()):
        assert fn(zero).abs().min() > 0


class ConvBnOpConv(nn.Module):
    """conv -> BN -> ReLU -> <op> -> conv: the op sits on a pruned channel path."""

    def __init__(self, op: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.op = op
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.op(torch.relu(self.bn(self.conv(x)))))


def with_stats(m: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, as after training."""
    g = torch.Generator().manual_seed(1)
    for name, t in list(m.named_parameters()) + list(m.named_buffers()):
        if t.is_floating_point():
            with torch.no_grad():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "var" in name or "weight" in name
                        else torch.randn(t.shape, generator=g) * 0.5)
    return m


NORMS = {
    "bn-nonaffine": lambda: nn.BatchNorm2d(8, affine=False),
    "bn-nonaffine-batchstats": lambda: nn.BatchNorm2d(8, affine=False, track_running_stats=False),
    "instancenorm": lambda: nn.InstanceNorm2d(8),
    "instancenorm-affine": lambda: nn.InstanceNorm2d(8, affine=True),
    "instancenorm-running": lambda: nn.InstanceNorm2d(8, track_running_stats=True),
    "groupnorm": lambda: nn.GroupNorm(2, 8),
    "groupnorm-nonaffine": lambda: nn.GroupNorm(4, 8, affine=False),
    "layernorm-channels": lambda: nn.LayerNorm([8, 8, 8]),
    "layernorm-width": lambda: nn.LayerNorm(8),
    "layernorm-width-nobias": lambda: nn.LayerNorm(8, bias=False),
    "lrn": lambda: nn.LocalResponseNorm(3),
}


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_every_norm_behind_a_pruned_channel_keeps_slim_equal_to_masked(norm):
    """A norm that does not map 0 to 0 (or mixes channels) keeps the BN's channels, with a reason."""
    model = randomize_bn(ConvBnOpConv(with_stats(NORMS[norm]()))).eval()
    x = torch.randn(2, 3, 8, 8)
    slim, report = prune(model, 0.5, example_input=x[:1])
    masked, _ = prune(model, 0.5, mode="mask", example_input=x[:1])
    with torch.no_grad():
        torch.testing.assert_close(slim(x), masked(x), rtol=1e-5, atol=1e-5)
    if slim.bn.num_features == 8:
        assert "bn" in report["unprunable"]


def test_non_affine_batchnorm_on_a_pruned_path():
    """The issue's case: conv -> BN -> ReLU -> BN(affine=False) -> conv differed by 0.25."""
    model = randomize_bn(ConvBnOpConv(with_stats(nn.BatchNorm2d(8, affine=False)))).eval()
    x = torch.randn(2, 3, 8, 8)
    slim, report = prune(model, 0.5, example_input=x[:1])
    masked, _ = prune(model, 0.5, mode="mask", example_input=x[:1])
    with torch.no_grad():
        assert (slim(x) - masked(x)).abs().max() < 1e-5
    assert "running_mean" in report["unprunable"]["bn"]


@pytest.mark.parametrize("cls", [c for c in MODULE_CASES if MODULE_CASES[c][1] == 4], ids=lambda c: c.__name__)
def test_zero_preserving_modules_behind_a_pruned_channel(cls):
    model = randomize_bn(ConvBnOpConv(MODULE_CASES[cls][0]())).eval()
    x = torch.randn(2, 3, 8, 8)
    slim, _ = prune(model, 0.5, example_input=x[:1])
    masked, _ = prune(model, 0.5, mode="mask", example_input=x[:1])
    assert slim.bn.num_features < 8
    with torch.no_grad():
        torch.testing.assert_close(slim(x), masked(x), rtol=1e-5, atol=1e-5)
