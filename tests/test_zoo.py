"""The engine's invariants on CNNs nobody on the team designed (tests/zoo/: written from
their papers), at several percents, with skewed random BN factors:

no error, slim == masked (eval outputs), no layer emptied, save -> load -> identical
outputs, pruning the slim model again works, and the report's share of removed BN
channels equals what counting the modules gives.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from netslim.checkpoint import load_checkpoint, save_checkpoint
from netslim.engine.prune import prune
from zoo import ZOO

PERCENTS = (0.3, 0.5, 0.7, 0.95)



def skew_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN state like a sparsity-trained model's: heavy-tailed |gamma| (0.5*|N(0,1)|^3),
    random betas and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.weight is not None:
                c = m.num_features
                m.weight.copy_(0.5 * torch.randn(c, generator=g).abs() ** 3)
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model


def bn_channels(model: nn.Module) -> int:
    return sum(m.num_features for m in model.modules() if isinstance(m, _BatchNorm))


def widths(model: nn.Module) -> dict[str, int]:
    """The channel width of every conv / linear / BN: none may reach 0."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[n] = min(m.in_channels, m.out_channels)
        elif isinstance(m, nn.Linear):
            out[n] = min(m.in_features, m.out_features)
        elif isinstance(m, _BatchNorm):
            out[n] = m.num_features
    return out


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return skew_bn(ZOO[name]()).eval()


def assert_same(a, b, **tol):
    """Outputs equal; a model may return a tensor or a list/tuple/dict of tensors."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k], **tol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y, **tol)
    else:
        torch.testing.assert_close(a, b, **tol)


def test_the_zoo_has_at_least_25_architectures():
    assert len(ZOO) >= 25


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_invariants(name, tmp_path):
    model = build(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    dense_bn = bn_channels(model)
    for p in PERCENTS:
        slim, report = prune(model, p, example_input=x[:1])
        masked, _ = prune(model, p, mode="mask", example_input=x[:1])
        slim.eval(), masked.eval()
        with torch.no_grad():
            y_slim, y_masked = slim(x), masked(x)
        assert_same(y_slim, y_masked, rtol=1e-4, atol=1e-5)
        assert min(widths(slim).values()) >= 1, f"{name} at {p}: a layer was emptied"
        removed_counted = dense_bn - bn_channels(slim)
        assert report["channels_total"] - report["channels_kept"] == removed_counted
        assert report["removed_share"] == removed_counted / dense_bn
        # save -> load into a fresh dense instance -> identical outputs
        save_checkpoint(tmp_path / "slim.pt", slim)
        torch.manual_seed(1)
        loaded, _ = load_checkpoint(tmp_path / "slim.pt", model=ZOO[name]())
        with torch.no_grad():
            assert_same(loaded(x), y_slim, rtol=0, atol=0)
        if p != 0.7:  # pruning again at one percent keeps the file's time down
            continue
        # prune the slim model again: it still slims, and slim == masked there too
        again, report2 = prune(skew_bn(loaded, seed=1), 0.5, example_input=x[:1])
        masked2, _ = prune(loaded, 0.5, mode="mask", example_input=x[:1])
        with torch.no_grad():
            assert_same(again.eval()(x), masked2.eval()(x), rtol=1e-4, atol=1e-5)
        assert bn_channels(again) == bn_channels(loaded) - (report2["channels_total"] - report2["channels_kept"])
    with torch.no_grad():  # the model itself is untouched
        assert_same(model(x), ref, rtol=0, atol=0)
