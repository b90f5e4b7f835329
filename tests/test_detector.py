"""Detection-style graphs: iterating chunk/split results, list/dict outputs, heads kept."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from netslim.errors import PruneError
from netslim.engine.prune import prune
from test_zoo import assert_same, build, skew_bn


class IteratedParts(nn.Module):
    """The three ways user code iterates a channel split, and a dict output."""

    def __init__(self):
        super().__init__()
        self.cv1 = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.m = nn.ModuleList(nn.Sequential(nn.Conv2d(4, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4), nn.SiLU())
                               for _ in range(2))
        self.cv2 = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.out_a, self.out_b = nn.Conv2d(8, 3, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))                 # list() of a literal chunk
        y.extend(m(y[-1]) for m in self.m)
        z = self.cv2(torch.cat(y, 1))
        parts = [p * 2 for p in torch.split(z, [4, 4], 1)]  # a for loop over a literal split
        return {"a": self.out_a(z), "b": self.out_b(parts[1])}


def test_iterating_literal_chunk_and_split_and_dict_outputs():
    model = skew_bn(IteratedParts()).eval()
    x = torch.randn(2, 3, 8, 8)
    for p in (0.3, 0.6):
        slim, report = prune(model, p, example_input=x[:1])
        masked, _ = prune(model, p, mode="mask", example_input=x[:1])
        with torch.no_grad():
            out = slim.eval()(x)
            assert_same(out, masked.eval()(x), rtol=1e-4, atol=1e-5)
        assert out["a"].shape[1] == 3 and out["b"].shape[1] == 2
        assert report["channels_kept"] < report["channels_total"]


class SplitBySize(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.cat(list(self.bn(self.conv(x)).split(4, 1)), 1)  # count known only from shapes


def test_iterating_a_split_of_unknown_count_is_still_an_error():
    with pytest.raises(PruneError, match="cannot be iterated"):
        prune(SplitBySize(), 0.5, example_input=torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("percent", [0.3, 0.5])
def test_detector_heads_keep_their_outputs(percent):
    model = build("yolov8-style")
    x = torch.randn(2, 3, 32, 32)
    slim, report = prune(model, percent, example_input=x[:1])
    finals = {n: m.out_channels for n, m in model.head.named_modules() if isinstance(m, nn.Conv2d) and m.bias is not None}
    assert sorted(set(finals.values())) == [2, 4] and len(finals) == 6
    for n, c in finals.items():
        assert slim.head.get_submodule(n).out_channels == c
    assert abs(report["removed_share"] - percent) < 0.05
    with torch.no_grad():
        outs = slim.eval()(x)
    assert [tuple(o.shape[1:]) for o in outs] == [(6, 4, 4), (6, 2, 2), (6, 1, 1)]
