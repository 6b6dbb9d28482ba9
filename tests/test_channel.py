import copy

import pytest
import torch
from torch import nn

from edgesparse import compress
from edgesparse.errors import EdgesparseError
from edgesparse.recipe import PruneConfig, Recipe


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.expand = nn.Conv2d(16, 64, 1)
        self.bn = nn.BatchNorm2d(64)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.project = nn.Conv2d(64, 24, 1)
        self.head = nn.Linear(24 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.dw(torch.relu(self.bn(self.expand(x))))
        x = torch.relu(self.project(torch.relu(x)))
        return self.head(torch.flatten(x, 1))


def randomize_bn(bn):
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)


def test_channel_pruning_gives_smaller_dense_model_equal_on_kept_channels():
    net = Net().eval()
    randomize_bn(net.bn)
    original = copy.deepcopy(net)
    x = torch.randn(2, 3, 4, 4)
    result = compress(net, Recipe(prune=PruneConfig(sparsity=0.5, pattern="channel")), example_inputs=(x,))
    plans = {p.name: p for p in result.layers}
    assert net.expand.out_channels == 32 and net.bn.num_features == 32
    assert net.dw.groups == 32 and net.dw.out_channels == 32
    assert net.project.in_channels == 32
    assert net.project.out_channels == 12 and net.head.in_features == 12 * 16  # flatten rewired
    assert plans["expand"].shape_after == [32, 16, 1, 1]
    assert plans["stem"].pattern is None and plans["head"].pattern is None
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in original.parameters())

    # the pruned layer equals the original on the channels it kept
    feats = torch.relu(original.stem(x))
    keep = torch.sort(torch.topk(original.expand.weight.abs().reshape(64, -1).sum(1), 32).indices).values
    assert torch.allclose(net.expand(feats), original.expand(feats)[:, keep], atol=1e-6)

    # the whole model equals the original with the removed channels' readers zeroed
    # project was ranked after losing its input columns, so rank it the same way here
    keep_p = torch.sort(torch.topk(original.project.weight[:, keep].abs().reshape(24, -1).sum(1), 12).indices).values
    reference = copy.deepcopy(original)
    with torch.no_grad():
        dropped = torch.ones(64, dtype=torch.bool)
        dropped[keep] = False
        reference.project.weight[:, dropped] = 0
        dropped_p = torch.ones(24, dtype=torch.bool)
        dropped_p[keep_p] = False
        cols = dropped_p.repeat_interleave(16)
        reference.head.weight[:, cols] = 0
    assert torch.allclose(net(x), reference(x), atol=1e-5)


def test_residual_producer_is_left_whole_with_reason():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 8, 1)
            self.c = nn.Conv2d(8, 8, 1)
            self.d = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            h = self.a(x)
            return self.d(self.c(h + self.b(h)))

    net = Res().eval()
    result = compress(net, Recipe(prune=PruneConfig(sparsity=0.5, pattern="channel")), example_inputs=(torch.randn(1, 3, 4, 4),))
    plans = {p.name: p for p in result.layers}
    assert net.b.out_channels == 8 and "reaches" in plans["b"].reason
    assert net.c.out_channels == 4 and plans["c"].pattern == "channel"
    assert net.d.in_channels == 4


def test_channel_pruning_untraceable_model_errors():
    class Dyn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            if x.sum() > 0:
                return self.c(self.b(self.a(x)))
            return self.c(self.b(self.a(-x)))

    with pytest.raises(EdgesparseError, match="fx-traceable"):
        compress(Dyn(), Recipe(prune=PruneConfig(sparsity=0.5, pattern="channel")), example_inputs=(torch.randn(1, 4),))
