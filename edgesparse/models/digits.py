"""demo:digits-cnn: a MobileNet-style CNN (depthwise 3x3 + pointwise 1x1 blocks) trained on
scikit-learn's bundled 8x8 digits in seconds; the weights are cached after the first training."""

from __future__ import annotations

import torch
from torch import nn

from edgesparse import _progress
from edgesparse._io import atomic_path, cache_dir
from edgesparse.models import ModelBundle

CACHE_NAME = "digits-cnn-v1.pt"
SEED = 0


def _dw_pw(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
    )


class DigitsCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(_dw_pw(32, 64, 1), _dw_pw(64, 128, 2), _dw_pw(128, 128, 1), _dw_pw(128, 256, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(256, classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.blocks(self.stem(x)))))


def load_data():
    """Stratified 80/20 split of sklearn's digits (1437 train / 360 held-out), scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return xtr, ytr, xte, yte


def accuracy(predict, x, y, batch: int = 128) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((predict(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return correct / len(x)


def make_finetune(xtr, ytr, lr: float = 2e-3, batch: int = 64):
    """One-step training hook; the optimizer is built at step 0 from the model it is given."""
    state = {}

    def step(model: nn.Module, index: int) -> float:
        if index == 0 or state.get("model") is not model:
            state.update(model=model, opt=torch.optim.Adam(model.parameters(), lr=lr), gen=torch.Generator().manual_seed(index))
        if index % (len(xtr) // batch) == 0:
            state["order"] = torch.randperm(len(xtr), generator=state["gen"])
        start = (index % (len(xtr) // batch)) * batch
        idx = state["order"][start : start + batch]
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        state["opt"].zero_grad()
        loss.backward()
        state["opt"].step()
        return loss.item()

    return step


def train(xtr, ytr, epochs: int = 20, batch: int = 64) -> DigitsCNN:
    torch.manual_seed(SEED)
    model = DigitsCNN()
    steps_per_epoch = len(xtr) // batch
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    with _progress.bar("training demo:digits-cnn", epochs * steps_per_epoch) as advance:
        for _ in range(epochs):
            order = torch.randperm(len(xtr), generator=gen)
            for s in range(steps_per_epoch):
                idx = order[s * batch : (s + 1) * batch]
                loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                advance(info=f"loss {loss.item():.3f}")
    return model.eval()


def pretrained() -> DigitsCNN:
    """The trained model, from the cache or trained now (about 10-30 s on 2 cores)."""
    xtr, ytr, _, _ = load_data()
    path = cache_dir() / CACHE_NAME
    model = DigitsCNN()
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception:
            path.unlink(missing_ok=True)  # a corrupt cache is retrained, not trusted
    model = train(xtr, ytr)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model


def bundle() -> ModelBundle:
    xtr, ytr, xte, yte = load_data()
    model = pretrained()
    return ModelBundle(
        name="demo:digits-cnn",
        model=model,
        example_inputs=(xte[:1],),
        evaluate=lambda predict: accuracy(predict, xte, yte),
        calib=lambda: ((xtr[i : i + 1],) for i in range(0, len(xtr), 7)),
        finetune=lambda: make_finetune(xtr, ytr),
        sample_inputs=[(xte[i : i + 1],) for i in range(8)],
        notes=["sklearn digits: 1437 train / 360 held-out (stratified, random_state=0)"],
    )
