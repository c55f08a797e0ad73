"""Losses of the feature-consensus objective (ConDense): 2D-3D consensus, 2D fidelity, depth, key points.

The objective renders the 3D branch's feature grid into every view (``F3D``) and compares it with the 2D
branch's dense map (``F2D``); these functions hold the comparisons. All maps are channels-first with any
leading shape, ``[..., C, h, w]``; masks are ``[..., 1, h, w]`` (or ``[..., h, w]``), true/1 where a pixel
counts. Every loss is a mean over the pixels (or key points) that count and is 0, still attached to the
graph, when none does.

Design choices:

* **Consensus** (:func:`consensus_loss`): per-pixel cosine distance ``1 - cos = ||a/|a| - b/|b|||^2 / 2``
  (written as the squared distance of the unit vectors so that identical maps give exactly 0), or the
  channel-mean squared error. Stop-gradient switches: ``detach_2d`` makes F2D a fixed target for the 3D
  branch (the 3D branch distils the 2D one), ``detach_3d`` makes F3D a fixed target for the 2D branch
  (multi-view consistency distilled into the encoder); neither is the symmetric loss. ConDense trains both
  branches; the switches exist because a symmetric loss can collapse both maps together, which the
  fidelity term is there to resist.
* **Fidelity** (:func:`fidelity_loss`): the student's F2D against the frozen teacher's features; when the
  grids differ, the finer map is averaged onto the coarser grid (``target_grid='coarse'``, exact patch
  means for integer ratios: a student head that upsamples keeps its detail and only its patch means are
  held to the teacher, as FiT3D compares at the patch grid), or the teacher is resampled bilinearly onto
  the student's grid (``'student'``). Cosine by default: the teacher's feature norms vary across images.
* **Depth** (:func:`depth_loss`): masked L1 between the rendered and the fused views' depth, so the density
  puts the surfaces where the depth maps do.
* **Key points**, in three parts, so that key points are repeatable across the two branches and their
  descriptors discriminative:

  (a) *detection* (:func:`keypoint_heatmap`, :func:`keypoint_detection_loss`): the visible 3D key points
      projected into a view make a heatmap (a Gaussian of ``sigma`` pixels at each projection, the maximum
      where they overlap) that is the target of the 2D score logits, by a class-balanced binary cross
      entropy (positives and negatives averaged separately: key points are a few pixels of each map). A
      heatmap at the projections, rather than the 3D score field volume-rendered into the view, because
      the rendered field is a blurred expectation whose peaks need not be the selected key points, while
      what is used later (retrieval) is exactly the selected ones, and the projection uses the view's depth
      to drop occluded key points.
  (b) *descriptors* (:func:`keypoint_descriptor_loss`): InfoNCE between each visible 3D key point's
      descriptor and the 2D descriptor read at its projection. 2D -> 3D: the right 3D key point among all
      key points of every scene of the batch (other scenes are negatives too, which is what retrieval and
      duplicate detection need); 3D -> 2D: the right projection among those in the same view. Symmetric,
      with a temperature.
  (c) *reliability* (:func:`keypoint_reliability_loss`): the 3D score logits of the key points regress
      (binary cross entropy) how well their descriptors matched in (b) (the probability given to the right
      3D key point, averaged over the views that see it, detached). Scores then mean "a descriptor that is
      found again from 2D" (R2D2's reliability), which gives the 3D detector a target of its own and
      closes the loop: 3D scores pick the key points, (a) teaches the 2D detector to fire at them.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup3d.errors import ConfigError, require
from selfsup3d.geometry.cameras import pixel_centers

Metric = Literal["cosine", "l2"]


# ---------------------------------------------------------------------------- helpers
def _pixel_mask(mask: Tensor | None, like: Tensor) -> Tensor | None:
    """A float ``[..., h, w]`` weight from a ``[..., 1, h, w]`` or ``[..., h, w]`` mask."""
    if mask is None:
        return None
    m = mask.squeeze(-3) if mask.ndim == like.ndim else mask
    if m.shape != like.shape[:-3] + like.shape[-2:]:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match maps of shape {tuple(like.shape)}")
    return m.to(like.dtype)


def masked_mean(values: Tensor, weight: Tensor | None) -> Tensor:
    """Mean of ``values`` weighted by ``weight`` (same shape); 0, attached to the graph, when the weights sum to 0."""
    if weight is None:
        return values.mean()
    total = weight.sum()
    return (values * weight).sum() / total.clamp(min=1e-12)


def pixel_distance(a: Tensor, b: Tensor, metric: Metric = "cosine") -> Tensor:
    """Per-pixel distance of channels-first maps ``[..., C, h, w]`` -> ``[..., h, w]``.

    ``cosine``: ``||a/|a| - b/|b|||^2 / 2 = 1 - cos(a, b)`` (0 for identical non-zero vectors, exactly);
    ``l2``: mean over channels of the squared difference.
    """
    if a.shape != b.shape:
        raise ValueError(f"maps must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if metric == "cosine":
        return 0.5 * (F.normalize(a, dim=-3) - F.normalize(b, dim=-3)).square().sum(dim=-3)
    if metric == "l2":
        return (a - b).square().mean(dim=-3)
    raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")


def resample_map(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resample ``[..., C, h, w]`` maps to ``size``: exact cell means for integer down-sampling ratios,
    antialiased bilinear for other reductions, bilinear (``align_corners=False``) for enlargements."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    lead = x.shape[:-3]
    flat = x.reshape(-1, *x.shape[-3:])
    if h % size[0] == 0 and w % size[1] == 0:
        out = F.avg_pool2d(flat, kernel_size=(h // size[0], w // size[1]))
    else:
        shrink = size[0] < h or size[1] < w
        out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return out.reshape(*lead, *out.shape[-3:])


# ---------------------------------------------------------------------------- consensus, fidelity, depth
def consensus_loss(
    f3d: Tensor,
    f2d: Tensor,
    mask: Tensor | None = None,
    metric: Metric = "cosine",
    detach_2d: bool = False,
    detach_3d: bool = False,
) -> Tensor:
    """The 2D-3D consensus: rendered F3D against the 2D branch's F2D, over the pixels that count.

    Args:
        f3d: ``[..., C, h, w]`` features rendered from the 3D branch.
        f2d: ``[..., C, h, w]`` the 2D branch's dense features, on the same pixels.
        mask: ``[..., 1, h, w]`` which pixels count (e.g. rays that hit the scene), or ``None`` for all.
        metric: ``cosine`` or ``l2`` (:func:`pixel_distance`).
        detach_2d: stop the gradient to F2D (F2D is the target of the 3D branch).
        detach_3d: stop the gradient to F3D (F3D is the target of the 2D branch).

    Returns:
        Scalar loss.
    """
    if detach_2d:
        f2d = f2d.detach()
    if detach_3d:
        f3d = f3d.detach()
    return masked_mean(pixel_distance(f3d, f2d, metric), _pixel_mask(mask, f3d))


class ConsensusLoss(nn.Module):
    """:func:`consensus_loss` with its switches fixed at construction (for an objective's YAML).

    Args:
        metric: ``cosine`` or ``l2``.
        detach_2d: stop the gradient to F2D.
        detach_3d: stop the gradient to F3D.
    """

    def __init__(self, metric: Metric = "cosine", detach_2d: bool = False, detach_3d: bool = False) -> None:
        super().__init__()
        require(metric in ("cosine", "l2"), "model.consensus metric", "'cosine' or 'l2'", metric)
        if detach_2d and detach_3d:
            raise ConfigError("detach_2d and detach_3d are both set: the consensus loss would train nothing")
        self.metric, self.detach_2d, self.detach_3d = metric, detach_2d, detach_3d

    def forward(self, f3d: Tensor, f2d: Tensor, mask: Tensor | None = None) -> Tensor:
        return consensus_loss(f3d, f2d, mask, self.metric, self.detach_2d, self.detach_3d)

    def extra_repr(self) -> str:
        return f"metric={self.metric}, detach_2d={self.detach_2d}, detach_3d={self.detach_3d}"


def fidelity_loss(
    student: Tensor,
    teacher: Tensor,
    metric: Metric = "cosine",
    target_grid: Literal["coarse", "student"] = "coarse",
    mask: Tensor | None = None,
) -> Tensor:
    """Keep the 2D branch's features close to the frozen teacher's.

    Args:
        student: ``[..., C, h, w]`` the student's features.
        teacher: ``[..., C, h', w']`` the teacher's (no gradient is taken through them).
        metric: ``cosine`` or ``l2``.
        target_grid: ``coarse``: compare on the coarser of the two grids (the finer map averaged onto it);
            ``student``: the teacher resampled onto the student's grid.
        mask: ``[..., 1, hm, wm]`` pixels that count, on the grid the comparison runs on, or ``None``.

    Returns:
        Scalar loss.
    """
    if student.shape[:-2] != teacher.shape[:-2]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must agree but for the grid size"
        )
    teacher = teacher.detach()
    if target_grid == "coarse":
        if student.shape[-2] * student.shape[-1] >= teacher.shape[-2] * teacher.shape[-1]:
            student = resample_map(student, teacher.shape[-2:])
        else:
            teacher = resample_map(teacher, student.shape[-2:])
    elif target_grid == "student":
        teacher = resample_map(teacher, student.shape[-2:])
    else:
        raise ValueError(f"target_grid must be 'coarse' or 'student', got {target_grid!r}")
    return masked_mean(pixel_distance(student, teacher, metric), _pixel_mask(mask, student))


def depth_loss(rendered: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Masked L1 between rendered and known z-depth (``[..., 1, h, w]`` or ``[..., h, w]``); pixels whose
    target is 0 or non-finite never count."""
    known = torch.isfinite(target) & (target > 0)
    weight = known if mask is None else known & (mask > 0)
    diff = (rendered - torch.where(known, target, torch.zeros_like(target))).abs()
    return masked_mean(diff, weight.to(diff.dtype))


# ---------------------------------------------------------------------------- key points
def keypoint_heatmap(
    uv: Tensor, visible: Tensor, height: int, width: int, sigma: float = 1.0, weights: Tensor | None = None
) -> Tensor:
    """Target maps for a 2D detector: a Gaussian bump at each visible projected key point.

    Args:
        uv: ``[B, N, 2]`` pixel positions in the map's pixels (centre of pixel ``(i, j)`` at ``(j+.5, i+.5)``).
        visible: ``[B, N]`` which key points are seen.
        height: map height.
        width: map width.
        sigma: bump radius in pixels.
        weights: ``[B, N]`` peak heights in ``[0, 1]`` (default 1).

    Returns:
        ``[B, 1, h, w]`` in ``[0, 1]``, the maximum of the bumps where they overlap.
    """
    grid = pixel_centers(height, width, device=uv.device, dtype=uv.dtype).view(1, 1, -1, 2)
    d2 = (grid - uv[:, :, None]).square().sum(-1)  # [B, N, h*w]
    bumps = torch.exp(-0.5 * d2 / sigma**2)
    peak = visible.to(uv.dtype) if weights is None else visible.to(uv.dtype) * weights
    bumps = bumps * peak[..., None]
    if bumps.shape[1] == 0:
        return uv.new_zeros(uv.shape[0], 1, height, width)
    return bumps.amax(dim=1).view(-1, 1, height, width)


def keypoint_detection_loss(logits: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Class-balanced soft binary cross entropy of 2D score logits against a heatmap.

    ``0.5 * (sum t * softplus(-s) / sum t + sum (1 - t) * softplus(s) / sum (1 - t))`` over the pixels that
    count: positives and negatives weigh the same however few the key points.

    Args:
        logits: ``[B, 1, h, w]`` 2D score logits.
        target: ``[B, 1, h, w]`` heatmap in ``[0, 1]`` (no gradient is taken through it).
        mask: ``[B, 1, h, w]`` pixels that count, or ``None``.

    Returns:
        Scalar loss.
    """
    target = target.detach().to(logits.dtype)
    w = torch.ones_like(logits) if mask is None else mask.to(logits.dtype)
    pos = masked_mean(F.softplus(-logits), target * w)
    neg = masked_mean(F.softplus(logits), (1.0 - target) * w)
    return 0.5 * (pos + neg)


def keypoint_descriptor_loss(
    desc_3d: Tensor,
    desc_2d: Tensor,
    visible: Tensor,
    valid: Tensor | None = None,
    temperature: float = 0.07,
    cross_scene: bool = True,
) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE between 3D key points' descriptors and the 2D descriptors at their projections.

    Args:
        desc_3d: ``[B, N, E]`` descriptors of the 3D key points.
        desc_2d: ``[B, V, N, E]`` 2D descriptors read at each key point's projection into each view.
        visible: ``[B, V, N]`` which projections are seen (the others are left out).
        valid: ``[B, N]`` which 3D key points exist (default all).
        temperature: softmax temperature on cosine similarities.
        cross_scene: 2D -> 3D also competes with the other scenes' key points (else only the own scene's).

    Returns:
        The scalar loss (mean of both directions over the visible projections) and, detached, the
        probability the 2D -> 3D direction gives the right key point, averaged over the views that see it,
        ``[B, N]`` (0 where none does): the target of :func:`keypoint_reliability_loss`.
    """
    b, v, n, _ = desc_2d.shape
    valid = torch.ones(b, n, dtype=torch.bool, device=desc_3d.device) if valid is None else valid
    visible = visible & valid[:, None]
    d3 = F.normalize(desc_3d, dim=-1)
    d2 = F.normalize(desc_2d, dim=-1)
    neg_inf = torch.finfo(d3.dtype).min
    row_w = visible.to(d3.dtype)
    # 2D -> 3D: every projection against the 3D key points of all scenes (or of its own)
    if cross_scene:
        logits = torch.einsum("bvne,cme->bvncm", d2, d3).reshape(b, v, n, b * n) / temperature
        cols = valid.reshape(1, 1, 1, b * n)
        target = (torch.arange(b, device=d3.device)[:, None] * n + torch.arange(n, device=d3.device)).view(b, 1, n)
    else:
        logits = torch.einsum("bvne,bme->bvnm", d2, d3) / temperature
        cols = valid[:, None, None]
        target = torch.arange(n, device=d3.device).view(1, 1, n)
    logits = logits.masked_fill(~cols, neg_inf)
    target = target.expand(b, v, n)
    logp = logits.log_softmax(dim=-1)
    right = logp.gather(-1, target[..., None]).squeeze(-1)  # [B, V, N]
    loss_23 = masked_mean(-right, row_w)
    # 3D -> 2D: each key point against the projections seen in the same view
    logits_32 = torch.einsum("bne,bvme->bvnm", d3, d2) / temperature
    logits_32 = logits_32.masked_fill(~visible[:, :, None, :], neg_inf)
    right_32 = logits_32.log_softmax(dim=-1).diagonal(dim1=-2, dim2=-1)  # [B, V, N]
    loss_32 = masked_mean(-right_32, row_w)
    with torch.no_grad():
        seen = row_w.sum(1)
        prob = (right.exp() * row_w).sum(1) / seen.clamp(min=1)
    return 0.5 * (loss_23 + loss_32), prob


def keypoint_reliability_loss(score_logits: Tensor, match_prob: Tensor, weight: Tensor | None = None) -> Tensor:
    """Binary cross entropy of key points' score logits ``[B, N]`` against how well they matched ``[B, N]``
    (detached), over the key points with weight (e.g. those seen in some view)."""
    target = match_prob.detach().to(score_logits.dtype)
    logits = torch.where(torch.isfinite(score_logits), score_logits, torch.zeros_like(score_logits))
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return masked_mean(bce, None if weight is None else weight.to(bce.dtype))


def linear_probe_loss(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Cross-entropy of a probe's ``logits [B, K]`` on the labelled samples (``labels >= 0``), and its accuracy;
    a zero loss that keeps the probe in the graph when no sample is labelled."""
    keep = labels >= 0
    if not keep.any():
        return {"probe3d_loss": logits.sum() * 0.0}
    right = (logits[keep].argmax(-1) == labels[keep]).float().mean()
    return {"probe3d_loss": F.cross_entropy(logits[keep], labels[keep]), "probe3d_acc": right}
