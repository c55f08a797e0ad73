"""Camera and ray functions against analytic cases and kornia."""

from __future__ import annotations

import math

import kornia
import pytest
import torch

from selfsup3d.geometry.cameras import (
    crop_intrinsics,
    fov_from_focal,
    intrinsics_from_fov,
    look_at,
    make_se3,
    matrix_to_rotation_6d,
    pixel_centers,
    project_points,
    relative_pose,
    rotation_6d_to_matrix,
    rotation_angle,
    scale_intrinsics,
    se3_compose,
    se3_inverse,
    transform_points,
    unproject_depth,
)
from selfsup3d.geometry.rays import patchify, pixel_rays, plucker, plucker_map, plucker_patch_map, unpatchify


def random_rotation(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return kornia.geometry.conversions.axis_angle_to_rotation_matrix(torch.randn(n, 3, generator=g))


def random_se3(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return make_se3(random_rotation(n, seed), torch.randn(n, 3, generator=g))


def test_rotation_6d_round_trip_and_identity():
    R = random_rotation(16)
    assert torch.allclose(rotation_6d_to_matrix(matrix_to_rotation_6d(R)), R, atol=1e-5)
    assert torch.allclose(rotation_6d_to_matrix(torch.tensor([1.0, 0, 0, 0, 1, 0])), torch.eye(3))
    # any 6D vector gives a proper rotation
    Rn = rotation_6d_to_matrix(torch.randn(32, 6))
    assert torch.allclose(Rn @ Rn.transpose(-1, -2), torch.eye(3).expand(32, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(Rn), torch.ones(32), atol=1e-5)


def test_se3_inverse_and_compose():
    T = random_se3(8)
    assert torch.allclose(se3_compose(T, se3_inverse(T)), torch.eye(4).expand(8, 4, 4), atol=1e-5)
    assert torch.allclose(se3_inverse(T), torch.linalg.inv(T), atol=1e-5)
    A, B = random_se3(8, 1), random_se3(8, 2)
    p = torch.randn(8, 5, 3)
    assert torch.allclose(
        transform_points(se3_compose(A, B), p), transform_points(A, transform_points(B, p)), atol=1e-5
    )
    assert torch.allclose(relative_pose(T, T), torch.eye(4).expand(8, 4, 4), atol=1e-5)


def test_rotation_angle():
    for angle in [0.0, 0.3, 1.5, 3.0]:
        R = kornia.geometry.conversions.axis_angle_to_rotation_matrix(torch.tensor([[0.0, angle, 0.0]]))
        assert rotation_angle(R).item() == pytest.approx(angle, abs=1e-3)


def test_intrinsics_from_fov():
    K = intrinsics_from_fov(torch.tensor(math.pi / 2), 32, 64)
    assert K[0, 0].item() == pytest.approx(32.0) and K[1, 1].item() == pytest.approx(32.0)
    assert K[0, 2].item() == 32.0 and K[1, 2].item() == 16.0
    assert fov_from_focal(K[0, 0], 64).item() == pytest.approx(math.pi / 2)


def test_project_unproject_round_trip_and_kornia():
    K = intrinsics_from_fov(torch.tensor([0.9, 1.1]), 6, 8)
    c2w = random_se3(2)
    depth = torch.rand(2, 1, 6, 8) + 1.0
    pts = unproject_depth(depth, K, c2w)
    uv, z = project_points(pts.flatten(1, 2), K, c2w)
    assert torch.allclose(uv, pixel_centers(6, 8).flatten(0, 1).expand(2, -1, -1), atol=1e-4)
    assert torch.allclose(z, depth.flatten(1), atol=1e-5)
    # kornia samples pixels at integer coordinates: shift the principal point by half a pixel to compare
    K_k = crop_intrinsics(K, 0.5, 0.5)
    cam = kornia.geometry.depth.depth_to_3d_v2(depth[:, 0], K_k)  # [B, H, W, 3] camera frame
    assert torch.allclose(transform_points(c2w, cam.flatten(1, 2)), pts.flatten(1, 2), atol=1e-4)


def test_scaled_intrinsics_project_consistently():
    K = intrinsics_from_fov(torch.tensor(1.0), 16, 16)
    p = torch.tensor([[0.3, -0.2, 2.0]])
    uv, _ = project_points(p, K, torch.eye(4))
    uv2, _ = project_points(p, scale_intrinsics(K, 0.5, 0.25), torch.eye(4))
    assert torch.allclose(uv2, uv * torch.tensor([0.5, 0.25]), atol=1e-5)


def test_look_at_points_the_optical_axis_at_the_target():
    eye = torch.tensor([[2.0, 1.0, 1.5]])
    c2w = look_at(eye, torch.zeros(1, 3))
    uv, z = project_points(torch.zeros(1, 1, 3), intrinsics_from_fov(torch.tensor(1.0), 10, 10), c2w)
    assert torch.allclose(uv, torch.tensor([[[5.0, 5.0]]]), atol=1e-4) and z.item() > 0
    # world up (+z) appears towards the top of the image (smaller v)
    uv_up, _ = project_points(torch.tensor([[[0.0, 0.0, 0.3]]]), intrinsics_from_fov(torch.tensor(1.0), 10, 10), c2w)
    assert uv_up[0, 0, 1] < 5.0
    assert torch.allclose(torch.linalg.det(c2w[:, :3, :3]), torch.ones(1), atol=1e-5)


def test_pixel_rays_hit_the_unprojected_points():
    K = intrinsics_from_fov(torch.tensor(1.2), 5, 7)
    c2w = random_se3(3)
    depth = torch.rand(3, 1, 5, 7) + 0.5
    o, d = pixel_rays(K, c2w, 5, 7)
    pts = unproject_depth(depth, K, c2w)
    # the point lies on the ray: (p - o) is parallel to d
    assert torch.allclose(torch.cross(pts - o, d, dim=-1), torch.zeros_like(pts), atol=1e-4)
    assert torch.allclose(d.norm(dim=-1), torch.ones(3, 5, 7), atol=1e-5)


def test_plucker_is_invariant_to_the_point_on_the_ray_and_matches_kornia():
    o = torch.randn(10, 3)
    d = torch.nn.functional.normalize(torch.randn(10, 3), dim=-1)
    assert torch.allclose(plucker(o, d), plucker(o + 2.5 * d, d), atol=1e-5)
    # kornia's Plücker convention is (d, o × d) too, for unit directions
    ray = kornia.geometry.line.ParametrizedLine(o, d)
    assert torch.allclose(plucker(o, d)[:, 3:], torch.cross(ray.origin, ray.direction, dim=-1), atol=1e-6)


def test_plucker_maps_shapes_and_patch_centres():
    K = intrinsics_from_fov(torch.tensor(1.0), 16, 24).expand(2, 3, 3, 3)
    c2w = random_se3(6).reshape(2, 3, 4, 4)
    full = plucker_map(K, c2w, 16, 24)
    coarse = plucker_patch_map(K, c2w, 16, 24, patch=8)
    assert full.shape == (2, 3, 6, 16, 24) and coarse.shape == (2, 3, 6, 2, 3)
    # the ray through a patch centre is the mean of the four central pixel rays' directions (approximately)
    centre = full[..., :3, 3:5, 3:5].mean(dim=(-1, -2))
    assert torch.allclose(torch.nn.functional.normalize(centre, dim=-1), coarse[..., :3, 0, 0], atol=1e-3)
    with pytest.raises(ValueError, match="multiple of the patch size 5"):
        plucker_patch_map(K, c2w, 16, 24, patch=5)


def test_patchify_round_trip_and_layout():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 6, 12)
    assert torch.equal(unpatchify(tokens, 2, 4, 6), x)
    # token 4 is patch row 1, column 1; its first features are channel 0's 2x2 block
    assert torch.equal(tokens[0, 4, :4], x[0, 0, 2:4, 2:4].flatten())
