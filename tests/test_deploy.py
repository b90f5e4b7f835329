"""Deployment speed: latency in onnxruntime, latency targets, the deploy benchmark's smoke run."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from netslim import cli
from netslim.errors import ConfigError
from netslim.profile import measure_latency, profile


def small_cnn(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()


def run(argv):
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


# ---------------------------------------------------------------------------------------------
# Latency in onnxruntime

def test_onnxruntime_latency_narrower_is_faster():
    wide, narrow = small_cnn(64), small_cnn(16)   # 4x fewer channels: ~16x fewer MACs
    kw = dict(batch_sizes=(1, 8), threads=1, target_seconds=0.05, runtime="onnxruntime")
    fast = slow = float("inf")
    for _ in range(2):  # interleaved, best of two: robust against bursts of load
        slow = min(slow, measure_latency(wide, (3, 32, 32), **kw)[8])
        fast = min(fast, measure_latency(narrow, (3, 32, 32), **kw)[8])
    assert fast < 0.5 * slow


def test_profile_says_which_runtime_and_rejects_unknown_ones():
    net = small_cnn(8).train()
    out = profile(net, (3, 16, 16), batch_sizes=(1, 2), repeats=2, warmup=1, runtime="onnxruntime",
                  memory=False, threads=1)
    assert out["runtime"] == "onnxruntime" and out["threads"] == 1
    assert set(out["latency_ms"]) == {1, 2} and all(v > 0 for v in out["latency_ms"].values())
    assert net.training  # exported in eval mode, the caller's mode restored
    assert profile(net, (3, 16, 16), latency=False, memory=False)["runtime"] == "torch"
    with pytest.raises(ConfigError, match="runtime 'tensorrt' is not known"):
        measure_latency(net, (3, 16, 16), runtime="tensorrt")
    with pytest.raises(ConfigError, match="onnxruntime latency runs on the CPU in float32"):
        measure_latency(net, (3, 16, 16), runtime="onnxruntime", channels_last=True)


def test_profile_command_onnxruntime(capsys):
    argv = ["profile", "--arch", "vgg", "--depth", "11", "--width", "0.125", "--dataset", "fashion-mnist",
            "--runtime", "onnxruntime", "--threads", "1", "--batch-sizes", "1,4"]
    assert run(argv + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["runtime"] == "onnxruntime" and result["threads"] == 1
    assert sorted(result["latency_ms"]) == ["1", "4"] and all(v > 0 for v in result["latency_ms"].values())
    assert run(argv) == 0
    assert "latency batch 4: " in (text := capsys.readouterr().out) and "(onnxruntime, cpu, 1 threads)" in text
    assert run(argv[:-4] + ["--runtime", "tvm"]) == 2
    assert "invalid choice: 'tvm'" in capsys.readouterr().err
