"""Sparse features for the feature-consensus objective: key-point heads in 2D and 3D, selection by
non-maximum suppression, and the projection of 3D key points into posed views.

A scene becomes a set of descriptor-decorated 3D key points (:class:`Keypoints` with 3D positions); an
image a set of 2D ones. Conventions:

* 2D maps are ``[B, C, h, w]``; a key point's position is its cell's centre in the map's own pixels,
  ``(u, v) = (j + 0.5, i + 0.5)`` (the camera convention of :mod:`selfsup3d.geometry.cameras`; rescale
  ``K`` with ``scale_intrinsics`` when the map is coarser than the image).
* 3D grids are ``[B, C, R, R, R]`` over the unit cube, indexed ``[k, j, i]`` = ``(z, y, x)``; a key point's
  position is its voxel's centre ``(x, y, z)`` in the cube (:mod:`selfsup3d.geometry.points`).
* Scores are logits (larger = more salient); descriptors are L2-normalised along their channel axis.
* Selections are padded to ``k``: slots without a key point have ``valid = False``, score ``-inf``,
  position and descriptor 0.

:class:`KeypointSet` is what a selection becomes for comparison (descriptors and weights, the summaries of
scenes and images that :mod:`selfsup3d.metrics.keypoint_retrieval` compares).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup3d.geometry.cameras import project_points
from selfsup3d.geometry.points import sample_grid, sample_pixels, voxel_centres


@dataclass
class Keypoints:
    """Selected key points, padded to ``k`` per item of the batch.

    Attributes:
        positions: ``[B, k, 2]`` pixel ``(u, v)`` (2D) or ``[B, k, 3]`` cube ``(x, y, z)`` (3D).
        scores: ``[B, k]`` score logits, ``-inf`` in empty slots; gradients flow when the score map had them.
        descriptors: ``[B, k, E]`` unit descriptors (0 in empty slots), or ``None`` when none were given.
        valid: ``[B, k]`` which slots hold a key point.
    """

    positions: Tensor
    scores: Tensor
    descriptors: Tensor | None
    valid: Tensor


@dataclass
class KeypointSet:
    """Key-point sets of several items (scenes or images), padded to ``N`` slots.

    Attributes:
        descriptors: ``[S, N, E]`` descriptors (normalised when compared).
        weights: ``[S, N]`` non-negative weights, 0 in empty slots.
    """

    descriptors: Tensor
    weights: Tensor

    @classmethod
    def from_keypoints(cls, descriptors: Tensor, valid: Tensor, scores: Tensor | None = None) -> KeypointSet:
        """From a selection (:class:`Keypoints` fields): weight ``sigmoid(score)`` for
        valid key points (1 without scores), 0 elsewhere."""
        w = valid.to(descriptors.dtype)
        if scores is not None:
            finite = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
            w = w * torch.sigmoid(finite.to(descriptors.dtype))
        return cls(descriptors=descriptors, weights=w)

    def __len__(self) -> int:
        return self.descriptors.shape[0]


# ---------------------------------------------------------------------------- heads
class KeypointHead2D(nn.Module):
    """Dense 2D features ``[B, C, h, w]`` -> score logits ``[B, 1, h, w]`` and unit descriptors ``[B, E, h, w]``.

    A shared 3x3 convolution (GroupNorm, SiLU), then two 1x1 convolutions.

    Args:
        in_channels: feature channels ``C``.
        descriptor_dim: descriptor channels ``E``.
        hidden: width of the shared layer (default ``in_channels``).
    """

    def __init__(self, in_channels: int, descriptor_dim: int = 64, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or in_channels
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False), nn.GroupNorm(_groups(hidden), hidden), nn.SiLU()
        )
        self.score = nn.Conv2d(hidden, 1, 1)
        self.descriptor = nn.Conv2d(hidden, descriptor_dim, 1)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(features)
        return self.score(h), F.normalize(self.descriptor(h), dim=1)


class KeypointHead3D(nn.Module):
    """Grid features ``[B, C, R, R, R]`` -> score logits ``[B, 1, R, R, R]`` and unit descriptors ``[B, E, R, R, R]``.

    Args:
        in_channels: feature channels ``C``.
        descriptor_dim: descriptor channels ``E`` (the 2D head's, so the two can be compared).
        hidden: width of the shared 3x3x3 layer (default ``in_channels``).
    """

    def __init__(self, in_channels: int, descriptor_dim: int = 64, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or in_channels
        self.trunk = nn.Sequential(
            nn.Conv3d(in_channels, hidden, 3, padding=1, bias=False), nn.GroupNorm(_groups(hidden), hidden), nn.SiLU()
        )
        self.score = nn.Conv3d(hidden, 1, 1)
        self.descriptor = nn.Conv3d(hidden, descriptor_dim, 1)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(features)
        return self.score(h), F.normalize(self.descriptor(h), dim=1)


def _groups(channels: int, groups: int = 8) -> int:
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


# ---------------------------------------------------------------------------- selection
def _top_k(scores: Tensor, keep: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``k`` of flat scores ``[B, M]`` among ``keep``: indices, scores (``-inf`` padded) and validity."""
    masked = torch.where(keep, scores, torch.full_like(scores, float("-inf")))
    kk = min(k, masked.shape[1])
    values, index = masked.topk(kk, dim=1)
    valid = torch.isfinite(values)
    if kk < k:  # fewer candidates than slots: pad
        pad = k - kk
        values = torch.cat([values, values.new_full((values.shape[0], pad), float("-inf"))], dim=1)
        index = torch.cat([index, index.new_zeros(index.shape[0], pad)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(valid.shape[0], pad)], dim=1)
    return index, values, valid


def select_keypoints_2d(
    scores: Tensor, k: int, radius: int = 1, descriptors: Tensor | None = None, threshold: float | None = None
) -> Keypoints:
    """The ``k`` highest local maxima of 2D score maps (non-maximum suppression in a square window).

    A cell is a candidate when it is the maximum of the ``(2 radius + 1)^2`` window around it (ties all
    survive) and above ``threshold``.

    Args:
        scores: ``[B, 1, h, w]`` score logits.
        k: key points per map.
        radius: suppression radius in cells (0: no suppression).
        descriptors: ``[B, E, h, w]`` descriptor map to read at the key points, or ``None``.
        threshold: minimum score logit, or ``None``.

    Returns:
        :class:`Keypoints` with pixel positions ``[B, k, 2]``.
    """
    if scores.ndim != 4 or scores.shape[1] != 1:
        raise ValueError(f"scores must be [B, 1, h, w], got shape {tuple(scores.shape)}")
    b, _, h, w = scores.shape
    keep = _local_maxima(scores.detach(), radius, 2)
    if threshold is not None:
        keep &= scores.detach() > threshold
    index, _, valid = _top_k(scores.detach().flatten(1), keep.flatten(1), k)
    values = scores.flatten(1).gather(1, index)
    values = torch.where(valid, values, torch.full_like(values, float("-inf")))
    rows, cols = index // w, index % w
    positions = torch.stack([cols, rows], dim=-1).to(scores.dtype) + 0.5
    positions = positions * valid[..., None]
    desc = None
    if descriptors is not None:
        flat = descriptors.flatten(2)  # [B, E, h*w]
        desc = flat.gather(2, index[:, None].expand(-1, flat.shape[1], -1)).transpose(1, 2) * valid[..., None]
    return Keypoints(positions=positions, scores=values, descriptors=desc, valid=valid)


def select_keypoints_3d(
    scores: Tensor,
    occupancy: Tensor,
    k: int,
    radius: int = 1,
    descriptors: Tensor | None = None,
    threshold: float | None = None,
) -> Keypoints:
    """The ``k`` highest local maxima of 3D score grids among occupied voxels.

    Suppression runs over occupied voxels only (empty space cannot suppress a surface key point).

    Args:
        scores: ``[B, 1, R, R, R]`` score logits.
        occupancy: ``[B, 1, R, R, R]``; voxels with occupancy > 0.5 are candidates.
        k: key points per scene.
        radius: suppression radius in voxels (0: no suppression).
        descriptors: ``[B, E, R, R, R]`` descriptor grid to read at the key points, or ``None``.
        threshold: minimum score logit, or ``None``.

    Returns:
        :class:`Keypoints` with cube positions ``[B, k, 3]`` (voxel centres).
    """
    if scores.ndim != 5 or scores.shape[1] != 1:
        raise ValueError(f"scores must be [B, 1, R, R, R], got shape {tuple(scores.shape)}")
    if occupancy.shape != scores.shape:
        raise ValueError(f"occupancy {tuple(occupancy.shape)} must have the scores' shape {tuple(scores.shape)}")
    occupied = occupancy.detach() > 0.5
    s = torch.where(occupied, scores.detach(), torch.full_like(scores, float("-inf")))
    keep = _local_maxima(s, radius, 3) & occupied
    if threshold is not None:
        keep &= s > threshold
    index, _, valid = _top_k(s.flatten(1), keep.flatten(1), k)
    values = scores.flatten(1).gather(1, index)
    values = torch.where(valid, values, torch.full_like(values, float("-inf")))
    centres = voxel_centres(scores.shape[-1], device=scores.device, dtype=scores.dtype).view(-1, 3)
    positions = centres[index] * valid[..., None]
    desc = None
    if descriptors is not None:
        flat = descriptors.flatten(2)
        desc = flat.gather(2, index[:, None].expand(-1, flat.shape[1], -1)).transpose(1, 2) * valid[..., None]
    return Keypoints(positions=positions, scores=values, descriptors=desc, valid=valid)


def _local_maxima(scores: Tensor, radius: int, dims: int) -> Tensor:
    """Cells equal to the maximum of their window (``-inf`` never counts as a maximum)."""
    if radius <= 0:
        return torch.isfinite(scores)
    pool = F.max_pool2d if dims == 2 else F.max_pool3d
    pooled = pool(scores, kernel_size=2 * radius + 1, stride=1, padding=radius)
    return (scores == pooled) & torch.isfinite(scores)


# ---------------------------------------------------------------------------- projection
def project_keypoints(
    points: Tensor,
    K: Tensor,
    c2w: Tensor,
    depth: Tensor | None = None,
    image_size: tuple[int, int] | None = None,
    tolerance: float = 0.05,
) -> tuple[Tensor, Tensor]:
    """Project 3D key points into views; which projections are visible.

    Visible: in front of the camera, inside the image, and, with a depth map, not occluded: the view's depth
    at the projected pixel (nearest pixel) is known and the point's z-depth is at most ``tolerance`` behind
    it. Points whose pixel has no depth are not visible (nothing there confirms them).

    Args:
        points: ``[B, N, 3]`` key points, in the cameras' frame (e.g. the unit cube, with
            ``UnitCube.cameras_to_unit`` poses).
        K: ``[B, V, 3, 3]`` intrinsics of the image (or map) the positions are wanted in.
        c2w: ``[B, V, 4, 4]`` poses.
        depth: ``[B, V, 1, H, W]`` z-depths in the same frame and pixels as ``K`` (0 = unknown), or ``None``.
        image_size: ``(H, W)`` when no depth is given.
        tolerance: how far behind the depth map (in depth units) a point still counts as seen.

    Returns:
        ``uv [B, V, N, 2]`` pixel coordinates and ``visible [B, V, N]``.
    """
    if depth is None and image_size is None:
        raise ValueError("project_keypoints needs depth or image_size to know the image bounds")
    h, w = depth.shape[-2:] if depth is not None else image_size
    uv, z = project_points(points[:, None], K, c2w)  # [B, V, N, 2], [B, V, N]
    inside = (uv[..., 0] >= 0) & (uv[..., 0] < w) & (uv[..., 1] >= 0) & (uv[..., 1] < h)
    visible = (z > 1e-6) & inside & torch.isfinite(uv).all(dim=-1)
    if depth is not None:
        col = uv[..., 0].floor().long().clamp(0, w - 1)
        row = uv[..., 1].floor().long().clamp(0, h - 1)
        flat = depth.flatten(-3)  # [B, V, H*W]
        seen = flat.gather(-1, row * w + col)
        known = torch.isfinite(seen) & (seen > 0)
        visible = visible & known & (z <= seen + tolerance)
    return uv, visible


def sample_descriptors_2d(descriptors: Tensor, uv: Tensor) -> Tensor:
    """Unit 2D descriptors read bilinearly at pixel positions: ``[B, E, h, w]``, ``[B, N, 2]`` -> ``[B, N, E]``."""
    return F.normalize(sample_pixels(descriptors, uv), dim=-1)


def sample_descriptors_3d(descriptors: Tensor, points: Tensor) -> Tensor:
    """Unit 3D descriptors read trilinearly at cube points: ``[B, E, R, R, R]``, ``[B, N, 3]`` -> ``[B, N, E]``."""
    return F.normalize(sample_grid(descriptors, points), dim=-1)
