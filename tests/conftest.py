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


@pytest.fixture
def no_network(monkeypatch, tmp_path) -> list[str]:
    """A machine without network, as a user meets it: offline mode off, an empty Hugging Face cache, every
    host name fails to resolve, and retry back-off sleeps return at once. Yields the hosts that were tried."""
    import socket
    import time

    from huggingface_hub import constants

    tried: list[str] = []

    def unresolvable(host, *args, **kwargs):
        tried.append(str(host))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    return tried
