"""Cameras as small pure functions on tensors with any leading batch shape.

Conventions (the shard format's, see ``docs/shard-format.md``):

* ``c2w``: ``[..., 4, 4]`` camera-to-world, OpenCV axes (x right, y down, z forward).
* ``K``: ``[..., 3, 3]`` intrinsics in pixels; the image's top-left corner is ``(0, 0)``, so the centre
  of pixel ``(row i, column j)`` is at ``(u, v) = (j + 0.5, i + 0.5)`` and a centred principal point is
  ``(W / 2, H / 2)``.
* depth is z-depth (along the optical axis), not distance along the ray.
* rotations in 6D (Zhou et al. 2019): the first two *columns* of the matrix, ``[..., 6]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------------------- rotations and SE(3)
def rotation_6d_to_matrix(d6: Tensor) -> Tensor:
    """``[..., 6]`` (two column vectors) to a rotation ``[..., 3, 3]`` by Gram-Schmidt.

    The identity is ``[1, 0, 0, 0, 1, 0]``."""
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def matrix_to_rotation_6d(rot: Tensor) -> Tensor:
    """The inverse of :func:`rotation_6d_to_matrix` for rotations: the first two columns, ``[..., 6]``."""
    return torch.cat([rot[..., :, 0], rot[..., :, 1]], dim=-1)


def make_se3(rot: Tensor, trans: Tensor) -> Tensor:
    """``[..., 3, 3]`` rotation and ``[..., 3]`` translation to a ``[..., 4, 4]`` rigid transform."""
    out = torch.zeros(*rot.shape[:-2], 4, 4, dtype=rot.dtype, device=rot.device)
    out[..., :3, :3] = rot
    out[..., :3, 3] = trans
    out[..., 3, 3] = 1.0
    return out


def se3_inverse(T: Tensor) -> Tensor:
    """Closed-form inverse of rigid transforms ``[..., 4, 4]``: ``(R, t) -> (R^T, -R^T t)``."""
    rot_t = T[..., :3, :3].transpose(-1, -2)
    return make_se3(rot_t, -(rot_t @ T[..., :3, 3:4]).squeeze(-1))


def se3_compose(a: Tensor, b: Tensor) -> Tensor:
    """``a ∘ b`` (apply ``b`` first), ``[..., 4, 4]``."""
    return a @ b


def transform_points(T: Tensor, points: Tensor) -> Tensor:
    """Apply ``[..., 4, 4]`` transforms to ``[..., N, 3]`` points."""
    return points @ T[..., :3, :3].transpose(-1, -2) + T[..., None, :3, 3]


def relative_pose(c2w: Tensor, reference: Tensor) -> Tensor:
    """Poses expressed in the frame of ``reference`` (``[..., 4, 4]``): ``reference^-1 ∘ c2w``."""
    return se3_compose(se3_inverse(reference), c2w)


def relative_to_first(c2w: Tensor) -> tuple[Tensor, Tensor]:
    """Poses ``c2w [B, V, 4, 4]`` in the frame of view 0 and scaled so that the farthest camera centre is at
    distance 1: ``(c2w [B, V, 4, 4], scale [B])``, the scale the world was divided by (depths in the new units are
    ``depth / scale``). How a model that predicts cameras relative to its canonical view sees a scene."""
    rel = torch.linalg.inv(c2w[:, :1]) @ c2w
    scale = rel[:, :, :3, 3].norm(dim=-1).amax(dim=1).clamp(min=1e-6)  # [B]
    rel = torch.cat([rel[..., :3, :3], rel[..., :3, 3:] / scale[:, None, None, None]], dim=-1)
    rel = torch.cat([rel, rel.new_tensor([0.0, 0.0, 0.0, 1.0]).expand(*rel.shape[:2], 1, 4)], dim=-2)
    return rel, scale


def rotation_angle(rot: Tensor) -> Tensor:
    """Angle in radians of rotations ``[..., 3, 3]`` (numerically safe near 0 and π)."""
    cos = ((rot.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0).clamp(-1.0, 1.0)
    return torch.acos(cos)


# ---------------------------------------------------------------------------- intrinsics
def focal_from_fov(fov: Tensor | float, size: int | float) -> Tensor:
    """Focal length in pixels for a field of view (radians) over ``size`` pixels."""
    fov = torch.as_tensor(fov)
    return 0.5 * size / torch.tan(0.5 * fov)


def fov_from_focal(focal: Tensor | float, size: int | float) -> Tensor:
    """Field of view (radians) of a focal length in pixels over ``size`` pixels."""
    return 2.0 * torch.atan(0.5 * size / torch.as_tensor(focal))


def intrinsics_from_focal(fx: Tensor, fy: Tensor, height: int, width: int) -> Tensor:
    """``[..., 3, 3]`` intrinsics with focal lengths ``[...]`` in pixels and a centred principal point."""
    fx = torch.as_tensor(fx)
    fy = torch.as_tensor(fy, dtype=fx.dtype, device=fx.device).expand_as(fx)
    K = torch.zeros(*fx.shape, 3, 3, dtype=fx.dtype, device=fx.device)
    K[..., 0, 0] = fx
    K[..., 1, 1] = fy
    K[..., 0, 2] = width / 2.0
    K[..., 1, 2] = height / 2.0
    K[..., 2, 2] = 1.0
    return K


def intrinsics_from_fov(fov: Tensor | float, height: int, width: int) -> Tensor:
    """Square-pixel intrinsics whose *horizontal* field of view is ``fov`` (radians)."""
    f = focal_from_fov(fov, width)
    return intrinsics_from_focal(f, f, height, width)


def scale_intrinsics(K: Tensor, sx: float, sy: float) -> Tensor:
    """Intrinsics after resizing the image by ``(sx, sy)`` (pixel-corner convention keeps this exact)."""
    S = torch.diag(torch.tensor([sx, sy, 1.0], dtype=K.dtype, device=K.device))
    return S @ K


def crop_intrinsics(K: Tensor, left: float, top: float) -> Tensor:
    """Intrinsics after cropping the image at ``(left, top)``."""
    out = K.clone()
    out[..., 0, 2] -= left
    out[..., 1, 2] -= top
    return out


def normalize_intrinsics(K: Tensor, height: int, width: int) -> Tensor:
    """Pixel intrinsics to resolution-independent ones (image spans ``[0, 1]²``)."""
    return scale_intrinsics(K, 1.0 / width, 1.0 / height)


# ---------------------------------------------------------------------------- pixels, projection
def pixel_centers(
    height: int, width: int, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """``[H, W, 2]`` pixel-centre coordinates ``(u, v) = (j + 0.5, i + 0.5)``."""
    v, u = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype or torch.float32) + 0.5,
        torch.arange(width, device=device, dtype=dtype or torch.float32) + 0.5,
        indexing="ij",
    )
    return torch.stack([u, v], dim=-1)


def camera_directions(K: Tensor, height: int, width: int) -> Tensor:
    """``[..., H, W, 3]`` camera-frame directions through pixel centres with z = 1 (``K^-1 [u, v, 1]``)."""
    uv = pixel_centers(height, width, device=K.device, dtype=K.dtype)
    fx, fy = K[..., 0, 0, None, None], K[..., 1, 1, None, None]
    cx, cy = K[..., 0, 2, None, None], K[..., 1, 2, None, None]
    skew = K[..., 0, 1, None, None]
    y = (uv[..., 1] - cy) / fy
    x = (uv[..., 0] - cx - skew * y) / fx
    return torch.stack([x, y, torch.ones_like(x)], dim=-1)


def unproject_depth(depth: Tensor, K: Tensor, c2w: Tensor) -> Tensor:
    """World points ``[..., H, W, 3]`` of z-depth maps ``[..., 1, H, W]``; cameras broadcast over ``...``."""
    if depth.ndim < 3 or depth.shape[-3] != 1:
        raise ValueError(f"depth must be [..., 1, H, W], got shape {tuple(depth.shape)}")
    depth = depth.squeeze(-3)
    h, w = depth.shape[-2:]
    cam = camera_directions(K, h, w) * depth[..., None]
    return transform_points(c2w, cam.flatten(-3, -2)).unflatten(-2, (h, w))


def project_points(points: Tensor, K: Tensor, c2w: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Project world points ``[..., N, 3]`` into cameras: pixel coordinates ``[..., N, 2]`` and z-depth
    ``[..., N]`` (points behind the camera get ``z <= 0``; their ``uv`` is meaningless)."""
    cam = transform_points(se3_inverse(c2w), points)
    z = cam[..., 2]
    uvw = cam @ K.transpose(-1, -2)
    uv = uvw[..., :2] / uvw[..., 2:3].clamp(min=eps)
    return uv, z


