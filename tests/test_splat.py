"""The Gaussian splatter (selfsup3d.geometry.splat): against its brute-force definition, analytic projections,
and an analytic scene where true depth and cameras re-render a view and wrong cameras do not."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup3d.geometry.cameras import camera_directions, intrinsics_from_fov, look_at
from selfsup3d.geometry.splat import (
    covariance,
    project,
    rasterize,
    rasterize_reference,
)
from selfsup3d.heads.gaussians import PixelGaussians, render_gaussians


def random_scene(images: int = 3, gaussians: int = 50, height: int = 12, width: int = 16, seed: int = 0):
    """Anisotropic Gaussians in front of cameras with an off-centre principal point, in float64."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.randn(images, gaussians, 3, generator=g) * 0.3).double()
    scales = (torch.rand(images, gaussians, 3, generator=g) * 0.08 + 0.01).double()
    quats = torch.randn(images, gaussians, 4, generator=g).double()
    opacities = torch.rand(images, gaussians, generator=g).double()
    colours = torch.rand(images, gaussians, 4, generator=g).double()
    K = intrinsics_from_fov(math.radians(50), height, width).double().expand(images, 3, 3).clone()
    K[:, 0, 2] += 1.3
    K[:, 1, 2] -= 0.7
    eye = torch.tensor([[0.1, -2.0, 0.3], [1.5, -1.5, 0.5], [0.0, -1.8, -0.2]]).double()[:images]
    c2w = look_at(eye, torch.zeros(images, 3).double())
    background = torch.rand(images, 4, generator=g).double()
    return means, scales, quats, opacities, colours, K, c2w, background


def test_rasterize_matches_the_brute_force_definition_in_values_and_gradients():
    means, scales, quats, opacities, colours, K, c2w, background = random_scene()
    leaves = [t.requires_grad_() for t in (means, scales, quats, opacities, colours)]
    height, width = 12, 16

    def render(fn):
        projected = project(means, covariance(scales, quats), K, c2w, height, width)
        return fn(projected, opacities, colours, height, width, background)

    fast_image, fast_alpha = render(lambda *a: rasterize(*a, max_radius=None))
    ref_image, ref_alpha = render(rasterize_reference)
    assert fast_alpha.mean() > 0.2  # the Gaussians do cover the images
    torch.testing.assert_close(fast_image, ref_image, atol=1e-10, rtol=0)
    torch.testing.assert_close(fast_alpha, ref_alpha, atol=1e-10, rtol=0)
    weights = torch.randn_like(fast_image)
    fast = torch.autograd.grad((fast_image * weights).sum() + fast_alpha.sum(), leaves)
    ref_image, ref_alpha = render(rasterize_reference)
    ref = torch.autograd.grad((ref_image * weights).sum() + ref_alpha.sum(), leaves)
    for name, a, b in zip(("means", "scales", "quats", "opacities", "colours"), fast, ref):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=f"gradient of {name}")


def test_an_opaque_front_gaussian_hides_the_ones_behind_it_and_stops_compositing():
    K = intrinsics_from_fov(math.radians(60), 8, 8).double()[None]
    c2w = torch.eye(4).double()[None]
    # three Gaussians on the optical axis, nearest last in the list: depth order decides, not list order
    means = torch.tensor([[[0.0, 0.0, 3.0], [0.0, 0.0, 2.0], [0.0, 0.0, 1.0]]]).double()
    scales = torch.full((1, 3, 1), 0.6).double()  # about four pixels wide at depth 1
    projected = project(means, covariance(scales), K, c2w, 8, 8)
    colours = torch.eye(3).double()[None]  # red far, green middle, blue near
    image, alpha = rasterize(projected, torch.ones(1, 3).double(), colours, 8, 8)
    centre = image[0, :, 3:5, 3:5].mean((1, 2))
    # blue in front (0.999 of it), green behind takes what is left, and compositing stops before red
    assert centre[2] > 0.98 and centre[0] == 0
    assert alpha.max() < 1
    reference, _ = rasterize_reference(projected, torch.ones(1, 3).double(), colours, 8, 8)
    torch.testing.assert_close(image, reference)


def test_projection_of_an_isotropic_gaussian_is_analytic():
    height = width = 32
    K = intrinsics_from_fov(math.radians(40), height, width).double()[None]
    c2w = torch.eye(4).double()[None]
    point = torch.tensor([[[0.1, -0.05, 2.0]]]).double()
    sigma = 0.02
    projected = project(point, covariance(torch.full((1, 1, 1), sigma).double()), K, c2w, height, width, eps2d=0.0)
    f, c = K[0, 0, 0], K[0, 0, 2]
    torch.testing.assert_close(projected.means2d[0, 0], torch.stack([f * 0.1 / 2.0 + c, f * -0.05 / 2.0 + c]))
    assert projected.depths[0, 0] == pytest.approx(2.0)
    # near the axis the image-plane variance is about (f sigma / z)^2 (the conic is its inverse)
    expected = (f * sigma / 2.0) ** 2
    a, b, cc = projected.conics[0, 0]
    assert 1 / a == pytest.approx(float(expected), rel=0.02) and abs(float(b)) < 0.05 * float(a)


