"""Relative camera pose from a pair of frozen feature maps (the frozen-encoder pose probe of MuM, CVPR 2026,
reimplemented from its description): a small head trained on the probe split reads the two views'
feature maps and predicts the relative rotation and the direction of the translation.

Conventions: the target of a pair ``(i, j)`` is camera ``j`` in camera ``i``'s frame,
``T = c2w_i^-1 c2w_j`` (OpenCV axes, :mod:`selfsup3d.geometry.cameras`): its rotation ``R_i^T R_j`` and
its unit translation (the direction from camera ``i`` to camera ``j``, scale-free). Errors:

* rotation error: the angle of ``R̂^T R`` in degrees;
* translation-direction error: the angle between the predicted and true directions in degrees;
* AUC@τ: the mean over ``k = 1..τ`` degrees of the fraction of pairs with an error below ``k`` (the
  histogram definition of :func:`selfsup3d.metrics.pose.pose_auc`), for rotation alone, translation alone
  and their maximum (the figure pose papers report).

The head sees both maps on one common ``g × g`` grid (:func:`~selfsup3d.eval.features.resample_grid`),
each channel standardised with probe-split statistics. "Chance" is the best constant answer (the
rotation nearest the mean of the probe-split rotations and their mean direction, :func:`prior_pose`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from selfsup3d.errors import require
from selfsup3d.eval.dense import Standardize
from selfsup3d.geometry.cameras import relative_pose, rotation_6d_to_matrix, rotation_angle


def relative_pose_targets(c2w_i: Tensor, c2w_j: Tensor) -> tuple[Tensor, Tensor]:
    """Rotation ``[..., 3, 3]`` and unit translation direction ``[..., 3]`` of camera ``j`` in ``i``'s frame."""
    rel = relative_pose(c2w_j.double(), c2w_i.double())
    return rel[..., :3, :3].float(), F.normalize(rel[..., :3, 3], dim=-1).float()


def pose_errors(rot_pred: Tensor, dir_pred: Tensor, rot_true: Tensor, dir_true: Tensor) -> tuple[Tensor, Tensor]:
    """Rotation and translation-direction errors in degrees, ``[P]`` each."""
    rot_err = torch.rad2deg(rotation_angle(rot_pred.double().transpose(-1, -2) @ rot_true.double()))
    cos = (F.normalize(dir_pred.double(), dim=-1) * F.normalize(dir_true.double(), dim=-1)).sum(-1)
    return rot_err.float(), torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0))).float()


def prior_pose(rot: Tensor, direction: Tensor) -> tuple[Tensor, Tensor]:
    """The constant answer: the rotation nearest (Frobenius) the mean of ``rot [P, 3, 3]`` and the mean of the
    unit directions ``[P, 3]``, normalised."""
    U, _, Vh = torch.linalg.svd(rot.double().mean(0))
    d = torch.sign(torch.linalg.det(U @ Vh))
    fix = torch.diag(torch.tensor([1.0, 1.0, float(d) if d != 0 else 1.0], dtype=torch.float64))
    return (U @ fix @ Vh).float(), F.normalize(direction.double().mean(0), dim=-1).float()


class PoseAUC(Metric):
    """Pose AUC up to ``max_threshold`` degrees from sums of per-threshold counts (DDP-safe), plus mean errors.

    Args:
        max_threshold: the AUC's largest threshold in whole degrees (30 as MuM reports).
    """

    full_state_update = False

    def __init__(self, max_threshold: int = 30, **kwargs: object) -> None:
        super().__init__(**kwargs)
        require(
            max_threshold >= 1 and int(max_threshold) == max_threshold,
            "max_threshold",
            "a positive whole number of degrees",
            max_threshold,
            ValueError,
        )
        self.max_threshold = int(max_threshold)
        for name in ("rot_below", "trans_below", "both_below"):
            self.add_state(name, torch.zeros(self.max_threshold, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("rot_sum", "trans_sum", "count"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, rot_err: Tensor, trans_err: Tensor) -> None:
        """Add pairs: rotation and translation-direction errors in degrees, ``[P]`` each."""
        ks = torch.arange(1, self.max_threshold + 1, dtype=torch.float64, device=self.count.device)
        r, t = rot_err.double().flatten().to(ks.device), trans_err.double().flatten().to(ks.device)
        self.rot_below += (r[:, None] < ks).sum(0)
        self.trans_below += (t[:, None] < ks).sum(0)
        self.both_below += (torch.maximum(r, t)[:, None] < ks).sum(0)
        self.rot_sum += r.sum()
        self.trans_sum += t.sum()
        self.count += r.numel()

    def compute(self) -> dict[str, Tensor]:
        """``rot_auc``, ``trans_auc``, ``auc`` (both), ``rot_err``, ``trans_err`` (mean degrees); NaN without pairs."""
        n = self.count if self.count > 0 else torch.tensor(float("nan"), dtype=torch.float64)
        return {
            "rot_auc": (self.rot_below / n).mean(),
            "trans_auc": (self.trans_below / n).mean(),
            "auc": (self.both_below / n).mean(),
            "rot_err": self.rot_sum / n,
            "trans_err": self.trans_sum / n,
        }


class PoseHead(nn.Module):
    """Relative pose from two ``[P, D, g, g]`` feature maps: standardised channels, a shared 1×1 projection of
    each map to ``proj`` channels, the two stacked, two stride-2 3×3 convolutions, then an MLP to a 6D
    rotation and a translation direction.

    Args:
        norm: per-channel standardisation of the maps (fitted on the probe split).
        dim: channels ``D``.
        grid: the maps' side ``g`` (a multiple of 4).
        proj: channels of each map after the shared projection.
        hidden: convolution width.
    """

    def __init__(self, norm: Standardize, dim: int, grid: int = 8, proj: int = 32, hidden: int = 64) -> None:
        super().__init__()
        require(grid % 4 == 0, "the pose probe's grid", "a multiple of 4", grid, ValueError)
        self.norm = norm
        self.project = nn.Conv2d(dim, proj, 1)
        self.conv = nn.Sequential(
            nn.GELU(),
            nn.Conv2d(2 * proj, hidden, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1),
            nn.GELU(),
        )
        self.mlp = nn.Sequential(nn.Linear(hidden * (grid // 4) ** 2, 256), nn.GELU(), nn.Linear(256, 9))
        with torch.no_grad():  # start at the identity rotation
            self.mlp[-1].weight.mul_(0.01)
            self.mlp[-1].bias.copy_(torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0, 1]))

    def _embed(self, x: Tensor) -> Tensor:
        return self.project(self.norm(x.float().permute(0, 2, 3, 1)).permute(0, 3, 1, 2))

    def forward(self, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
        """``(rotation [P, 3, 3], unit direction [P, 3])`` of the second view in the first's frame."""
        x = torch.cat([self._embed(first), self._embed(second)], dim=1)
        out = self.mlp(self.conv(x).flatten(1))
        return rotation_6d_to_matrix(out[:, :6]), F.normalize(out[:, 6:], dim=-1)


def pose_loss(rot_pred: Tensor, dir_pred: Tensor, rot_true: Tensor, dir_true: Tensor) -> Tensor:
    """Squared Frobenius distance of the rotations plus ``1 - cos`` of the directions, averaged over pairs."""
    rot = (rot_pred - rot_true).square().sum((-1, -2))
    return (rot + 1.0 - (dir_pred * dir_true).sum(-1)).mean()
