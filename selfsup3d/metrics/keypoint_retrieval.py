"""2D -> 3D scene retrieval and duplicate-scene detection with descriptor-decorated key points.

A scene is summarised by its 3D key points (:class:`~selfsup3d.heads.keypoints.KeypointSet`: descriptors and
weights, padded to a common count, weight 0 in empty slots); a query image by its 2D key points, the same way.
Sets are compared by their descriptors alone (positions differ in frame between an image and a scene):

* ``best_match``: the weighted mean over the query's key points of the cosine to their best match in the
  scene (asymmetric: "how much of the query is found in the scene");
* ``chamfer``: the mean of ``best_match`` both ways (symmetric, for scene-vs-scene duplicates);
* ``mutual``: as ``best_match``, but a query key point only scores when it and its best match are each
  other's nearest neighbours (0 otherwise), which discounts descriptors that match everything.

Weights are non-negative (e.g. ``sigmoid`` of the scores, or 1 for every valid key point).

Metrics: :func:`retrieval_accuracy` (top-k over all scenes of the database) and
:func:`duplicate_auroc` (ROC AUC of pair similarities, with ``torchmetrics``'s ``binary_auroc``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc

from selfsup3d.datamodules.views import select_views
from selfsup3d.errors import require
from selfsup3d.heads.keypoints import KeypointSet

SetSimilarity = Literal["best_match", "chamfer", "mutual"]


def _directed(qd: Tensor, qw: Tensor, sd: Tensor, sw: Tensor, mutual: bool) -> Tensor:
    """Weighted mean best-match cosine from query sets ``[Q, M, E]`` to scene sets ``[S, N, E]`` -> ``[Q, S]``."""
    cos = torch.einsum("qme,sne->qsmn", qd, sd)  # [Q, S, M, N]
    neg = torch.finfo(cos.dtype).min
    cos = cos.masked_fill(~(sw > 0)[None, :, None, :], neg)
    best, arg = cos.max(dim=-1)  # [Q, S, M]
    if mutual:
        cos_q = cos.masked_fill(~(qw > 0)[:, None, :, None], neg)
        back = cos_q.argmax(dim=-2)  # [Q, S, N]: best query key point of each scene key point
        is_mutual = back.gather(-1, arg) == torch.arange(qd.shape[1], device=qd.device)
        best = torch.where(is_mutual, best, torch.zeros_like(best))
    has_scene = (sw > 0).any(dim=-1)[None, :, None]
    best = torch.where(has_scene, best, torch.zeros_like(best))
    w = qw[:, None, :]
    return (best * w).sum(-1) / w.sum(-1).clamp(min=1e-12)


def set_similarity(
    queries: KeypointSet, scenes: KeypointSet, mode: SetSimilarity = "best_match", chunk: int = 16
) -> Tensor:
    """Similarity of every query set to every scene set.

    Args:
        queries: ``Q`` sets (``[Q, M, E]``).
        scenes: ``S`` sets (``[S, N, E]``), same descriptor size.
        mode: ``best_match``, ``chamfer`` or ``mutual`` (module docstring).
        chunk: queries compared at once (memory is ``chunk * S * M * N``).

    Returns:
        ``[Q, S]`` similarities in ``[-1, 1]``; 0 for empty sets.
    """
    if queries.descriptors.shape[-1] != scenes.descriptors.shape[-1]:
        raise ValueError(
            f"descriptor sizes differ: queries {queries.descriptors.shape[-1]}, scenes {scenes.descriptors.shape[-1]}"
        )
    require(
        mode in ("best_match", "chamfer", "mutual"), "mode", "'best_match', 'chamfer' or 'mutual'", mode, ValueError
    )
    qd, sd = F.normalize(queries.descriptors, dim=-1), F.normalize(scenes.descriptors, dim=-1)
    qw, sw = queries.weights, scenes.weights
    rows = []
    for start in range(0, qd.shape[0], chunk):
        q, w = qd[start : start + chunk], qw[start : start + chunk]
        sim = _directed(q, w, sd, sw, mutual=mode == "mutual")
        if mode == "chamfer":
            sim = 0.5 * (sim + _directed(sd, sw, q, w, mutual=False).T)
        rows.append(sim)
    return torch.cat(rows, dim=0)


def retrieval_accuracy(similarity: Tensor, truth: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k retrieval accuracy: the share of queries whose true scene ranks among the ``k`` most similar.

    Ties count against the query: the rank of the true scene is the number of *other* scenes at least as
    similar, so a constant similarity scores 0 at top-1 (not a lucky draw).

    Args:
        similarity: ``[Q, S]`` query-to-scene similarities.
        truth: ``[Q]`` index of each query's scene.
        ks: the cut-offs.

    Returns:
        ``{"top1": ..., "top5": ...}`` (one key per ``k``), in ``[0, 1]``.
    """
    if similarity.ndim != 2 or truth.shape != similarity.shape[:1]:
        raise ValueError(f"need similarity [Q, S] and truth [Q], got {tuple(similarity.shape)}, {tuple(truth.shape)}")
    q, s = similarity.shape
    if q == 0:
        raise ValueError("retrieval_accuracy needs at least one query")
    if ((truth < 0) | (truth >= s)).any():
        raise ValueError(f"truth indices must be in [0, {s}), got {truth.min().item()}..{truth.max().item()}")
    true_sim = similarity.gather(1, truth.view(-1, 1))
    others = torch.ones_like(similarity, dtype=torch.bool).scatter_(1, truth.view(-1, 1), False)
    rank = ((similarity >= true_sim) & others).sum(dim=1)
    return {f"top{k}": float((rank < k).float().mean()) for k in ks}


