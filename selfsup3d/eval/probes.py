"""Classification probes of frozen features, as small modules and functions (used by ``selfsup3d probe`` and
:class:`selfsup3d.callbacks.ProbeCallback`).

* :class:`LinearProbe`: a linear classifier on (batch-normalised, non-affine) global features;
* :func:`knn_predict`: weighted k-nearest-neighbour vote on cosine similarity (Wu et al. 2018, as in DINO);
* :class:`FeatureBank`: a first-in-first-out memory of features and labels for the kNN vote.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup3d.errors import require


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
        require(capacity >= 1, "bank capacity", ">= 1", capacity, ValueError)
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
