"""Warping one view into another through a depth map and two cameras (conventions of
:mod:`selfsup3d.geometry.cameras`: OpenCV ``c2w``, pixel ``K``, z-depth, pixel centres at ``+0.5``).

:func:`warp_view` is the inverse warp of self-supervised depth and ego-motion (Zhou et al. 2017,
monodepth2): every pixel of the *target* view is lifted to 3D with the target's depth and camera, projected
into the *source* camera, and the source image is sampled there (bilinear). When depth and cameras are right
the warped source reproduces the target wherever both see the same surface, which is what makes a
photometric loss on it depend on geometry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup3d.geometry.cameras import project_points, unproject_depth


def warp_view(
    source: Tensor, target_depth: Tensor, target_K: Tensor, target_c2w: Tensor, source_K: Tensor, source_c2w: Tensor
) -> tuple[Tensor, Tensor]:
    """The source image seen from the target camera.

    Args:
        source: ``[B, C, Hs, Ws]`` source images.
        target_depth: ``[B, 1, H, W]`` z-depth of the target view's pixels.
        target_K: ``[B, 3, 3]`` target intrinsics (pixels of the ``H × W`` target).
        target_c2w: ``[B, 4, 4]`` target camera-to-world.
        source_K: ``[B, 3, 3]`` source intrinsics (pixels of the ``Hs × Ws`` source).
        source_c2w: ``[B, 4, 4]`` source camera-to-world.

    Returns:
        ``(warped [B, C, H, W], valid [B, 1, H, W])``: ``valid`` is 1 where the lifted point is in front of
        the source camera and projects inside the source image (float, no gradient).
    """
    b, _, h, w = target_depth.shape
    hs, ws = source.shape[-2:]
    points = unproject_depth(target_depth, target_K, target_c2w).flatten(1, 2)  # [B, H W, 3]
    uv, z = project_points(points, source_K, source_c2w)
    scale = torch.tensor([2.0 / ws, 2.0 / hs], dtype=uv.dtype, device=uv.device)
    grid = (uv * scale - 1.0).view(b, h, w, 2)
    warped = F.grid_sample(source.to(grid.dtype), grid, mode="bilinear", padding_mode="border", align_corners=False)
    with torch.no_grad():
        inside = (z > 1e-6) & (grid.view(b, h * w, 2).abs() <= 1.0).all(-1)
    return warped, inside.view(b, 1, h, w).to(warped.dtype)
