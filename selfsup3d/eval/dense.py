"""Dense probes of frozen features: monocular depth and surface normals.

A small head (:class:`PixelHead`, a per-pixel MLP on standardised features) reads the frozen features
sampled at pixel centres of the common resolution (see :mod:`selfsup3d.eval.features`) and predicts

* depth: the head regresses log z-depth (L1), by default divided by the median depth of its image
  (scale-free: a monocular view does not tell a toy from a table), and each image's prediction is scaled
  by ``median(d) / median(d̂)`` before the errors; reported as RMSE (world units), AbsRel
  (``mean |d̂ - d| / d``) and δ<1.25 (``mean[max(d̂/d, d/d̂) < 1.25]``), pooled over every test pixel with
  known depth (``depth_align="none"`` keeps metric depth throughout);
* normals: the head predicts a 3-vector, normalised; the target is the normal of the true depth
  (:func:`normals_from_depth`) in the camera frame (OpenCV axes, facing the camera); reported as the mean
  angular error in degrees and the fractions within 11.25° and 30°, pooled over test pixels whose normal
  is defined.

Both metric classes are torchmetrics ``Metric`` s holding sums only (DDP-safe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from selfsup3d.geometry.cameras import camera_directions


def normals_from_depth(depth: Tensor, K: Tensor, max_rel_jump: float = 0.05) -> tuple[Tensor, Tensor]:
    """Camera-frame surface normals of z-depth maps by central differences of the back-projected points.

    Args:
        depth: ``[N, 1, H, W]`` z-depth (0 = unknown).
        K: ``[N, 3, 3]`` intrinsics.
        max_rel_jump: a pixel's normal is undefined when a neighbour's depth differs from its own by more
            than this fraction (a depth edge), or when it or a neighbour has no depth; border pixels too.

    Returns:
        ``(normals [N, 3, H, W], valid [N, 1, H, W])``: unit normals pointing towards the camera
        (``n · p < 0`` for the point ``p``), zero where invalid.
    """
    n, _, h, w = depth.shape
    d = depth[:, 0].double()
    points = camera_directions(K.double(), h, w) * d[..., None]  # [N, H, W, 3]
    du = points[:, 1:-1, 2:] - points[:, 1:-1, :-2]
    dv = points[:, 2:, 1:-1] - points[:, :-2, 1:-1]
    normal = torch.cross(du, dv, dim=-1)
    centre = points[:, 1:-1, 1:-1]
    normal = torch.where((normal * centre).sum(-1, keepdim=True) > 0, -normal, normal)
    normal = F.normalize(normal, dim=-1)
    c = d[:, 1:-1, 1:-1]
    neighbours = torch.stack([d[:, 1:-1, 2:], d[:, 1:-1, :-2], d[:, 2:, 1:-1], d[:, :-2, 1:-1]])
    ok = (c > 0) & (neighbours > 0).all(0) & ((neighbours - c).abs() <= max_rel_jump * c).all(0)
    out = torch.zeros(n, h, w, 3, dtype=torch.float64, device=depth.device)
    valid = torch.zeros(n, h, w, dtype=torch.bool, device=depth.device)
    out[:, 1:-1, 1:-1] = torch.where(ok[..., None], normal, torch.zeros_like(normal))
    valid[:, 1:-1, 1:-1] = ok
    return out.permute(0, 3, 1, 2).float(), valid[:, None]


class DepthMetrics(Metric):
    """RMSE, AbsRel and δ<1.25 of predicted against true depth, pooled over pixels (sums only)."""

    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        for name in ("sq_sum", "abs_rel_sum", "delta_sum", "count"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add pixels: ``pred`` and ``target`` of one shape, ``target > 0`` (only pixels with known depth)."""
        pred, target = pred.double().flatten().clamp(min=1e-6), target.double().flatten()
        self.sq_sum += (pred - target).square().sum()
        self.abs_rel_sum += ((pred - target).abs() / target).sum()
        self.delta_sum += (torch.maximum(pred / target, target / pred) < 1.25).sum()
        self.count += target.numel()

    def compute(self) -> dict[str, Tensor]:
        """``rmse``, ``abs_rel``, ``delta1`` (NaN without pixels)."""
        n = self.count if self.count > 0 else torch.tensor(float("nan"), dtype=torch.float64)
        return {"rmse": (self.sq_sum / n).sqrt(), "abs_rel": self.abs_rel_sum / n, "delta1": self.delta_sum / n}


class NormalMetrics(Metric):
    """Mean angular error (degrees) of predicted normals and the fractions within 11.25° and 30° (sums only)."""

    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        for name in ("angle_sum", "within_11", "within_30", "count"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add pixels: ``[P, 3]`` predicted and true normals (normalised here)."""
        cos = (F.normalize(pred.double(), dim=-1) * F.normalize(target.double(), dim=-1)).sum(-1)
        angle = torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))
        self.angle_sum += angle.sum()
        self.within_11 += (angle < 11.25).sum()
        self.within_30 += (angle < 30.0).sum()
        self.count += angle.numel()

    def compute(self) -> dict[str, Tensor]:
        """``mean_deg``, ``within11.25``, ``within30`` (NaN without pixels)."""
        n = self.count if self.count > 0 else torch.tensor(float("nan"), dtype=torch.float64)
        return {"mean_deg": self.angle_sum / n, "within11.25": self.within_11 / n, "within30": self.within_30 / n}


class Standardize(nn.Module):
    """Fixed per-channel standardisation ``(x - mean) / std`` with statistics taken once from the probe data.

    Args:
        mean: ``[D]`` channel means.
        std: ``[D]`` channel standard deviations (floored at 1e-6).
    """

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("std", std.detach().float().clamp(min=1e-6).clone())

    @classmethod
    def fit(cls, x: Tensor) -> Standardize:
        """Statistics of ``[N, D]`` samples."""
        x = x.float()
        return cls(x.mean(0), x.std(0, unbiased=False))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class PixelHead(nn.Module):
    """A per-pixel MLP on standardised frozen features: ``[P, D] -> [P, out]``.

    Args:
        norm: the input standardisation (:class:`Standardize` fitted on the probe data, or a non-affine
            ``BatchNorm1d`` when the head trains online).
        dim: feature width ``D``.
        out: outputs per pixel (1 for log depth, 3 for a normal).
        hidden: width of the two hidden layers.
    """

    def __init__(self, norm: nn.Module, dim: int, out: int, hidden: int = 128) -> None:
        super().__init__()
        self.norm = norm
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.norm(x.float()))


def log_depth_loss(pred: Tensor, depth: Tensor) -> Tensor:
    """L1 between predicted log depth ``[P, 1]`` and the log of true depth ``[P]`` (> 0)."""
    return (pred[:, 0] - depth.clamp(min=1e-6).log()).abs().mean()


def normal_loss(pred: Tensor, normal: Tensor) -> Tensor:
    """``1 - cos`` between predicted ``[P, 3]`` and true unit normals ``[P, 3]``."""
    return (1.0 - (F.normalize(pred, dim=-1) * normal).sum(-1)).mean()
