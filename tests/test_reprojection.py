"""Warping views through depth and cameras, and the auto-masked minimum reprojection loss: on rendered orbit
views the true cameras and depth explain the views, wrong ones do not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfsup3d.datamodules.prepare.render import RenderSettings, connect, render_scene
from selfsup3d.geometry.cameras import make_se3
from selfsup3d.geometry.warp import warp_view
from selfsup3d.losses.reprojection import min_reprojection_loss, ordered_pairs


@pytest.fixture(scope="module")
def orbit():
    """Two rendered orbit scenes (5 views over 40°, 32 px): images, true depth, K, c2w as tensors."""
    client = connect()
    settings = RenderSettings(num_views=5, size=32, trajectory="orbit", arc_deg=40.0, plane_probability=0.0)
    scenes = [render_scene(client, "train", i, settings) for i in (0, 3)]

    def stack(get):
        return torch.from_numpy(np.stack([np.stack(get(s)) for s in scenes])).float()

    images = stack(lambda s: [im.transpose(2, 0, 1) / 255.0 for im in s.images])
    depth = stack(lambda s: [d[None] for d in s.depth])
    return images, depth, stack(lambda s: s.K), stack(lambda s: s.c2w)


def test_identity_warp_returns_the_source():
    source = torch.rand(2, 3, 6, 8)
    K = torch.tensor([[5.0, 0, 4], [0, 5.0, 3], [0, 0, 1]]).expand(2, 3, 3)
    eye = torch.eye(4).expand(2, 4, 4)
    warped, valid = warp_view(source, torch.full((2, 1, 6, 8), 2.0), K, eye, K, eye)
    assert torch.allclose(warped, source, atol=1e-5) and bool(valid.all())


def test_a_sideways_camera_shifts_the_image_by_the_disparity():
    source = torch.rand(1, 3, 8, 16)
    K = torch.tensor([[[4.0, 0, 8], [0, 4.0, 4], [0, 0, 1]]])
    target = make_se3(torch.eye(3)[None], torch.tensor([[1.0, 0, 0]]))  # one unit to the right, depth 2
    warped, valid = warp_view(source, torch.full((1, 1, 8, 16), 2.0), K, target, K, torch.eye(4)[None])
    # a point seen at column u by the target is at u + f * b / z = u + 2 in the source
    assert torch.allclose(warped[..., :-2], source[..., 2:], atol=1e-5)
    assert bool(valid[..., :-2].all()) and not bool(valid[..., -1:].any())


def test_ordered_pairs_are_grouped_by_target():
    t, s = ordered_pairs(3)
    assert t.tolist() == [0, 0, 1, 1, 2, 2] and s.tolist() == [1, 2, 0, 2, 0, 1]


def test_true_cameras_and_depth_give_the_lowest_loss(orbit):
    images, depth, K, c2w = orbit
    depth = torch.where(depth > 0, depth, depth.amax(dim=(-1, -2, -3), keepdim=True) * 3)  # background: far away
    true = min_reprojection_loss(images, depth, K, c2w)["loss"]
    # all cameras at the first view's pose: nothing is warped, the auto-mask keeps little
    still = min_reprojection_loss(images, depth, K, c2w[:, :1].expand_as(c2w))
    assert still["used"] < 0.5
    angle = math.radians(8.0)
    turn = torch.tensor([[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]])
    wrong = c2w.clone()
    wrong[:, 1::2, :3, :3] = turn @ wrong[:, 1::2, :3, :3]
    assert true < 0.8 * min_reprojection_loss(images, depth, K, wrong)["loss"]
    assert true < 0.8 * min_reprojection_loss(images, depth * 1.5, K, c2w)["loss"]


def test_the_loss_gives_the_cameras_a_gradient(orbit):
    images, depth, K, c2w = orbit
    c2w = c2w.clone().requires_grad_(True)
    depth = depth.clamp(min=0.5).requires_grad_(True)
    min_reprojection_loss(images, depth, K, c2w)["loss"].backward()
    assert c2w.grad.abs().sum() > 0 and depth.grad.abs().sum() > 0