def test_gaussians_behind_the_camera_are_not_drawn():
    K = intrinsics_from_fov(math.radians(60), 8, 8)[None]
    means = torch.tensor([[[0.0, 0.0, -1.0], [0.0, 0.0, 0.005]]])
    projected = project(means, covariance(torch.full((1, 2, 1), 0.1)), K, torch.eye(4)[None], 8, 8)
    assert (projected.radii == 0).all()
    image, alpha = rasterize(projected, torch.ones(1, 2), torch.ones(1, 2, 3), 8, 8)
    assert alpha.abs().max() == 0


def test_covariances_rotate_with_wxyz_quaternions():
    q = torch.tensor([math.cos(math.pi / 8), 0.0, 0.0, math.sin(math.pi / 8)])  # (w, x, y, z): 45 degrees about z
    cov = covariance(torch.tensor([3.0, 1.0, 2.0]), 2.0 * q)  # not normalised: normalised first
    axis = torch.tensor([0.5**0.5, 0.5**0.5, 0.0])  # the x axis turned 45 degrees about z
    torch.testing.assert_close(cov @ axis, 9.0 * axis)
    torch.testing.assert_close(cov[2, 2], torch.tensor(4.0))


def plane_scene(size: int = 32):
    """Two cameras looking at a textured plane z = 0 (smooth colours): the images, z-depths and cameras, all
    analytic (each pixel's ray met with the plane)."""
    K = intrinsics_from_fov(math.radians(50), size, size)
    eyes = torch.tensor([[0.0, -1.0, 2.2], [0.6, -0.9, 2.1]])
    c2w = look_at(eyes, torch.zeros(2, 3))
    dirs = camera_directions(K, size, size)  # z = 1
    images, depths = [], []
    for cam in c2w:
        world = dirs @ cam[:3, :3].T  # [H, W, 3], the direction per unit z-depth
        t = -cam[2, 3] / world[..., 2]  # z-depth where the ray meets the plane
        p = cam[:3, 3] + t[..., None] * world
        colour = torch.stack(
            [
                0.5 + 0.4 * torch.sin(3 * p[..., 0]),
                0.5 + 0.4 * torch.cos(2 * p[..., 1]),
                0.5 + 0.3 * torch.sin(2 * (p[..., 0] - p[..., 1])),
            ],
            dim=0,
        )
        images.append(colour)
        depths.append(t[None])
    return torch.stack(images), torch.stack(depths), K.expand(2, 3, 3), c2w


def splat_view(image, depth, K, c2w, K_target, c2w_target, size_px=0.5):
    """One view's pixels as opaque pixel-aligned Gaussians, rendered into a target camera."""
    h, w = image.shape[-2:]
    points = camera_directions(K, h, w) * depth[0, ..., None]
    means = points.reshape(-1, 3) @ c2w[:3, :3].T + c2w[:3, 3]
    gaussians = PixelGaussians(
        means=means[None],
        scales=(depth.reshape(-1, 1) * size_px / K[0, 0])[None],
        opacities=torch.full((1, h * w), 0.99),
        colours=image.permute(1, 2, 0).reshape(1, -1, 3),
        depth=depth[None, None],
        background=torch.zeros(1, 3),
    )
    return render_gaussians(gaussians, K_target[None, None], c2w_target[None, None], h, w, backend="torch")


def test_true_depth_and_cameras_rerender_a_view_and_wrong_cameras_do_not():
    images, depths, K, c2w = plane_scene()
    out = splat_view(images[0], depths[0], K[0], c2w[0], K[1], c2w[1])
    covered = out["alpha"][0, 0, 0] > 0.99
    assert covered.float().mean() > 0.6
    error = (out["image"][0, 0] - images[1]).square().mean(0)[covered].mean()
    # the rendered z-depth is the target's own
    depth_error = ((out["depth"][0, 0, 0] - depths[1, 0]).abs() / depths[1, 0])[covered].median()
    turned = c2w[1].clone()
    angle = math.radians(8)
    turn = torch.tensor([[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]])
    turned[:3, :3] = turned[:3, :3] @ turn
    wrong = splat_view(images[0], depths[0], K[0], c2w[0], K[1], turned)
    covered_wrong = wrong["alpha"][0, 0, 0] > 0.99
    wrong_error = (wrong["image"][0, 0] - images[1]).square().mean(0)[covered_wrong].mean()
    assert -10 * math.log10(error) > 28  # PSNR on the covered pixels
    assert depth_error < 0.02  # neighbouring splats blend their depths a little
    assert wrong_error > 10 * error


def test_gradients_of_the_render_reach_the_cameras_and_depth():
    images, depths, K, c2w = plane_scene(16)
    depth = depths[0].clone().requires_grad_()
    target = c2w[1].clone().requires_grad_()
    out = splat_view(images[0], depth, K[0], c2w[0], K[1], target)
    loss = (out["image"][0, 0] - images[1]).square().mean()
    loss.backward()
    assert depth.grad.abs().sum() > 0 and target.grad[:3].abs().sum() > 0
