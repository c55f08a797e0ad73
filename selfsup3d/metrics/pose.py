"""Camera-pose accuracy as pose papers report it, as pure functions on tensors.

A predicted trajectory lives in its own frame and scale (the masked-view objective predicts poses
relative to a canonical view, up to an unknown scale), so it is first aligned to the true trajectory
with the similarity transform (scale, rotation, translation) that best maps the predicted camera
centres onto the true ones (Umeyama 1991). Errors are then measured over all pairs of views:

* relative rotation error: the angle of ``R_rel_pred^T R_rel_true`` where ``R_rel = R_i^T R_j``;
* translation direction error: the angle between the predicted and true direction from camera ``i``
  to camera ``j`` in camera ``i``'s frame (scale-free);
* AUC at a threshold ``τ`` (degrees): the area under the accuracy curve of
  ``max(rotation error, translation error)`` for thresholds ``1..τ``, normalised to ``[0, 1]``
  (as PoseDiffusion and VGGT compute it).

Pairwise errors are invariant to any similarity transform of either trajectory, so they do not depend on
the alignment; the alignment matters for the absolute quantities (camera-centre error, pictures).

Camera poses are ``[..., V, 4, 4]`` camera-to-world matrices (OpenCV axes, see
:mod:`selfsup3d.geometry.cameras`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup3d.errors import require
from selfsup3d.geometry.cameras import make_se3, relative_pose, rotation_angle

RAD2DEG = 180.0 / math.pi


def umeyama(src: Tensor, dst: Tensor, with_scale: bool = True, eps: float = 1e-9) -> tuple[Tensor, Tensor, Tensor]:
    """Least-squares similarity transform from ``src`` to ``dst`` points (Umeyama 1991).

    Args:
        src: ``[..., N, 3]`` points to move.
        dst: ``[..., N, 3]`` corresponding target points.
        with_scale: estimate the scale; ``False`` gives the best rigid transform (scale 1).
        eps: guards the division by the variance of ``src`` (all points coincident gives scale 0).

    Returns:
        ``(s [...], R [..., 3, 3], t [..., 3])`` minimising ``Σ‖dst - (s R src + t)‖²``. The rotation is
        proper (det +1). With fewer than three non-collinear points the rotation is not unique.
    """
    if src.shape != dst.shape or src.shape[-1] != 3:
        raise ValueError(f"umeyama needs matching [..., N, 3] points, got {tuple(src.shape)} and {tuple(dst.shape)}")
    dtype = src.dtype
    src, dst = src.double(), dst.double()
    mu_s, mu_d = src.mean(-2, keepdim=True), dst.mean(-2, keepdim=True)
    xs, xd = src - mu_s, dst - mu_d
    n = src.shape[-2]
    cov = xd.transpose(-1, -2) @ xs / n  # [..., 3, 3]
    U, S, Vh = torch.linalg.svd(cov)
    d = torch.ones_like(S)
    d[..., -1] = torch.sign(torch.linalg.det(U) * torch.linalg.det(Vh))
    d[..., -1] = torch.where(d[..., -1] == 0, torch.ones_like(d[..., -1]), d[..., -1])
    R = U @ torch.diag_embed(d) @ Vh
    if with_scale:
        var_s = xs.square().sum((-1, -2)) / n
        s = (S * d).sum(-1) / var_s.clamp(min=eps)
    else:
        s = torch.ones(src.shape[:-2], dtype=src.dtype, device=src.device)
    t = mu_d.squeeze(-2) - s[..., None] * (R @ mu_s.squeeze(-2)[..., None]).squeeze(-1)
    return s.to(dtype), R.to(dtype), t.to(dtype)


def apply_similarity(s: Tensor, R: Tensor, t: Tensor, c2w: Tensor) -> Tensor:
    """Move cameras ``[..., V, 4, 4]`` by the similarity ``x -> s R x + t`` (``s [...]``, ``R [..., 3, 3]``,
    ``t [..., 3]``): centres go to ``s R c + t``, orientations to ``R R_c``."""
    R = R.to(c2w.dtype)[..., None, :, :]
    rot = R @ c2w[..., :3, :3]
    centre = s.to(c2w.dtype)[..., None, None] * (R @ c2w[..., :3, 3:4]).squeeze(-1) + t.to(c2w.dtype)[..., None, :]
    return make_se3(rot, centre)


def align_trajectory(pred_c2w: Tensor, gt_c2w: Tensor, with_scale: bool = True) -> Tensor:
    """``pred_c2w`` moved by the similarity that best maps its camera centres onto ``gt_c2w``'s.

    Args:
        pred_c2w: ``[..., V, 4, 4]`` predicted cameras, any frame and scale.
        gt_c2w: ``[..., V, 4, 4]`` true cameras.
        with_scale: align the scale too (a similarity); ``False`` aligns rigidly.
    """
    s, R, t = umeyama(pred_c2w[..., :3, 3], gt_c2w[..., :3, 3], with_scale=with_scale)
    return apply_similarity(s, R, t, pred_c2w)


def pair_indices(num_views: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """All ordered-once pairs ``i < j`` of ``num_views`` views: two ``[P]`` index tensors."""
    i, j = torch.triu_indices(num_views, num_views, offset=1, device=device)
    return i, j


def relative_rotation_error(pred_c2w: Tensor, gt_c2w: Tensor) -> Tensor:
    """Relative rotation error in degrees over all pairs ``i < j``: ``[..., P]`` for ``[..., V, 4, 4]`` inputs."""
    i, j = pair_indices(pred_c2w.shape[-3], pred_c2w.device)
    rel_p = pred_c2w[..., i, :3, :3].transpose(-1, -2) @ pred_c2w[..., j, :3, :3]
    rel_g = gt_c2w[..., i, :3, :3].transpose(-1, -2) @ gt_c2w[..., j, :3, :3]
    return rotation_angle(rel_p.transpose(-1, -2) @ rel_g) * RAD2DEG


def translation_direction_error(pred_c2w: Tensor, gt_c2w: Tensor, eps: float = 1e-9) -> Tensor:
    """Angle in degrees between the predicted and true directions from camera ``i`` to camera ``j``, expressed
    in camera ``i``'s frame, over all pairs ``i < j``: ``[..., P]``. Scale-free; a pair whose predicted
    cameras coincide has no direction and counts as 90°."""
    i, j = pair_indices(pred_c2w.shape[-3], pred_c2w.device)
    t_p = relative_pose(pred_c2w[..., j, :, :], pred_c2w[..., i, :, :])[..., :3, 3]
    t_g = relative_pose(gt_c2w[..., j, :, :], gt_c2w[..., i, :, :])[..., :3, 3]
    cos = (F.normalize(t_p, dim=-1, eps=eps) * F.normalize(t_g, dim=-1, eps=eps)).sum(-1)
    return torch.acos(cos.clamp(-1.0, 1.0)) * RAD2DEG


def pose_auc(rot_err: Tensor, trans_err: Tensor, threshold: float) -> Tensor:
    """AUC of pose accuracy up to ``threshold`` degrees, in ``[0, 1]``.

    The error of a pair is ``max(rot_err, trans_err)``; the accuracy at ``k`` is the fraction of pairs with an
    error below ``k``; the AUC is the mean accuracy over ``k = 1, 2, ..., threshold`` (PoseDiffusion's
    histogram definition). Errors of all leading dimensions are pooled.

    Args:
        rot_err: relative rotation errors in degrees, any shape.
        trans_err: translation direction errors in degrees, same shape.
        threshold: largest threshold in degrees (a positive integer: 5, 15, 30).
    """
    require(
        threshold >= 1 and int(threshold) == threshold,
        "threshold",
        "a positive whole number of degrees",
        threshold,
        ValueError,
    )
    err = torch.maximum(rot_err, trans_err).flatten().float()
    ks = torch.arange(1, int(threshold) + 1, device=err.device, dtype=err.dtype)
    return (err[None, :] < ks[:, None]).float().mean(1).mean()


def centre_error(pred_c2w: Tensor, gt_c2w: Tensor) -> Tensor:
    """Mean distance between aligned predicted and true camera centres, divided by the true trajectory's
    spread (RMS distance of the true centres from their mean): ``[...]``, scale-free. Align first."""
    gt_c = gt_c2w[..., :3, 3]
    spread = (gt_c - gt_c.mean(-2, keepdim=True)).square().sum(-1).mean(-1).sqrt()
    return (pred_c2w[..., :3, 3] - gt_c).norm(dim=-1).mean(-1) / spread.clamp(min=1e-9)


def camera_metrics(
    pred_c2w: Tensor, gt_c2w: Tensor, thresholds: tuple[int, ...] = (5, 15, 30)
) -> tuple[dict[str, Tensor], Tensor]:
    """All pose metrics of predicted against true trajectories, averaged over the leading dimensions.

    Args:
        pred_c2w: ``[..., V, 4, 4]`` predicted cameras (any frame and scale), ``V >= 2``.
        gt_c2w: ``[..., V, 4, 4]`` true cameras.
        thresholds: the AUC thresholds in degrees.

    Returns:
        ``(metrics, aligned)``: scalar tensors ``rot_err`` and ``trans_err`` (mean pairwise errors in
        degrees), ``centre_err`` (aligned camera-centre error relative to the trajectory's spread) and
        ``auc{τ}`` per threshold; and the predicted cameras aligned to the true ones (``[..., V, 4, 4]``).
    """
    if pred_c2w.shape != gt_c2w.shape or pred_c2w.shape[-3] < 2:
        raise ValueError(
            f"camera_metrics needs matching [..., V>=2, 4, 4] poses, got {tuple(pred_c2w.shape)} "
            f"and {tuple(gt_c2w.shape)}"
        )
    pred, gt = pred_c2w.float(), gt_c2w.float()
    aligned = align_trajectory(pred, gt)
    rot = relative_rotation_error(aligned, gt)
    trans = translation_direction_error(aligned, gt)
    metrics = {"rot_err": rot.mean(), "trans_err": trans.mean(), "centre_err": centre_error(aligned, gt).mean()}
    for tau in thresholds:
        metrics[f"auc{tau}"] = pose_auc(rot, trans, tau)
    return metrics, aligned


def relative_pose_accuracy(
    pred_c2w: Tensor, gt_c2w: Tensor, thresholds: tuple[int, ...] = (5, 15, 30)
) -> dict[str, Tensor]:
    """RPA@τ (the VGGT / E-RayZer protocol): the fraction of view pairs whose relative pose is within ``τ``
    degrees, a pair's error being the larger of its relative rotation error and its translation direction
    error; pooled over the leading dimensions. Pairwise, so no alignment is needed. ``{"rpa5": ..., ...}``."""
    err = torch.maximum(relative_rotation_error(pred_c2w.float(), gt_c2w.float()),
                        translation_direction_error(pred_c2w.float(), gt_c2w.float()))  # fmt: skip
    return {f"rpa{tau}": (err < tau).float().mean() for tau in thresholds}
