"""Point clouds fused from posed depth maps, a per-scene unit cube, dense voxel grids and their sampling.

The 3D branch of the feature-consensus objective sees a scene as the coloured (or feature-carrying) point
cloud fused from its views' depth maps and cameras, voxelised into a dense grid inside the cube
``[-1, 1]^3``. These are the pure functions it is built from.

Conventions (stated once; the camera ones are :mod:`selfsup3d.geometry.cameras`'s):

* Cameras: ``K [..., 3, 3]`` in pixels, pixel centres at ``+0.5``; ``c2w [..., 4, 4]`` OpenCV
  camera-to-world; depth is z-depth, ``0`` or non-finite = unknown.
* Points are ``(x, y, z)`` in the last axis. Per-pixel quantities of ``V`` views of ``H x W`` flatten to
  ``V * H * W`` points in ``(view, row, column)`` order (row-major per view, views one after the other).
* The unit cube: a per-scene similarity ``u = (x - centre) * scale`` (:class:`UnitCube`) maps the scene
  into ``[-1, 1]^3``. Cameras follow with the same rotation, their centre moved and z-depths multiplied by
  ``scale``, so they stay rigid (:meth:`UnitCube.cameras_to_unit`).
* Dense grids are ``[B, C, D, H, W]`` over the unit cube with ``D = H = W = R`` (the resolution). **Axis
  order: the grid's last axis ``W`` is ``x``, ``H`` is ``y``, ``D`` is ``z``**: voxel ``[b, :, k, j, i]``
  holds the point ``(x, y, z)`` with ``i = floor((x + 1) / 2 * R)``, ``j`` from ``y``, ``k`` from ``z``;
  this is the order in which ``F.grid_sample`` reads the last coordinate of a 5D sampling grid
  (``(x, y, z) -> (W, H, D)``). Voxel ``i`` spans ``[-1 + 2i/R, -1 + 2(i+1)/R]`` and its centre is at
  ``-1 + (2i + 1)/R``: ``align_corners=False``, the convention :func:`sample_grid` samples with.
* Rays for rendering have camera z = 1 directions (as in :mod:`selfsup3d.geometry.volume`), so ``t``
  along a ray is z-depth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup3d.errors import require
from selfsup3d.geometry.cameras import camera_directions, make_se3, unproject_depth


# ---------------------------------------------------------------------------- fusing views
def depth_to_points(depth: Tensor, K: Tensor, c2w: Tensor) -> tuple[Tensor, Tensor]:
    """World points of every pixel of every view, and which of them have a depth.

    Args:
        depth: ``[B, V, 1, H, W]`` z-depth maps, 0 or non-finite where unknown.
        K: ``[B, V, 3, 3]`` pixel intrinsics of the depth maps.
        c2w: ``[B, V, 4, 4]`` camera-to-world poses.

    Returns:
        ``points [B, V*H*W, 3]`` (pixels without depth sit at their camera's centre) and ``valid [B, V*H*W]``
        (depth finite and > 0).
    """
    if depth.ndim != 5 or depth.shape[2] != 1:
        raise ValueError(f"depth must be [B, V, 1, H, W], got shape {tuple(depth.shape)}")
    valid = torch.isfinite(depth) & (depth > 0)
    d = torch.where(valid, depth, torch.zeros_like(depth))
    points = unproject_depth(d, K, c2w)  # [B, V, H, W, 3]
    return points.flatten(1, 3), valid.flatten(1)


def values_at_pixels(values: Tensor, height: int, width: int) -> Tensor:
    """Per-pixel values in point order (see the module docstring), to carry along with :func:`depth_to_points`.

    Maps at another resolution than the depth (e.g. 2D features on a patch grid) are resampled bilinearly
    at the depth pixels' centres (``align_corners=False``: a feature cell covers its share of the image).
    Project wide features down first: the result has one row per depth pixel.

    Args:
        values: ``[B, V, C, h, w]`` colours or features.
        height: depth map height ``H``.
        width: depth map width ``W``.

    Returns:
        ``[B, V*H*W, C]``.
    """
    if values.ndim != 5:
        raise ValueError(f"values must be [B, V, C, h, w], got shape {tuple(values.shape)}")
    b, v, c = values.shape[:3]
    if values.shape[-2:] != (height, width):
        values = F.interpolate(values.flatten(0, 1), size=(height, width), mode="bilinear", align_corners=False)
        values = values.view(b, v, c, height, width)
    return values.permute(0, 1, 3, 4, 2).reshape(b, v * height * width, c)


def sample_pixels(maps: Tensor, uv: Tensor) -> Tensor:
    """Bilinear samples of image-like maps at continuous pixel coordinates (zero outside the map), in float32
    at least.

    Args:
        maps: ``[B, C, H, W]``.
        uv: ``[B, N, 2]`` pixel coordinates ``(u, v)`` in the map's own pixels (centre of pixel ``(i, j)``
            at ``(j + 0.5, i + 0.5)``).

    Returns:
        ``[B, N, C]``.
    """
    h, w = maps.shape[-2:]
    dtype = torch.promote_types(torch.promote_types(maps.dtype, uv.dtype), torch.float32)
    scale = torch.tensor([2.0 / w, 2.0 / h], dtype=dtype, device=uv.device)
    grid = (uv.to(dtype) * scale - 1.0).unsqueeze(1)  # [B, 1, N, 2]
    out = F.grid_sample(maps.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, :, 0].transpose(1, 2)


# ---------------------------------------------------------------------------- the unit cube
@dataclass
class UnitCube:
    """A per-scene similarity into the unit cube: ``u = (x - centre) * scale``.

    Attributes:
        centre: ``[B, 3]`` world point at the cube's centre.
        scale: ``[B]`` unit-cube lengths per world length.
    """

    centre: Tensor
    scale: Tensor

    def to_unit(self, points: Tensor) -> Tensor:
        """World points ``[B, ..., 3]`` into the cube."""
        shape = (points.shape[0],) + (1,) * (points.ndim - 2)
        return (points - self.centre.view(*shape, 3)) * self.scale.view(*shape, 1)

    def from_unit(self, points: Tensor) -> Tensor:
        """Cube points ``[B, ..., 3]`` back into the world."""
        shape = (points.shape[0],) + (1,) * (points.ndim - 2)
        return points / self.scale.view(*shape, 1) + self.centre.view(*shape, 3)

    def matrix(self) -> Tensor:
        """``[B, 4, 4]`` homogeneous world-to-cube matrix (``scale * I``, ``-scale * centre``)."""
        b = self.centre.shape[0]
        eye = torch.eye(3, dtype=self.centre.dtype, device=self.centre.device).expand(b, 3, 3)
        return make_se3(eye * self.scale.view(b, 1, 1), -self.centre * self.scale.view(b, 1))

    def cameras_to_unit(self, c2w: Tensor) -> Tensor:
        """Camera-to-world poses ``[B, V, 4, 4]`` into rigid camera-to-cube poses (same rotation, moved and
        scaled centre); z-depths in the cube are ``depth * scale`` (:meth:`depth_to_unit`)."""
        out = c2w.clone()
        out[..., :3, 3] = self.to_unit(c2w[..., :3, 3])
        return out

    def depth_to_unit(self, depth: Tensor) -> Tensor:
        """World z-depths ``[B, ...]`` to cube z-depths (unknown stays 0)."""
        return depth * self.scale.view(-1, *([1] * (depth.ndim - 1)))


def fit_unit_cube(points: Tensor, valid: Tensor, margin: float = 0.1, quantile: float = 0.0) -> UnitCube:
    """The similarity that fits each scene's valid points into ``[-1 + margin, 1 - margin]^3``.

    The centre is the middle of the points' bounding box, the scale makes its longest side span the cube
    less the margin (the same scale on every axis). ``quantile > 0`` trims the box to the ``quantile`` and
    ``1 - quantile`` quantiles per axis, so that a few far points (a ground plane to the horizon) do not
    shrink the scene; the trimmed points then fall outside the cube and are dropped by :func:`voxelize`.

    Args:
        points: ``[B, N, 3]`` world points.
        valid: ``[B, N]`` which points count.
        margin: share of the half-side kept free at each face, in ``[0, 1)``.
        quantile: per-axis trimming of the bounding box, in ``[0, 0.5)``.

    Returns:
        :class:`UnitCube`; a scene without valid points gets centre 0 and scale 1.
    """
    require(0.0 <= margin < 1.0, "margin", "in [0, 1)", margin, ValueError)
    require(0.0 <= quantile < 0.5, "quantile", "in [0, 0.5)", quantile, ValueError)
    p = points.detach().float()
    v = valid[..., None].expand_as(p)
    if quantile > 0.0:
        # torch.quantile takes at most 2^24 elements: a regular subset of the points is plenty for a box
        stride = -(-p.numel() // 2**24)
        p, v = p[:, ::stride], v[:, ::stride]
        masked = torch.where(v, p, torch.full_like(p, float("nan")))
        q = torch.tensor([quantile, 1.0 - quantile], dtype=p.dtype, device=p.device)
        lo, hi = torch.nanquantile(masked.transpose(1, 2), q, dim=-1).unbind(0)  # [B, 3] each
    else:
        inf = torch.full_like(p, float("inf"))
        lo = torch.where(v, p, inf).amin(dim=1)
        hi = torch.where(v, p, -inf).amax(dim=1)
    empty = ~valid.any(dim=1)
    lo = torch.where(empty[:, None], torch.zeros_like(lo), lo)
    hi = torch.where(empty[:, None], torch.zeros_like(hi), hi)
    centre = 0.5 * (lo + hi)
    half = (0.5 * (hi - lo)).amax(dim=1)
    scale = torch.where(half > 1e-8, (1.0 - margin) / half.clamp(min=1e-8), torch.ones_like(half))
    return UnitCube(centre=centre.to(points.dtype), scale=scale.to(points.dtype))


# ---------------------------------------------------------------------------- voxel grids
def voxel_indices(points: Tensor, resolution: int) -> tuple[Tensor, Tensor]:
    """Voxel ``(i, j, k)`` (x, y, z) of cube points ``[..., 3]`` and whether they lie inside the cube."""
    idx = torch.floor((points + 1.0) * (0.5 * resolution)).long()
    inside = ((idx >= 0) & (idx < resolution)).all(dim=-1) & torch.isfinite(points).all(dim=-1)
    return idx.clamp(0, resolution - 1), inside


def voxel_centres(resolution: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """``[R, R, R, 3]`` cube coordinates ``(x, y, z)`` of the voxel centres, indexed ``[k, j, i]`` (z, y, x)."""
    c = (torch.arange(resolution, device=device, dtype=dtype or torch.float32) * 2 + 1) / resolution - 1.0
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def voxelize(points: Tensor, values: Tensor | None, valid: Tensor, resolution: int) -> Tensor:
    """Average per-point values into a dense grid over the unit cube, plus an occupancy channel.

    Args:
        points: ``[B, N, 3]`` cube points (those outside ``[-1, 1]^3`` are dropped).
        values: ``[B, N, C]`` per-point values (colours, features), or ``None`` for occupancy only.
        valid: ``[B, N]`` which points count.
        resolution: voxels per side ``R``.

    Returns:
        ``[B, C + 1, R, R, R]`` (axis order in the module docstring): the mean value of each voxel's points
        (0 in empty voxels) and, last, the occupancy (1 where a point fell, else 0). Gradients flow to
        ``values``.
    """
    require(resolution >= 1, "resolution", ">= 1", resolution, ValueError)
    b, n = points.shape[:2]
    c = 0 if values is None else values.shape[-1]
    idx, inside = voxel_indices(points.detach(), resolution)
    keep = (valid & inside).reshape(-1)
    r3 = resolution**3
    batch = torch.arange(b, device=points.device)[:, None]
    flat = batch * r3 + (idx[..., 2] * resolution + idx[..., 1]) * resolution + idx[..., 0]
    flat = flat.reshape(-1)[keep]
    dtype = values.dtype if values is not None else points.dtype
    # sums and counts in float32 at least: bf16 counts stop being exact at 256 points per voxel
    acc = torch.promote_types(dtype, torch.float32)
    counts = torch.zeros(b * r3, device=points.device, dtype=acc).index_add_(0, flat, torch.ones_like(flat, dtype=acc))
    channels = [(counts > 0).to(acc)[:, None]]
    if values is not None:
        sums = torch.zeros(b * r3, c, device=points.device, dtype=acc).index_add(
            0, flat, values.reshape(b * n, c)[keep].to(acc)
        )
        channels.insert(0, sums / counts.clamp(min=1)[:, None])
    grid = torch.cat(channels, dim=1).to(dtype)  # [B*R^3, C+1]
    return grid.view(b, resolution, resolution, resolution, c + 1).permute(0, 4, 1, 2, 3).contiguous()


def sample_grid(grid: Tensor, points: Tensor) -> Tensor:
    """Trilinear samples of a dense grid at cube points (zero outside the cube).

    ``F.grid_sample`` on the 5D grid with ``align_corners=False``: the points' ``(x, y, z)`` address the grid's
    ``(W, H, D)`` axes (module docstring). Computed in float32 at least (a bf16 grid is upcast).

    Args:
        grid: ``[B, C, D, H, W]``.
        points: ``[B, ..., 3]`` cube points.

    Returns:
        ``[B, ..., C]``.
    """
    b, lead = points.shape[0], points.shape[1:-1]
    # float32 at least: bf16 coordinates are off by up to a quarter voxel of a 64^3 grid
    dtype = torch.promote_types(torch.promote_types(grid.dtype, points.dtype), torch.float32)
    coords = points.reshape(b, -1, 1, 1, 3).to(dtype)
    out = F.grid_sample(grid.to(dtype), coords, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.view(b, grid.shape[1], -1).transpose(1, 2).reshape(b, *lead, grid.shape[1])  # [B, ..., C]


def grid_field(features: Tensor, density: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """A field for :func:`selfsup3d.geometry.volume.render_rays` that reads a density grid and a feature
    grid with one trilinear lookup per sample.

    Args:
        features: ``[B, C, R, R, R]`` values to render (colours, features, scores).
        density: ``[B, 1, R, R, R]`` non-negative densities, per unit of cube length.

    Returns:
        ``field(points [B, R, S, 3]) -> (density [B, R, S], values [B, R, S, C])``.
    """
    grid = torch.cat([features, density.to(features.dtype)], dim=1)

    def field(points: Tensor) -> tuple[Tensor, Tensor]:
        out = sample_grid(grid, points)
        return out[..., -1], out[..., :-1]

    return field


# ---------------------------------------------------------------------------- rays and the cube
def posed_rays(K: Tensor, c2w: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """World rays through pixel centres with camera z = 1 directions (``t`` is z-depth).

    Args:
        K: ``[..., 3, 3]`` intrinsics.
        c2w: ``[..., 4, 4]`` poses.
        height: image height.
        width: image width.

    Returns:
        ``origins`` and ``directions``, each ``[..., H*W, 3]`` in row-major pixel order.
    """
    dirs_cam = camera_directions(K, height, width).flatten(-3, -2)  # [..., H*W, 3]
    dirs = dirs_cam @ c2w[..., :3, :3].transpose(-1, -2)
    origins = c2w[..., None, :3, 3].expand_as(dirs)
    return origins, dirs


def ray_box_intersection(
    origins: Tensor, directions: Tensor, lo: float = -1.0, hi: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Where rays enter and leave the axis-aligned box ``[lo, hi]^3`` (slab method).

    Args:
        origins: ``[..., 3]``.
        directions: ``[..., 3]``, any length (components may be 0); with camera z = 1 directions ``t`` is
            z-depth.

    Returns:
        ``t_near``, ``t_far`` ``[...]`` (``t_near >= 0``: a ray starting inside enters at 0) and ``hit``
        (the ray meets the box in front of its origin: ``t_far > t_near``). Where ``hit`` is false both
        ``t`` are 0.
    """
    parallel = directions == 0
    safe = torch.where(parallel, torch.ones_like(directions), directions)
    t0, t1 = (lo - origins) / safe, (hi - origins) / safe
    inf = torch.full_like(t0, float("inf"))
    # a ray parallel to a slab is inside it for all t, or never
    in_slab = (origins >= lo) & (origins <= hi)
    t_min = torch.where(parallel, torch.where(in_slab, -inf, inf), torch.minimum(t0, t1))
    t_max = torch.where(parallel, torch.where(in_slab, inf, -inf), torch.maximum(t0, t1))
    t_near = t_min.amax(dim=-1).clamp(min=0.0)
    t_far = t_max.amin(dim=-1)
    hit = t_far > t_near
    zero = torch.zeros_like(t_near)
    return torch.where(hit, t_near, zero), torch.where(hit, t_far, zero), hit


