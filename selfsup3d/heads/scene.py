"""The 3D branch of the feature-consensus objective (ConDense): the scene in 3D form, a 3D backbone over it,
and its feature grid rendered into every view.

* J3D, the input head (:meth:`SceneBranch.embed`): the views' pixels with known depth become a point cloud in
  a per-scene unit cube (:func:`~selfsup3d.geometry.points.fit_unit_cube`), each point carrying its colour
  (``scene_input: colour``) or the 2D branch's feature at that pixel (``features``), voxelised into a dense
  grid with an occupancy channel (:func:`~selfsup3d.geometry.points.voxelize`).
* H3D, the 3D backbone (:class:`~selfsup3d.layers.unet3d.UNet3D`): the grid to ``C`` feature channels and a
  density; optionally the 3D key-point head (:class:`~selfsup3d.heads.keypoints.KeypointHead3D`) on the features.
* Rendering (:meth:`SceneBranch.render`): rays of every view through the cube (one per cell of the view's
  feature map), features and depth volume-rendered by the shared
  :class:`~selfsup3d.geometry.render.RayRenderer` between where each ray enters and leaves the cube.

All geometry is in the unit cube: cameras are moved in with :meth:`~selfsup3d.geometry.points.UnitCube.cameras_to_unit`
and depths scaled with :meth:`~selfsup3d.geometry.points.UnitCube.depth_to_unit`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup3d.geometry.cameras import scale_intrinsics
from selfsup3d.geometry.points import (
    UnitCube,
    depth_to_points,
    fit_unit_cube,
    grid_field,
    ray_box_intersection,
    values_at_pixels,
    voxelize,
)
from selfsup3d.geometry.render import RayRenderer, camera_rays
from selfsup3d.heads.keypoints import KeypointHead3D
from selfsup3d.layers.unet3d import UNet3D


@dataclass
class SceneGrid:
    """A scene's 3D form after the backbone (grids ``[B, ·, R, R, R]`` over its unit cube).

    Attributes:
        cube: the similarity from the world into the unit cube.
        features: ``[B, C, R, R, R]`` the feature grid ``F^s``.
        density: ``[B, 1, R, R, R]`` non-negative density per unit cube length.
        occupancy: ``[B, 1, R, R, R]`` where the fused points fell (the input's occupancy channel).
        scores: ``[B, 1, R, R, R]`` 3D key-point score logits (with key points), else ``None``.
        descriptors: ``[B, E, R, R, R]`` unit 3D key-point descriptors (with key points), else ``None``.
    """

    cube: UnitCube
    features: Tensor
    density: Tensor
    occupancy: Tensor
    scores: Tensor | None = None
    descriptors: Tensor | None = None

    def pooled_features(self) -> Tensor:
        """``[B, C]``: the feature grid averaged over the occupied voxels (a global descriptor of the scene)."""
        occ = self.occupancy
        return (self.features * occ).sum((2, 3, 4)) / occ.sum((2, 3, 4)).clamp(min=1)


class SceneBranch(nn.Module):
    """J3D + H3D + rendering (see the module docstring).

    Args:
        in_channels: channels each point carries (3 for colours, the 2D features' for ``features``).
        feature_dim: channels ``C`` of the feature grid.
        grid_size: voxels per side ``R`` (divisible by ``2 ** levels``).
        width: channels of the U-Net at full resolution.
        levels: the U-Net's down-sampling stages.
        descriptor_dim: 3D key-point descriptor channels (0: no key-point head).
        num_coarse: stratified samples per ray.
        num_fine: importance samples per ray.
        cube_margin: share of the cube kept free around the scene's points.
        ray_chunk: rays per scene rendered at a time (``null``: all at once).
    """

    def __init__(
        self,
        in_channels: int,
        feature_dim: int,
        grid_size: int = 32,
        width: int = 16,
        levels: int = 3,
        descriptor_dim: int = 0,
        num_coarse: int = 16,
        num_fine: int = 16,
        cube_margin: float = 0.1,
        ray_chunk: int | None = None,
    ) -> None:
        super().__init__()
        self.config = {
            "in_channels": in_channels,
            "feature_dim": feature_dim,
            "grid_size": grid_size,
            "width": width,
            "levels": levels,
            "descriptor_dim": descriptor_dim,
            "num_coarse": num_coarse,
            "num_fine": num_fine,
            "cube_margin": cube_margin,
            "ray_chunk": ray_chunk,
        }
        self.grid_size, self.feature_dim, self.cube_margin = grid_size, feature_dim, cube_margin
        self.backbone = UNet3D(in_channels + 1, feature_dim + 1, width=width, levels=levels)
        self.keypoints = KeypointHead3D(feature_dim, descriptor_dim) if descriptor_dim > 0 else None
        self.renderer = RayRenderer(0.0, 1.0, num_coarse, num_fine, background=None, chunk=ray_chunk)

    # ------------------------------------------------------------------ J3D and H3D
    def fit_cube(self, depth: Tensor, K: Tensor, c2w: Tensor, mask: Tensor | None = None) -> UnitCube:
        """The unit cube of each scene: around its points with depth (and in the foreground ``mask``)."""
        points, valid = depth_to_points(depth, K, c2w)
        if mask is not None:
            valid = valid & (mask > 0.5).flatten(1)
        return fit_unit_cube(points, valid, margin=self.cube_margin, quantile=0.0 if mask is not None else 0.02)

    def embed(self, depth: Tensor, K: Tensor, c2w: Tensor, values: Tensor, cube: UnitCube) -> Tensor:
        """J3D: the views' points (``depth [B, V, 1, H, W]``, cameras) with their ``values [B, V, Ci, h, w]``,
        voxelised in ``cube``: ``[B, Ci + 1, R, R, R]`` (mean values, occupancy last)."""
        points, valid = depth_to_points(depth, K, c2w)
        carried = values_at_pixels(values, depth.shape[-2], depth.shape[-1])
        return voxelize(cube.to_unit(points), carried, valid, self.grid_size)

    def forward(self, grid_input: Tensor, cube: UnitCube) -> SceneGrid:
        """H3D: the voxelised scene to its feature grid, density and (optionally) key-point maps."""
        out = self.backbone(grid_input).float()
        features = out[:, : self.feature_dim]
        density = F.softplus(out[:, self.feature_dim :] - 1.0) * self.grid_size  # opaque within a few voxels
        scene = SceneGrid(cube, features, density, occupancy=grid_input[:, -1:])
        if self.keypoints is not None:
            scene.scores, scene.descriptors = self.keypoints(features)
        return scene

    # ------------------------------------------------------------------ rendering
    def render(
        self,
        scene: SceneGrid,
        K: Tensor,
        c2w: Tensor,
        size: tuple[int, int],
        image_hw: tuple[int, int],
        perturb: bool,
        pixels: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Render the feature grid into views: a ray through the centre of each cell of an ``size`` map, or
        through chosen pixels of the images.

        Args:
            scene: the scene's grids.
            K: ``[B, V, 3, 3]`` intrinsics of the images.
            c2w: ``[B, V, 4, 4]`` world poses (moved into the cube here).
            size: ``(h, w)`` of the rendered maps.
            image_hw: ``(H, W)`` of the images ``K`` belongs to.
            perturb: random sample positions (training).
            pixels: ``[B, V, R]`` flat indices of image pixels to render instead of a map (row-major in
                ``H x W``); the results are then ``R x 1`` "maps".

        Returns:
            Features ``[B, V, C, h, w]``, z-depth in cube units ``[B, V, 1, h, w]`` and opacity ``[B, V, 1, h, w]``
            (``h, w = R, 1`` with ``pixels``).
        """
        b, v = c2w.shape[:2]
        c2w_cube = scene.cube.cameras_to_unit(c2w)
        if pixels is None:
            h, w = size
            K_map = scale_intrinsics(K, w / image_hw[1], h / image_hw[0])
            origins, directions = camera_rays(K_map, c2w_cube, h, w)  # [B, V, h*w, 3]
        else:
            h, w = pixels.shape[-1], 1
            origins, directions = camera_rays(K, c2w_cube, image_hw[0], image_hw[1], pixels)
        origins, directions = origins.flatten(1, 2), directions.flatten(1, 2)
        near, far, hit = ray_box_intersection(origins, directions)
        far = torch.where(hit, far, near + 1e-3)  # rays that miss the cube see nothing
        field = grid_field(scene.features, scene.density)
        out = self.renderer(field, origins.float(), directions.float(), perturb, near.float(), far.float())

        def maps(x: Tensor) -> Tensor:
            return x.view(b, v, h, w, -1).permute(0, 1, 4, 2, 3)

        return maps(out.values), maps(out.depth[..., None]), maps(out.opacity[..., None])


def sample_known_pixels(known: Tensor, count: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``count`` random pixels per map among the ``known`` ones (``[N, 1, H, W]`` bool): flat indices ``[N, R]``
    and whether each is known (maps with fewer known pixels fill up with unknown ones, marked false)."""
    flat = known.flatten(1)
    scores = torch.rand(flat.shape, device=known.device, generator=generator) + flat.to(torch.float32)
    index = scores.topk(min(count, flat.shape[1]), dim=1).indices
    return index, flat.gather(1, index)


def pooled_depth(depth: Tensor, size: tuple[int, int], min_share: float = 0.5) -> tuple[Tensor, Tensor]:
    """Depth maps ``[N, 1, H, W]`` averaged over their known pixels into ``size`` cells, and which cells are
    mostly known (at least ``min_share`` of their pixels): ``[N, 1, h, w]`` each."""
    known = (depth > 0).to(depth.dtype)
    total = F.adaptive_avg_pool2d(depth * known, size)
    share = F.adaptive_avg_pool2d(known, size)
    return total / share.clamp(min=1e-6), share >= min_share