def look_at(eye: Tensor, target: Tensor, up: Tensor | None = None) -> Tensor:
    """OpenCV camera-to-world ``[..., 4, 4]`` of cameras at ``eye`` looking at ``target``; ``up`` is the
    world's up direction (default +z). The camera's y axis (down in the image) points away from ``up``."""
    if up is None:
        up = torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype, device=eye.device).expand_as(eye)
    z = F.normalize(target - eye, dim=-1)
    x = torch.cross(z, up, dim=-1)
    # looking straight along up: fall back to another up vector
    degenerate = x.norm(dim=-1, keepdim=True) < 1e-6
    alt = torch.tensor([0.0, 1.0, 0.0], dtype=eye.dtype, device=eye.device).expand_as(eye)
    x = torch.where(degenerate, torch.cross(z, alt, dim=-1), x)
    x = F.normalize(x, dim=-1)
    y = torch.cross(z, x, dim=-1)
    return make_se3(torch.stack([x, y, z], dim=-1), eye)


def spherical_to_cartesian(azimuth: Tensor, elevation: Tensor, radius: Tensor) -> Tensor:
    """Points on spheres (radians, z up) ``[...] -> [..., 3]``."""
    return torch.stack(
        [
            radius * torch.cos(elevation) * torch.cos(azimuth),
            radius * torch.cos(elevation) * torch.sin(azimuth),
            radius * torch.sin(elevation),
        ],
        dim=-1,
    )


DEG = math.pi / 180.0
