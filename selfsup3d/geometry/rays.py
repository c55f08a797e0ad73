"""Rays and Plücker ray maps.

A ray map assigns every pixel the ray through its centre (see :mod:`selfsup3d.geometry.cameras` for the
conventions). Plücker coordinates describe a ray independently of the point chosen on it: the unit
direction ``d`` and the moment ``m = o × d``. Ray maps here are channels-first, ``[..., 6, H, W]`` with
channels ``(d, m)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup3d.geometry.cameras import camera_directions, scale_intrinsics


def pixel_rays(K: Tensor, c2w: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """World-space rays through pixel centres: origins and unit directions, each ``[..., H, W, 3]``."""
    dirs_cam = camera_directions(K, height, width)
    rot = c2w[..., None, None, :3, :3]
    dirs = F.normalize((rot @ dirs_cam[..., None]).squeeze(-1), dim=-1)
    origins = c2w[..., None, None, :3, 3].expand_as(dirs)
    return origins, dirs


def plucker(origins: Tensor, dirs: Tensor) -> Tensor:
    """Plücker coordinates ``(d, o × d)`` of rays ``[..., 3]`` -> ``[..., 6]`` (``d`` normalised)."""
    d = F.normalize(dirs, dim=-1)
    return torch.cat([d, torch.cross(origins, d, dim=-1)], dim=-1)


def plucker_map(K: Tensor, c2w: Tensor, height: int, width: int) -> Tensor:
    """Pixel-level Plücker ray map ``[..., 6, H, W]`` of cameras ``K [..., 3, 3]``, ``c2w [..., 4, 4]``."""
    o, d = pixel_rays(K, c2w, height, width)
    return plucker(o, d).movedim(-1, -3)


def plucker_patch_map(K: Tensor, c2w: Tensor, height: int, width: int, patch: int) -> Tensor:
    """Plücker map at patch resolution ``[..., 6, H/p, W/p]``: the rays through patch centres.

    ``K`` is for the full-resolution image; it is rescaled to the patch grid."""
    if height % patch or width % patch:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch}")
    return plucker_map(scale_intrinsics(K, 1.0 / patch, 1.0 / patch), c2w, height // patch, width // patch)


def patchify(x: Tensor, patch: int) -> Tensor:
    """``[..., C, H, W] -> [..., N, C * p * p]`` with ``N = (H/p) (W/p)`` row-major patches; each patch's
    features are ordered ``(C, p, p)``."""
    *lead, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"size {h}x{w} is not a multiple of the patch size {patch}")
    gh, gw = h // patch, w // patch
    x = x.reshape(-1, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5)  # [B, gh, gw, C, p, p]
    return x.reshape(*lead, gh * gw, c * patch * patch)


def unpatchify(tokens: Tensor, patch: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`patchify`: ``[..., N, C * p * p] -> [..., C, H, W]``."""
    *lead, n, f = tokens.shape
    gh, gw = height // patch, width // patch
    if n != gh * gw or height % patch or width % patch:
        raise ValueError(f"{n} tokens do not tile a {height}x{width} image with patch {patch}")
    c = f // (patch * patch)
    x = tokens.reshape(-1, gh, gw, c, patch, patch).permute(0, 3, 1, 4, 2, 5)  # [B, C, gh, p, gw, p]
    return x.reshape(*lead, c, height, width)
