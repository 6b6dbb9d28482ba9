"""Shared fixtures. Slow (end-to-end) tests are moved to the end so fast failures show first."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("EDGESPARSE_QUIET", "1")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits():
    """The trained demo:digits-cnn bundle (trained once and cached)."""
    from edgesparse.models import load_model

    return load_model("demo:digits-cnn")
