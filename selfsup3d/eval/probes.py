"""Probes of frozen features, as pure functions and small modules (the online callback is
:class:`selfsup3d.callbacks.OnlineProbes`).

* :func:`global_features`: one vector per image from encoder tokens (class token, optionally with the
  mean patch token as in DINOv2's linear evaluation);
* :class:`LinearProbe`: a linear classifier on (batch-normalised, non-affine) global features;
* :func:`knn_predict`: weighted k-nearest-neighbour vote on cosine similarity (Wu et al. 2018, as in DINO);
* :class:`FeatureBank`: a first-in-first-out memory of features and labels for the kNN vote;
* :class:`DepthProbe`: a linear map from each patch token to the ``p × p`` depths of its patch;
* :func:`depth_probe_target`: the depth the probe regresses (raw, or divided by the image's median);
* :func:`token_cosine`: mean cosine similarity of two token sets (how far a student moved from its teacher).
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup3d.geometry.rays import unpatchify

FeatureKind = Literal["cls", "cls_avg"]
DepthTarget = Literal["raw", "median"]


class Tokens(Protocol):
    """What the probes read from an encoder output (:class:`~selfsup3d.encoders.EncoderOutput` has it)."""

    cls: Tensor
    patches: Tensor
    grid: tuple[int, int]


def global_features(features: Tokens, kind: FeatureKind = "cls_avg") -> Tensor:
    """``[B, D]`` class tokens (``cls``) or ``[B, 2D]`` class token and mean patch token (``cls_avg``)."""
    cls = features.cls.detach().float()
    if kind == "cls":
        return cls
    if kind == "cls_avg":
        return torch.cat([cls, features.patches.detach().float().mean(dim=1)], dim=-1)
    raise ValueError(f"feature kind must be 'cls' or 'cls_avg', got {kind!r}")


class LinearProbe(nn.Module):
    """Linear classifier on frozen global features; a non-affine BatchNorm standardises them first.

    Args:
        dim: feature width.
        num_classes: classes.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.norm(x))


def knn_predict(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> Tensor:
    """Weighted kNN classification on cosine similarity: each of the ``k`` nearest bank entries votes
    for its label with weight ``exp(similarity / temperature)``.

    Args:
        bank: ``[N, D]`` reference features.
        bank_labels: ``[N]`` their labels (entries with label < 0 are ignored).
        queries: ``[Q, D]`` features to classify.
        num_classes: classes.
        k: neighbours.
        temperature: softness of the vote.

    Returns:
        ``[Q]`` predicted labels (``-1`` when the bank holds no labelled entry).
    """
    keep = bank_labels >= 0
    bank, bank_labels = bank[keep], bank_labels[keep]
    if bank.shape[0] == 0:
        return torch.full((queries.shape[0],), -1, dtype=torch.long, device=queries.device)
    sim = F.normalize(queries.float(), dim=-1) @ F.normalize(bank.float(), dim=-1).T  # [Q, N]
    top, idx = sim.topk(min(k, bank.shape[0]), dim=-1)
    votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
    votes.scatter_add_(1, bank_labels[idx], (top / temperature).exp())
    return votes.argmax(dim=-1)


class FeatureBank:
    """A first-in-first-out memory of ``capacity`` feature vectors and their labels.

    Args:
        capacity: entries kept; the oldest are overwritten.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"bank capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.features: Tensor | None = None
        self.labels: Tensor | None = None
        self.ptr = 0
        self.size = 0

    def add(self, features: Tensor, labels: Tensor) -> None:
        """Append ``[B, D]`` features and ``[B]`` labels (detached)."""
        features, labels = features.detach(), labels.detach().long()
        if self.features is None or self.labels is None:
            self.features = features.new_zeros(self.capacity, features.shape[1])
            self.labels = labels.new_full((self.capacity,), -1)
        n = min(features.shape[0], self.capacity)
        features, labels = features[-n:], labels[-n:]
        idx = (torch.arange(n, device=features.device) + self.ptr) % self.capacity
        self.features[idx] = features.to(self.features)
        self.labels[idx] = labels.to(self.labels.device)
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def get(self) -> tuple[Tensor, Tensor]:
        """The filled entries: features ``[n, D]`` and labels ``[n]``."""
        if self.features is None or self.labels is None:
            raise ValueError("the feature bank is empty")
        return self.features[: self.size], self.labels[: self.size]

    def __len__(self) -> int:
        return self.size


class DepthProbe(nn.Module):
    """Dense linear probe: each patch token maps linearly to the ``p × p`` depths of its patch.

    Args:
        dim: token width.
        patch_size: encoder patch size ``p``.
    """

    def __init__(self, dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.linear = nn.Linear(dim, patch_size * patch_size)

    def forward(self, patches: Tensor, grid: tuple[int, int]) -> Tensor:
        """Patch tokens ``[B, h·w, D]`` to a depth map ``[B, 1, h·p, w·p]``."""
        p = self.patch_size
        return unpatchify(self.linear(patches.float()), p, grid[0] * p, grid[1] * p)


def depth_probe_target(depth: Tensor, size: tuple[int, int], mode: DepthTarget = "median") -> tuple[Tensor, Tensor]:
    """The depth a probe regresses at ``size`` and its validity mask, both ``[B, 1, H, W]``.

    ``raw`` keeps the depth's units; ``median`` divides each map by its median valid depth (scale-free,
    for data whose scale varies per image, e.g. pseudo depth or cameras at random distances). Depth 0 or
    non-finite is unknown; resizing is nearest-neighbour so unknown pixels stay unknown.
    """
    if depth.shape[-2:] != size:
        depth = F.interpolate(depth.float(), size=size, mode="nearest")
    valid = torch.isfinite(depth) & (depth > 0)
    depth = torch.where(valid, depth, torch.zeros_like(depth)).float()
    if mode == "median":
        flat = torch.where(valid, depth, torch.full_like(depth, float("nan"))).flatten(1)
        med = torch.nan_to_num(torch.nanmedian(flat, dim=1).values, nan=1.0).clamp(min=1e-6)
        depth = depth / med.view(-1, 1, 1, 1)
    elif mode != "raw":
        raise ValueError(f"depth target must be 'raw' or 'median', got {mode!r}")
    return depth, valid


def squared_error(pred: Tensor, target: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of squared errors over valid pixels and their count (for an RMSE over a data set)."""
    valid = valid.to(pred.dtype)
    return (((pred.float() - target.float()) ** 2) * valid).sum(), valid.sum()


def token_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Mean cosine similarity of matching tokens ``[..., D]`` of ``a`` and ``b``."""
    return F.cosine_similarity(a.detach().float(), b.detach().float(), dim=-1).mean()
