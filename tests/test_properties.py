"""Property tests: random models, factors, percents and guards; random damage to files.

Bounded so the suite stays fast: NETSLIM_EXAMPLES scales every example count (default 1;
`NETSLIM_EXAMPLES=20 pytest tests/test_properties.py --hypothesis-show-statistics` for a
thorough run).
"""
import gzip
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.modules.batchnorm import _BatchNorm

import netslim.models as M
from netslim.checkpoint import load_checkpoint, save_checkpoint
from netslim.data import load_dataset
from netslim.errors import CheckpointError, DatasetError
from netslim.profile import count
from netslim.engine.prune import prune

TINY = {
    "vgg": dict(depth=11, width=0.125),
    "resnet": dict(depth=11),
    "densenet": dict(depth=7, growth_rate=4),
    "resnet-cifar": dict(depth=8),
    "mobilenetv2": dict(width_mult=0.1),
    "mlp": dict(hidden=(24, 16), image_size=8),
}
SHAPES = {"mlp": (1, 8, 8)}
_cache = {}


def tiny(arch):
    if arch not in _cache:
        shape = SHAPES.get(arch, (3, 32, 32))
        torch.manual_seed(0)
        model = M.build_model(arch, num_classes=5, in_channels=shape[0], **TINY[arch]).eval()
        _cache[arch] = (model, shape)
    return _cache[arch]


def set_bn(model, seed):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            n = m.num_features
            with torch.no_grad():
                # many exact ties and zeros too: the threshold rule must cope with them
                m.weight.copy_(torch.randint(-3, 4, (n,), generator=g).float() * torch.rand(n, generator=g) ** 2)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.3)


SCALE = float(os.environ.get("NETSLIM_EXAMPLES", "1"))


def n(k: int) -> int:
    return max(1, int(k * SCALE))


SETTINGS = settings(max_examples=n(8), deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@SETTINGS
@given(arch=st.sampled_from(sorted(TINY)), seed=st.integers(0, 10_000),
       percent=st.floats(0, 0.99, allow_nan=False), min_channels=st.integers(1, 4),
       cap=st.one_of(st.none(), st.floats(0.1, 1.0)), round_to=st.sampled_from([1, 1, 2, 4, 8]),
       score=st.sampled_from(["max", "mean", "sum"]))
def test_prune_invariants(tmp_path_factory, arch, seed, percent, min_channels, cap, round_to, score):
    model, shape = tiny(arch)
    set_bn(model, seed)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed))
    opts = dict(min_channels=min_channels, max_layer_percent=cap, round_to=round_to, group_score=score,
                example_input=x[:1])
    slim, report = prune(model, percent, **opts)
    masked, _ = prune(model, percent, mode="mask", **opts)
    with torch.no_grad():
        torch.testing.assert_close(slim.eval()(x), masked.eval()(x), rtol=1e-4, atol=1e-5)
    removed_bns = {n for block in report["removed_blocks"] for n in block["bns"]}
    for layer in report["layers"]:
        if set(layer["bns"]) <= removed_bns:  # a residual branch removed whole (blocks.py)
            assert layer["kept"] == 0
            continue
        assert layer["kept"] >= min(min_channels, layer["total"])
        if cap is not None:
            assert layer["total"] - layer["kept"] <= int(layer["total"] * cap)
    before, after = report["before"], report["after"]
    assert after["params"] <= before["params"] and after["flops"] <= before["flops"]
    # pruning again composes, and both round-trip through a file exactly
    again, _ = prune(slim, percent / 2, example_input=x[:1])
    path = tmp_path_factory.mktemp("ck") / "a.pt"
    save_checkpoint(path, again, arch={"name": arch, "num_classes": 5, "in_channels": shape[0], **TINY[arch]})
    loaded, _ = load_checkpoint(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), again.eval()(x))
    assert count(loaded, example_input=x[:1]) == count(again, example_input=x[:1])


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    model, shape = tiny("vgg")
    path = tmp_path_factory.mktemp("good") / "c.pt"
    save_checkpoint(path, model, arch={"name": "vgg", "num_classes": 5, **TINY["vgg"]})
    return path.read_bytes()


@settings(max_examples=n(40), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_checkpoints_give_the_clean_error(tmp_path_factory, good_checkpoint, data):
    raw = bytearray(good_checkpoint)
    how = data.draw(st.sampled_from(["truncate", "flip", "random"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 20))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    else:
        raw = bytearray(data.draw(st.binary(max_size=2048)))
    path = tmp_path_factory.mktemp("bad") / "c.pt"
    path.write_bytes(bytes(raw))
    try:
        load_checkpoint(path)
    except CheckpointError as e:
        assert "\n" not in str(e)
    # a flip inside tensor payload bytes may leave a loadable file with other weights: fine


def _idx(images: torch.Tensor) -> bytes:
    n = images.shape[0]
    header = (2051).to_bytes(4, "big") + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    return gzip.compress(header + images.numpy().tobytes())


def _labels(y: torch.Tensor) -> bytes:
    return gzip.compress((2049).to_bytes(4, "big") + len(y).to_bytes(4, "big") + y.numpy().astype("uint8").tobytes())


@settings(max_examples=n(30), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_dataset_files_give_the_clean_error(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("fm") / "fashion-mnist"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    files = {
        "train-images-idx3-ubyte.gz": _idx(torch.randint(0, 256, (8, 28, 28), generator=g, dtype=torch.uint8)),
        "train-labels-idx1-ubyte.gz": _labels(torch.randint(0, 10, (8,), generator=g)),
        "t10k-images-idx3-ubyte.gz": _idx(torch.randint(0, 256, (4, 28, 28), generator=g, dtype=torch.uint8)),
        "t10k-labels-idx1-ubyte.gz": _labels(torch.randint(0, 10, (4,), generator=g)),
    }
    victim = data.draw(st.sampled_from(sorted(files)))
    raw = bytearray(files[victim])
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        body = gzip.decompress(bytes(raw))
        raw = bytearray(gzip.compress(body[: data.draw(st.integers(0, len(body) - 1))]))
    files[victim] = bytes(raw)
    for name, content in files.items():
        (root / name).write_bytes(content)
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist", data_dir=str(root.parent))
    assert "\n" not in str(e.value)
