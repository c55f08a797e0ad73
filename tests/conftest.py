"""Shared fixtures: tiny encoders and a toy objective/datamodule, all CPU and offline."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may touch the network

from selfsup3d.encoders import ViTEncoder  # noqa: E402


@pytest.fixture(autouse=True)
def _single_thread() -> None:
    # pytest-xdist runs one process per core; more torch threads per process only contend.
    torch.set_num_threads(1)


def tiny_encoder(**kwargs) -> ViTEncoder:
    """A 2-block, 32-wide ViT at 32x32 with patch 8: builds and runs in milliseconds."""
    cfg = dict(name="tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_out_layers=2)
    cfg.update(kwargs)
    return ViTEncoder(**cfg)


@pytest.fixture
def encoder() -> ViTEncoder:
    torch.manual_seed(0)
    return tiny_encoder()
