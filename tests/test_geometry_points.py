"""Point clouds, unit cube, voxel grids, grid sampling and ray-box intersection against analytic cases;
voxelising a known sphere and rendering its occupancy gives the known depth."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup3d.geometry.cameras import intrinsics_from_fov, look_at, project_points, spherical_to_cartesian
from selfsup3d.geometry.points import (
    depth_to_points,
    fit_unit_cube,
    grid_field,
    posed_rays,
    ray_box_intersection,
    sample_grid,
    sample_pixels,
    values_at_pixels,
    voxel_centres,
    voxel_indices,
    voxelize,
)
from selfsup3d.geometry.volume import render_rays


def ring_cameras(
    num_views: int, radius: float = 3.0, elevation_deg: float = 20.0, azimuth: float = 0.3
) -> torch.Tensor:
    """``[V, 4, 4]`` cameras on a ring around the origin, looking at it."""
    az = torch.arange(num_views) * (2 * math.pi / num_views) + azimuth
    el = torch.full_like(az, math.radians(elevation_deg))
    eye = spherical_to_cartesian(az, el, torch.full_like(az, radius))
    return look_at(eye, torch.zeros_like(eye))


def sphere_depth(K: torch.Tensor, c2w: torch.Tensor, size: int, centre: torch.Tensor, r: float) -> torch.Tensor:
    """Analytic z-depth ``[V, 1, H, W]`` of a sphere (0 where the ray misses it)."""
    o, d = posed_rays(K, c2w, size, size)  # d has camera z = 1, so t is z-depth
    oc = o - centre
    a = d.square().sum(-1)
    b = 2 * (d * oc).sum(-1)
    c = oc.square().sum(-1) - r * r
    disc = b * b - 4 * a * c
    t = (-b - disc.clamp(min=0).sqrt()) / (2 * a)
    return torch.where(disc > 0, t, torch.zeros_like(t)).view(-1, 1, size, size)


# ---------------------------------------------------------------------------- fusing views
def test_depth_to_points_lands_on_the_plane_and_flags_missing_depth():
    # cameras looking down at the plane z = 0 from above: every pixel's depth is known analytically
    c2w = look_at(
        torch.tensor([[0.3, -0.2, 2.0], [-0.5, 0.4, 1.5]]), torch.zeros(2, 3), up=torch.tensor([[0.0, 1, 0]] * 2)
    )
    K = intrinsics_from_fov(math.radians(50), 8, 8).expand(2, 3, 3)
    o, d = posed_rays(K, c2w, 8, 8)
    depth = (-o[..., 2] / d[..., 2]).view(1, 2, 1, 8, 8).clone()
    depth[0, 0, 0, 1, 2] = 0.0
    depth[0, 1, 0, 3, 3] = float("nan")
    points, valid = depth_to_points(depth, K[None], c2w[None])
    assert points.shape == (1, 128, 3) and valid.shape == (1, 128)
    assert valid.sum() == 126
    assert not valid[0, 1 * 8 + 2] and not valid[0, 64 + 3 * 8 + 3]
    assert torch.allclose(points[valid][:, 2], torch.zeros(126), atol=1e-5)
    assert torch.isfinite(points).all()


def test_values_follow_the_points_order_and_are_resampled_at_pixel_centres():
    b, v, h, w = 2, 3, 4, 5
    vv, rr, cc = torch.meshgrid(torch.arange(v), torch.arange(h), torch.arange(w), indexing="ij")
    code = torch.stack([vv, rr, cc], dim=1).float()  # [V, 3, H, W]: each pixel's (view, row, column)
    values = values_at_pixels(code.expand(b, v, 3, h, w), h, w)
    assert values.shape == (b, v * h * w, 3)
    n = 1 * h * w + 2 * w + 3  # view 1, row 2, column 3
    assert values[1, n].tolist() == [1.0, 2.0, 3.0]
    # a 2x2 feature map resampled to 4x4: bilinear at pixel centres, so the corner pixels keep the corners
    feats = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 1, 2, 2)
    up = values_at_pixels(feats, 4, 4).view(4, 4)
    assert up[0, 0] == 0.0 and up[3, 3] == 3.0
    assert up[1, 1].item() == pytest.approx(0.75)  # 3/4 of the way to the centre: (0 + 1 + 2 + 3)/4 weighted


def test_sample_pixels_reads_pixel_centres():
    maps = torch.arange(12.0).view(1, 1, 3, 4)
    uv = torch.tensor([[[0.5, 0.5], [3.5, 2.5], [2.0, 1.5]]])
    out = sample_pixels(maps, uv)[0, :, 0]
    assert out.tolist() == pytest.approx([0.0, 11.0, 5.5], abs=1e-5)


# ---------------------------------------------------------------------------- unit cube
def test_unit_cube_fits_the_box_is_invertible_and_moves_cameras_rigidly():
    torch.manual_seed(0)
    points = torch.rand(2, 50, 3) * torch.tensor([4.0, 1.0, 2.0]) + torch.tensor([10.0, -3.0, 0.5])
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, 0] = False
    points[1, 0] = 1e6  # invalid: must not count
    cube = fit_unit_cube(points, valid, margin=0.1)
    u = cube.to_unit(points)
    assert u[valid].abs().max().item() == pytest.approx(0.9, abs=1e-5)  # the longest side touches the margin
    assert torch.allclose(cube.from_unit(u)[valid], points[valid], atol=1e-4)
    # the homogeneous matrix is the same map
    hom = torch.cat([points, torch.ones(2, 50, 1)], -1) @ cube.matrix().transpose(1, 2)
    assert torch.allclose(hom[..., :3], u, atol=1e-5)
    # cameras: same pixels, depth times scale, pose still rigid
    c2w = look_at(
        torch.tensor([[[14.0, 2.0, 3.0]], [[8.0, -6.0, 2.0]]]).view(2, 1, 3),
        torch.tensor([[12.0, -2.5, 1.5]] * 2).view(2, 1, 3),
    )
    K = intrinsics_from_fov(math.radians(40), 16, 16).expand(2, 1, 3, 3)
    unit_c2w = cube.cameras_to_unit(c2w)
    uv_w, z_w = project_points(points[:, None], K, c2w)
    uv_u, z_u = project_points(u[:, None], K, unit_c2w)
    assert torch.allclose(uv_w, uv_u, atol=1e-3)
    assert torch.allclose(cube.depth_to_unit(z_w), z_u, atol=1e-4)
    rot = unit_c2w[..., :3, :3]
    assert torch.allclose(rot @ rot.transpose(-1, -2), torch.eye(3).expand_as(rot), atol=1e-5)


def test_unit_cube_quantile_ignores_far_outliers():
    torch.manual_seed(1)
    points = torch.rand(1, 1000, 3) * 2 - 1  # the object: [-1, 1]^3
    points[0, :5] = torch.tensor([100.0, 0.0, 0.0])  # a few far points (a ground plane to the horizon)
    valid = torch.ones(1, 1000, dtype=torch.bool)
    plain = fit_unit_cube(points, valid, margin=0.0)
    robust = fit_unit_cube(points, valid, margin=0.0, quantile=0.01)
    assert plain.scale.item() < 0.05
    assert robust.scale.item() == pytest.approx(1.0, rel=0.05)


# ---------------------------------------------------------------------------- voxel grids
def test_voxelize_averages_values_per_voxel_and_drops_outside_and_invalid_points():
    r = 4  # voxels of side 0.5: voxel i spans [-1 + i/2, -1 + (i+1)/2]
    points = torch.tensor(
        [
            [-0.9, -0.9, -0.9],  # voxel (0, 0, 0)
            [-0.6, -0.6, -0.6],  # voxel (0, 0, 0) too
            [0.6, -0.1, 0.2],  # x -> i 3, y -> j 1, z -> k 2
            [1.5, 0.0, 0.0],  # outside: dropped
            [0.1, 0.1, 0.1],  # invalid: dropped
        ]
    )[None]
    values = torch.tensor([[1.0], [3.0], [5.0], [7.0], [9.0]])[None].requires_grad_()
    valid = torch.tensor([[True, True, True, True, False]])
    grid = voxelize(points, values, valid, r)
    assert grid.shape == (1, 2, r, r, r)
    occ = grid[0, 1]
    assert occ.sum() == 2
    assert occ[0, 0, 0] == 1 and occ[2, 1, 3] == 1  # indexed [k, j, i] = (z, y, x)
    assert grid[0, 0, 0, 0, 0] == 2.0 and grid[0, 0, 2, 1, 3] == 5.0
    assert grid[0, 0].sum() == 7.0
    grid[0, 0].sum().backward()
    assert values.grad[0, :, 0].tolist() == [0.5, 0.5, 1.0, 0.0, 0.0]
    # occupancy only
    assert torch.equal(voxelize(points, None, valid, r), grid[:, 1:].detach())
    # a batch: each scene's points land in its own grid
    pair = voxelize(torch.cat([points, -points]), torch.cat([values, values]).detach(), valid.repeat(2, 1), r)
    assert torch.equal(pair[0], grid[0].detach())
    assert pair[1, 1].sum() == 2 and pair[1, 1, 3, 3, 3] == 1 and pair[1, 1, 1, 2, 0] == 1
    assert pair[1, 0, 3, 3, 3] == 2.0 and pair[1, 0, 1, 2, 0] == 5.0


def test_voxelize_and_sample_grid_keep_float32_accuracy_for_bf16_inputs():
    # 300 points in one voxel: bf16 counts would stop at 256
    points = torch.full((1, 300, 3), 0.1)
    values = torch.linspace(0, 2, 300, dtype=torch.bfloat16).view(1, 300, 1)
    grid = voxelize(points, values, torch.ones(1, 300, dtype=torch.bool), 4)
    assert grid.dtype == torch.bfloat16
    assert grid[0, 0, 2, 2, 2].item() == pytest.approx(values.float().mean().item(), rel=1e-2)
    # a bf16 ramp (exact: voxel centres are multiples of 1/64) read at a coordinate bf16 cannot hold
    ramp = voxel_centres(64).permute(3, 0, 1, 2)[None].to(torch.bfloat16)
    x = torch.tensor([[[0.7012, -0.3005, 0.1001]]])
    out = sample_grid(ramp, x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, x, atol=1e-4)


def test_voxel_centres_and_indices_agree():
    centres = voxel_centres(5)
    idx, inside = voxel_indices(centres.view(-1, 3), 5)
    assert inside.all()
    k, j, i = torch.meshgrid(torch.arange(5), torch.arange(5), torch.arange(5), indexing="ij")
    assert torch.equal(idx, torch.stack([i, j, k], -1).view(-1, 3))


def test_sample_grid_axis_order_x_is_width_y_is_height_z_is_depth():
    r = 4
    grid = torch.zeros(1, 1, r, r, r)
    grid[0, 0, 1, 2, 3] = 1.0  # k = 1 (z), j = 2 (y), i = 3 (x)
    centre = voxel_centres(r)[1, 2, 3]
    assert centre.tolist() == [0.75, 0.25, -0.25]
    assert sample_grid(grid, centre.view(1, 1, 3)).item() == pytest.approx(1.0)
    # the same coordinates in another order read empty voxels
    for perm in ([2, 1, 0], [1, 0, 2], [0, 2, 1]):
        assert sample_grid(grid, centre[perm].view(1, 1, 3)).item() == 0.0
    # a grid that is a linear ramp along each axis is reproduced exactly between voxel centres
    ramp = voxel_centres(r).permute(3, 0, 1, 2)[None]  # channels (x, y, z)
    pts = torch.tensor([[[0.1, -0.3, 0.5], [-0.6, 0.7, 0.0]]])
    assert torch.allclose(sample_grid(ramp, pts), pts, atol=1e-6)
    # leading shape is kept
    assert sample_grid(ramp, torch.zeros(1, 2, 5, 3)).shape == (1, 2, 5, 3)


# ---------------------------------------------------------------------------- rays and the box
def test_ray_box_intersection_analytic_cases():
    origins = torch.tensor(
        [
            [0.0, 0.0, -3.0],  # straight through: enters at 2, leaves at 4
            [0.0, 0.0, 0.0],  # from inside: enters at 0
            [0.0, 3.0, -3.0],  # parallel to the box above it: misses
            [0.0, 0.5, -3.0],  # parallel, inside the y slab: hits
            [0.0, 0.0, 3.0],  # the box is behind: misses
            [-3.0, -3.0, -3.0],  # along the diagonal, direction not unit: t in units of the direction
        ]
    )
    directions = torch.tensor(
        [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [2.0, 2.0, 2.0]]
    )
    t_near, t_far, hit = ray_box_intersection(origins, directions)
    assert hit.tolist() == [True, True, False, True, False, True]
    assert t_near.tolist() == pytest.approx([2.0, 0.0, 0.0, 2.0, 0.0, 1.0])
    assert t_far.tolist() == pytest.approx([4.0, 1.0, 0.0, 4.0, 0.0, 2.0])
    # a custom box
    t_near, t_far, hit = ray_box_intersection(origins[:1], directions[:1], lo=-0.5, hi=2.0)
    assert (t_near.item(), t_far.item()) == pytest.approx((2.5, 5.0))


def test_ray_box_t_is_z_depth_for_camera_rays():
    c2w = look_at(torch.tensor([[2.0, 3.0, 1.0]]), torch.zeros(1, 3))
    K = intrinsics_from_fov(math.radians(30), 6, 6)
    o, d = posed_rays(K[None], c2w, 6, 6)
    t_near, _, hit = ray_box_intersection(o, d)
    assert hit.all()
    entry = o + t_near[..., None] * d
    _, z = project_points(entry, K[None], c2w)
    assert torch.allclose(z, t_near, atol=1e-5)
    assert (entry.abs().amax(-1) - 1).abs().max() < 1e-5  # on the box's surface


# ---------------------------------------------------------------------------- fuse, voxelise, render
def test_voxelised_sphere_rendered_through_its_occupancy_gives_the_known_depth():
    """Fuse 8 views of a sphere, voxelise at 32^3, render the occupancy as density: silhouettes and depths of
    every view, and of a ninth view that was never fused, match the analytic ones.

    Voxels hold the surface up to a voxel outside it, and the trilinear occupancy's 0.5 level lies half a
    voxel beyond the outermost occupied centres, so the rendered surface sits up to about a voxel in front of
    the true one (a voxel is 1.2 pixels here): silhouettes agree up to two pixels outside and one inside,
    depths within 1.5 voxels on average."""
    size, r, res = 32, 0.6, 32
    centre = torch.tensor([0.1, -0.05, 0.0])
    c2w = torch.cat([ring_cameras(8), ring_cameras(1, radius=2.6, elevation_deg=5.0, azimuth=0.3 + math.pi / 8)])
    K = intrinsics_from_fov(math.radians(40), size, size).expand(9, 3, 3)
    depth = sphere_depth(K, c2w, size, centre, r)
    points, valid = depth_to_points(depth[None, :8], K[None, :8], c2w[None, :8])
    occupancy = voxelize(points, None, valid, res)
    assert occupancy.shape == (1, 1, res, res, res) and occupancy.sum() > 500
    # the surface at the occupancy's 0.5 level: opaque past it, empty before it
    field = grid_field(occupancy, (occupancy - 0.5).clamp(min=0) * 800.0)
    o, d = posed_rays(K, c2w, size, size)  # [9, H*W, 3]
    t_near, t_far, hit = ray_box_intersection(o, d)
    near, far = t_near[hit].min().item(), t_far[hit].max().item()
    voxel = 2.0 / res
    for v in range(9):
        out = render_rays(field, o[v : v + 1], d[v : v + 1], near, far, num_coarse=96, num_fine=32, perturb=False)
        truth = depth[v, 0].flatten()
        mask = (truth > 0).view(1, 1, size, size).float()
        inner = (-F.max_pool2d(-mask, 3, 1, 1)).flatten() > 0
        outer = F.max_pool2d(mask, 5, 1, 2).flatten() > 0
        assert (out.opacity[0][inner] > 0.5).all(), v
        assert (out.opacity[0][~outer] < 0.5).all(), v
        err = (out.depth[0] - truth)[inner].abs()
        assert err.mean() < 1.5 * voxel, (v, err.mean().item())
