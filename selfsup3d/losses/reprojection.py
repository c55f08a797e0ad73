"""The auto-masked minimum reprojection loss of self-supervised depth and ego-motion (monodepth2, Godard et al.
2019), over all ordered pairs of a scene's views: a photometric loss that depends on the predicted cameras and
depth, and on nothing else (no camera or depth labels).

For every view ``t`` (the target of the warp) and every other view ``s`` of the scene, ``s`` is warped into ``t``
through ``t``'s predicted depth and both predicted cameras (:func:`~selfsup3d.geometry.warp.warp_view`); the
per-pixel error is the mean absolute colour difference. Per pixel of ``t``:

* the minimum over sources ``s`` (a pixel occluded or out of view in one source is usually visible in another);
* auto-masking: the pixel counts only where that minimum is below the minimum error of the *unwarped*
  sources (pixels that look the same without any warp, such as a plain background, teach nothing about
  geometry and would reward cameras that do not move);
* sources where the pixel lands outside the image or behind the camera do not count for it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfsup3d.geometry.warp import warp_view

INVALID_ERROR = 1e3
"""Error given to a pixel whose warp leaves the source image, so that the minimum never picks it."""


def ordered_pairs(num_views: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Every ``(t, s)`` with ``s != t``, grouped by ``t``: two ``[V (V - 1)]`` index tensors."""
    t = torch.arange(num_views, device=device).repeat_interleave(num_views - 1)
    s = torch.tensor([j for i in range(num_views) for j in range(num_views) if j != i], device=device)
    return t, s


def min_reprojection_loss(
    images: Tensor, depth: Tensor, K: Tensor, c2w: Tensor, auto_mask: bool = True
) -> dict[str, Tensor]:
    """The auto-masked minimum reprojection loss of a batch of scenes.

    Args:
        images: ``[B, V, 3, H, W]`` views in ``[0, 1]``, ``V >= 2``.
        depth: ``[B, V, 1, H, W]`` predicted z-depth of every view.
        K: ``[B, V, 3, 3]`` predicted intrinsics (pixels).
        c2w: ``[B, V, 4, 4]`` predicted camera-to-world.
        auto_mask: drop pixels whose unwarped error is already the smaller one.

    Returns:
        ``loss`` (mean masked error, a scalar) and ``used`` (share of pixels that count).
    """
    b, v, _, h, w = images.shape
    if v < 2:
        raise ValueError(f"the reprojection loss needs at least two views, got {v}")
    t, s = ordered_pairs(v, images.device)
    images = images.float()

    def pick(x: Tensor, idx: Tensor) -> Tensor:
        return x[:, idx].flatten(0, 1)

    warped, valid = warp_view(
        pick(images, s), pick(depth.float(), t), pick(K.float(), t), pick(c2w.float(), t), pick(K.float(), s),
        pick(c2w.float(), s),
    )  # fmt: skip
    target = pick(images, t)
    err = (warped - target).abs().mean(1, keepdim=True)
    err = torch.where(valid > 0, err, torch.full_like(err, INVALID_ERROR)).view(b, v, v - 1, h, w)
    best = err.min(dim=2).values  # [B, V, H, W]
    if auto_mask:
        still = (pick(images, s) - target).abs().mean(1).view(b, v, v - 1, h, w).min(dim=2).values
        mask = (best < still).float()
    else:
        mask = (best < INVALID_ERROR).float()
    used = mask.sum()
    loss = (best * mask).sum() / used.clamp(min=1.0)
    return {"loss": loss, "used": used.detach() / mask.numel()}