def scale_to_common_centre(c2w: Tensor, K: Tensor, depth: Tensor) -> Tensor:
    """Poses whose translations have no unit (a camera estimator's), scaled so the views' point clouds share a centre.

    View ``i``'s cloud has its centroid at ``R_i m_i + s t_i`` (``m_i`` the mean of its camera-frame points with
    depth); the scale ``s`` minimising the spread of those centroids over the views has the closed form
    ``s = -<a, b> / <b, b>`` with ``a_i = R_i m_i``, ``b_i = t_i`` (both centred over the views). Exact when the
    views see the same part of the scene; a fair estimate for views around one object.

    Args:
        c2w: ``[B, V, 4, 4]`` poses of unknown scale.
        K: ``[B, V, 3, 3]`` intrinsics of the depth maps.
        depth: ``[B, V, 1, H, W]`` z-depths (0 unknown), in the unit the result should have.

    Returns:
        ``[B, V, 4, 4]``: rotations unchanged, translations times ``s`` (at least ``1e-3``).
    """
    h, w = depth.shape[-2:]
    known = (depth > 0).to(depth.dtype)[:, :, 0, ..., None]  # [B, V, H, W, 1]
    cam = camera_directions(K, h, w) * depth[:, :, 0, ..., None]
    mean_cam = (cam * known).sum((2, 3)) / known.sum((2, 3)).clamp(min=1)  # [B, V, 3]
    a = (c2w[..., :3, :3] @ mean_cam[..., None]).squeeze(-1)
    t = c2w[..., :3, 3]
    a, t = a - a.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    scale = (-(a * t).sum((1, 2)) / t.square().sum((1, 2)).clamp(min=1e-8)).clamp(min=1e-3)
    out = c2w.clone()
    out[..., :3, 3] = c2w[..., :3, 3] * scale[:, None, None]
    return out
