"""Third-party-style model code for the export tests: convs and linears as subclasses of
nn.Conv2d / nn.Linear (static same padding in forward, as several public model zoos write them),
a BatchNorm after each conv, and layers whose forward is not what their class suggests."""

import torch
import torch.nn.functional as F
from torch import nn


class Conv2dStaticSame(nn.Conv2d):
    """Pads by zero in forward (TensorFlow's SAME), then convolves its own weight unpadded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ph, pw = max(kh - sh, 0), max(kw - sw, 0)
        self.static_pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)

    def forward(self, x):
        return F.conv2d(F.pad(x, self.static_pad), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """Weight-standardized conv: a 1x1 conv by shape, but not of its stored weight."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias)


class Dense(nn.Linear):
    pass


class ScaledLinear(nn.Linear):
    """A Linear subclass whose forward scales its output: not swappable as a plain linear."""

    def forward(self, x):
        return 2.0 * super().forward(x)


def _block(cin, cout, conv=Conv2dStaticSame, **kwargs):
    return nn.Sequential(conv(cin, cout, bias=False, **kwargs), nn.BatchNorm2d(cout), nn.ReLU6())


class ZooNet(nn.Module):
    """Stem, two inverted-residual-like blocks (1x1 expand, 3x3 depthwise, 1x1 project), a head."""

    def __init__(self, odd_layers: bool = False):
        super().__init__()
        self.stem = _block(3, 32, kernel_size=3, stride=2)
        self.expand = _block(32, 96, kernel_size=1)
        self.depthwise = _block(96, 96, kernel_size=3, groups=96)
        self.project = nn.Sequential(Conv2dStaticSame(96, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.expand2 = _block(32, 128, StdConv2d if odd_layers else Conv2dStaticSame, kernel_size=1)
        self.project2 = nn.Sequential(Conv2dStaticSame(128, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.fc = (ScaledLinear if odd_layers else Dense)(32, 64)
        self.classifier = Dense(64, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.depthwise(self.expand(x)))
        x = x + self.project2(self.expand2(x))
        return self.classifier(F.relu(self.fc(x.mean((2, 3)))))


def _randomize_bn(model):
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model


def make():
    torch.manual_seed(0)
    return _randomize_bn(ZooNet()).eval(), (torch.rand(1, 3, 32, 32),)


def make_odd():
    torch.manual_seed(0)
    return _randomize_bn(ZooNet(odd_layers=True)).eval(), (torch.rand(1, 3, 32, 32),)


def make_two_layer_ffn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).eval(), (torch.randn(4, 64),)


def make_raising():
    raise FileNotFoundError("pretrained weights not found: /nowhere/weights.pt")


class FFNStack(nn.Module):
    """Two BERT-style feed-forward blocks (in -> 4 in -> in, GELU, residual) between an input
    projection and a head: the middle four linears are the ones a prune recipe reaches."""

    def __init__(self, dim: int = 128):
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(nn.Sequential(Dense(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)) for _ in range(2))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def make_ffn_stack():
    torch.manual_seed(0)
    return FFNStack().eval(), (torch.randn(8, 128),)
