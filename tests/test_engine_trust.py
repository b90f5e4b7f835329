"""The engine never returns a wrong model: the cases issue 12 found, each as a test.

Every test here failed on the engine before its fix (see the commit messages).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import netslim
from netslim.checkpoint import load_checkpoint, save_checkpoint
from netslim.errors import PruneError
from netslim.layers import convert_sync_batchnorm, is_indexed_bn
from netslim.engine.prune import prune

from test_prune import SMALL, PostActNet, randomize_bn


def build(arch, seed=0):
    torch.manual_seed(seed)
    return randomize_bn(netslim.build_model(arch, num_classes=10, **SMALL[arch]), seed=seed).eval()


def pruned_factors(model):
    """{bn name: bool mask of channels whose factors the mask holds at zero}."""
    return {n: m.netslim_mask == 0 for n, m in model.named_modules()
            if isinstance(m, _BatchNorm) and "netslim_mask" in m._buffers}


def sgd_steps(model, steps=2):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()


def assert_pruned_factors_zero(model, zero):
    mods = dict(model.named_modules())
    assert zero and any(z.any() for z in zero.values())
    for n, z in zero.items():
        assert torch.all(mods[n].weight[z] == 0) and torch.all(mods[n].bias[z] == 0), n


@pytest.mark.parametrize("how", ["deepcopy", "mask-a-masked-model", "deepcopy-of-deepcopy"])
def test_mask_mode_survives_deepcopy_and_remasking(how):
    """MobileNetV2 lost 30-42 pruned factors after two SGD steps once deep-copied or re-masked."""
    masked, _ = prune(build("mobilenetv2"), 0.5, mode="mask")
    if how == "deepcopy":
        model = copy.deepcopy(masked)
    elif how == "deepcopy-of-deepcopy":
        model = copy.deepcopy(copy.deepcopy(masked))
    else:
        model, _ = prune(masked, 0.6, mode="mask")
    zero = pruned_factors(model)
    sgd_steps(model)
    assert_pruned_factors_zero(model, zero)


def test_remasking_keeps_the_earlier_mask():
    masked, _ = prune(build("mobilenetv2"), 0.5, mode="mask")
    again, _ = prune(masked, 0.3, mode="mask")  # a lower percent: the earlier zeros stay
    before, after = pruned_factors(masked), pruned_factors(again)
    for n, z in before.items():
        assert torch.all(after[n][z]), n


@pytest.mark.parametrize("arch", ["resnet", "densenet"])
def test_sync_batchnorm_conversion_keeps_the_channel_gathers(arch):
    slim, _ = prune(build(arch), 0.5)
    assert any(is_indexed_bn(m) for m in slim.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = slim(x)
    synced = convert_sync_batchnorm(copy.deepcopy(slim)).eval()
    assert not any(isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    with torch.no_grad():
        torch.testing.assert_close(synced(x), ref, rtol=0, atol=0)
    # and the engine still reads it: prune the converted model again
    again, _ = prune(synced, 0.3, example_input=x[:1])
    masked, _ = prune(synced, 0.3, mode="mask", example_input=x[:1])
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), masked.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("wrap", ["DataParallel", "compile"])
def test_wrapped_models_save_reloadable_files_and_prune(wrap, tmp_path):
    model = build("resnet-cifar")
    slim, _ = prune(model, 0.5)
    wrapped = nn.DataParallel(slim) if wrap == "DataParallel" else torch.compile(slim)
    path = tmp_path / "slim.pt"
    save_checkpoint(path, wrapped)
    loaded, meta = load_checkpoint(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), slim(x), rtol=0, atol=0)
    again, report = prune(nn.DataParallel(model) if wrap == "DataParallel" else torch.compile(model), 0.5)
    assert report["channels_kept"] < report["channels_total"]
    with torch.no_grad():
        torch.testing.assert_close(again(x), slim(x), rtol=0, atol=0)


def test_report_counts_bn_channels_and_units_separately():
    """resnet-cifar: coupled residual units span several BNs; the report counted units as channels."""
    model = build("resnet-cifar")
    slim, report = prune(model, 0.5)
    total = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    kept = sum(m.num_features for m in slim.modules() if isinstance(m, nn.BatchNorm2d))
    assert (report["channels_total"], report["channels_kept"]) == (total, kept)
    assert report["units_total"] < total and report["units_kept"] < kept  # coupled units
    assert sum(layer["channels"] for layer in report["layers"]) == total


def test_stored_mask_that_disagrees_with_the_weights_never_empties_a_layer():
    """A mask keeping only channels the plan would remove used to empty the layer (IndexError)."""
    model = randomize_bn(PostActNet()).eval()
    x = torch.randn(2, 3, 16, 16)
    g = model.b2.bn1.weight.detach().abs()
    low = torch.argsort(g)[:2].tolist()  # the mask keeps the two smallest factors of b2.bn1
    model.netslim_meta = {"mask": {"b2.bn1": low}}
    slim, report = prune(model, 0.9, example_input=x[:1])
    masked, _ = prune(model, 0.9, mode="mask", example_input=x[:1])
    assert 1 <= slim.b2.bn1.num_features <= 2
    assert all(w.num_features >= 1 for w in slim.modules() if isinstance(w, _BatchNorm))
    with torch.no_grad():
        torch.testing.assert_close(slim(x), masked(x), rtol=1e-4, atol=1e-5)
    model.netslim_meta = {"mask": {"b2.bn1": []}}  # a damaged mask that removes every channel
    slim, _ = prune(model, 0.5, example_input=x[:1])
    assert slim.b2.bn1.num_features == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_factors_are_an_error_naming_the_layers(bad):
    model = build("vgg")
    with torch.no_grad():
        model.feature[1].weight[3] = bad
    with pytest.raises(PruneError, match=r"not finite.*feature\.1"):
        prune(model, 0.5)
