"""Checkpoints: weights-only safety, atomic writes, clear errors, the seed's files."""
import os

import pytest
import torch
from torch import nn

from netslim.checkpoint import (FORMAT, load_any_checkpoint, load_checkpoint,
                                read_checkpoint, save_checkpoint)
from netslim.errors import CheckpointError
from netslim.layers import is_indexed_bn
from netslim.models import build_model
from netslim.engine.prune import prune

from test_prune import randomize_bn


def small(arch):
    depth = {"vgg": 11, "resnet": 11, "densenet": 10}[arch]
    return depth, randomize_bn(build_model(arch, depth=depth, num_classes=10)).eval()


def seed_state(model):
    """What the seed's scripts would save for `model`: full-width BNs + channel_selection indexes."""
    sd = model.state_dict()
    state = {k: v.clone() for k, v in sd.items() if not k.endswith("keep_index")}
    for name, m in model.named_modules():
        if not is_indexed_bn(m):
            continue
        prefix = name[: -len("bn1")] if name.endswith("bn1") else name[: -len("bn")]
        width = m._stream_width
        idx = torch.zeros(width)
        idx[m.keep_index] = 1
        state[prefix + "select.indexes"] = idx
        for t in ("weight", "bias", "running_mean", "running_var"):
            full = torch.full((width,), 7.0)  # the seed's pruned-away values: must be sliced off
            full[m.keep_index] = sd[f"{name}.{t}"]
            state[f"{name}.{t}"] = full
    return state


def stream_widths(model, dense):
    """Record each gather BN's input width (the dense BN's width) on the slim module."""
    dense_mods = dict(dense.named_modules())
    for name, m in model.named_modules():
        if is_indexed_bn(m):
            m._stream_width = dense_mods[name].num_features


@pytest.mark.parametrize("arch", ["vgg", "resnet", "densenet"])
def test_seed_training_checkpoint_imports(arch, tmp_path):
    depth, model = small(arch)
    state = model.state_dict()
    if arch in ("resnet", "densenet"):  # the seed's dense models carry all-ones selection layers
        for name, m in model.named_modules():
            if name.endswith("bn1") and arch == "resnet" or (arch == "densenet" and name.endswith("bn1")):
                state[name[:-3] + "select.indexes"] = torch.ones(m.num_features)
        state["select.indexes"] = torch.ones(model.bn.num_features)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 160, "best_prec1": 93.5, "state_dict": state,
                "optimizer": {"state": {}, "param_groups": []}}, path)
    loaded, meta = load_any_checkpoint(path, arch=arch, depth=depth, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert meta["metrics"]["best_prec1"] == 93.5 and meta["mode"] == "dense"
    with pytest.raises(CheckpointError, match="--arch"):
        load_any_checkpoint(path)
    with pytest.raises(CheckpointError, match="check --arch"):
        load_any_checkpoint(path, arch=arch, depth=depth + (9 if arch == "resnet" else 3 if arch == "densenet" else 2),
                            num_classes=10)


@pytest.mark.parametrize("arch", ["vgg", "resnet", "densenet"])
def test_seed_pruned_checkpoint_imports(arch, tmp_path):
    depth, model = small(arch)
    slim, _ = prune(model, 0.5, compensate=False)  # the seed's pruning: its architectures have no added biases
    stream_widths(slim, model)
    state = seed_state(slim)
    widths = [m.num_features for m in slim.modules() if isinstance(m, nn.BatchNorm2d)]
    path = tmp_path / "pruned.pth.tar"
    torch.save({"cfg": widths, "state_dict": state}, path)
    loaded, meta = load_any_checkpoint(path, arch=arch, depth=depth, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), slim(x), rtol=0, atol=0)
    assert meta["mode"] == "slim"
    # the import is an ordinary netslim model from then on: save, reload from the file alone
    save_checkpoint(tmp_path / "netslim.pt", loaded)
    again, _ = load_checkpoint(tmp_path / "netslim.pt")
    with torch.no_grad():
        torch.testing.assert_close(again(x), slim(x), rtol=0, atol=0)


def test_save_is_atomic_and_weights_only(tmp_path):
    _, model = small("vgg")
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, arch={"name": "vgg", "depth": 11})
    assert torch.load(path, weights_only=True)["format"] == FORMAT
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/netslim-pwned",))


def test_unsafe_and_broken_files_are_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "x": Evil()}, evil)
    with pytest.raises(CheckpointError, match="carry code"):
        read_checkpoint(evil)
    assert not os.path.exists("/tmp/netslim-pwned")
    _, model = small("vgg")
    good = tmp_path / "good.pt"
    save_checkpoint(good, model, arch={"name": "vgg", "depth": 11})
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_checkpoint(tmp_path / "trunc.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_checkpoint(tmp_path / "text.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read_checkpoint(tmp_path / "list.pt")
    obj = torch.load(good, weights_only=True)
    obj["format"] = "netslim-checkpoint/99"
    torch.save(obj, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="newer netslim"):
        read_checkpoint(tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_checkpoint(tmp_path)
    obj = torch.load(good, weights_only=True)
    obj["arch"] = {"name": "vgg", "depth": 13}
    torch.save(obj, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(tmp_path / "other.pt")