def duplicate_auroc(scores: Tensor, is_duplicate: Tensor) -> float:
    """ROC AUC of pair similarities for "the same scene" (``torchmetrics`` ``binary_auroc``).

    Args:
        scores: ``[P]`` similarity of each pair.
        is_duplicate: ``[P]`` bool or {0, 1}: both members come from the same scene.

    Returns:
        The AUC in ``[0, 1]`` (0.5 for chance).
    """
    labels = is_duplicate.long()
    if labels.numel() == 0 or labels.min() == labels.max():
        raise ValueError("duplicate_auroc needs both duplicate and non-duplicate pairs")
    return float(binary_auroc(scores.float(), labels))


def duplicate_auroc_matrix(similarity: Tensor) -> float:
    """Duplicate detection between two summaries of each of ``S`` scenes (e.g. from disjoint view sets):
    ``similarity [S, S]`` compares summary A of scene ``i`` with summary B of scene ``j``; the diagonal holds
    the duplicates, the rest the different scenes."""
    s = similarity.shape[0]
    if similarity.shape != (s, s) or s < 2:
        raise ValueError(f"need a square similarity of at least 2 scenes, got {tuple(similarity.shape)}")
    labels = torch.eye(s, dtype=torch.bool, device=similarity.device)
    return duplicate_auroc(similarity.flatten(), labels.flatten())


class SparseSummaries(Protocol):
    """What summarises scenes and images as key-point sets (the feature-consensus objective does)."""

    def scene_keypoints(self, batch: Mapping[str, Any], encoder: Any) -> KeypointSet: ...

    def image_keypoints(self, images: Tensor, encoder: Any) -> KeypointSet: ...


class RetrievalProtocol:
    """2D->3D retrieval and duplicate detection over held-out scenes, batch by batch.

    Each scene of ``V >= 3`` views is summarised four ways: view 0's 2D key points (the query); the 3D key
    points of views ``1 .. V-1`` (its entry in the database); and those of two disjoint halves of views
    ``1 .. V-1`` (duplicate detection: the two halves of the same scene against halves of all others). The
    query's own view is never in the database.

    Args:
        mode: how two key-point sets compare (:func:`set_similarity`).
    """

    def __init__(self, mode: SetSimilarity = "best_match") -> None:
        self.mode = mode
        self.sets: dict[str, list[KeypointSet]] = {"query": [], "database": [], "half_a": [], "half_b": []}

    def add(self, summaries: SparseSummaries, scenes: Mapping[str, Any], encoder: Any) -> None:
        """Summarise the scenes of one multi-view batch (``images [B, V, ...]`` with cameras and depth)."""
        v = scenes["images"].shape[1]
        if v < 3:
            raise ValueError(f"retrieval needs at least 3 views per scene (a query and two halves), got {v}")
        half = 1 + (v - 1) // 2
        self.sets["query"].append(summaries.image_keypoints(scenes["images"][:, 0], encoder))
        self.sets["database"].append(summaries.scene_keypoints(select_views(scenes, slice(1, v)), encoder))
        self.sets["half_a"].append(summaries.scene_keypoints(select_views(scenes, slice(1, half)), encoder))
        self.sets["half_b"].append(summaries.scene_keypoints(select_views(scenes, slice(half, v)), encoder))

    def __len__(self) -> int:
        return sum(len(s) for s in self.sets["query"])

    def compute(self) -> dict[str, float]:
        """``retrieval_top1``, ``retrieval_top5``, ``retrieval_chance`` (1 / scenes) and ``duplicate_auc``."""
        sets = {
            name: KeypointSet(
                torch.cat([s.descriptors for s in parts]).cpu(), torch.cat([s.weights for s in parts]).cpu()
            )
            for name, parts in self.sets.items()
        }
        n = len(sets["query"])
        if n == 0:
            raise ValueError("no scenes were summarised")
        top = retrieval_accuracy(set_similarity(sets["query"], sets["database"], self.mode), torch.arange(n), (1, 5))
        metrics = {f"retrieval_{k}": v for k, v in top.items()}
        metrics["retrieval_chance"] = 1.0 / n
        if n > 1:
            metrics["duplicate_auc"] = duplicate_auroc_matrix(set_similarity(sets["half_a"], sets["half_b"], self.mode))
        metrics["scenes"] = float(n)
        return metrics
