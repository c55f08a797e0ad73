"""RayZer's pose probe on camera tokens: it learns relative poses from tokens that hold them, stays at chance on
tokens that do not, and the callback reports it for a masked-view run on held-out scenes."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup3d.eval.camera_token_probe import fit_camera_probe, probe_figures, token_pairs
from selfsup3d.geometry.cameras import look_at, spherical_to_cartesian


def orbit_cameras(num_scenes: int, num_views: int, seed: int) -> torch.Tensor:
    """Cameras on arcs around the origin: random start azimuth, elevation and spacing per scene."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_scenes):
        start = float(torch.rand((), generator=gen)) * 2 * math.pi
        step = math.radians(5 + 15 * float(torch.rand((), generator=gen)))
        elevation = math.radians(10 + 40 * float(torch.rand((), generator=gen)))
        azimuth = torch.tensor([start + v * step for v in range(num_views)])
        eye = spherical_to_cartesian(azimuth, torch.full_like(azimuth, elevation), torch.full_like(azimuth, 3.0))
        out.append(look_at(eye, torch.zeros_like(eye)))
    return torch.stack(out).float()


def pose_tokens(c2w: torch.Tensor) -> torch.Tensor:
    """Tokens that hold the poses: each view's rotation and centre relative to the scene's first view."""
    rel = torch.linalg.inv(c2w[:, :1]) @ c2w
    return rel[..., :3, :4].flatten(-2)


def test_token_pairs_are_all_pairs_with_relative_targets():
    c2w = orbit_cameras(2, 4, 0)
    tokens = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    a, b, rot, direction = token_pairs(tokens, c2w)
    assert a.shape == (12, 3) and rot.shape == (12, 3, 3) and direction.shape == (12, 3)
    assert torch.equal(a[0], tokens[0, 0]) and torch.equal(b[0], tokens[0, 1])
    expected = c2w[0, 0, :3, :3].T @ c2w[0, 1, :3, :3]
    assert torch.allclose(rot[0], expected, atol=1e-5)
    assert torch.allclose(direction.norm(dim=-1), torch.ones(12))


def test_probe_figures_count_thresholds():
    rot = torch.eye(3).expand(4, 3, 3)
    turn = torch.tensor([[math.cos(0.5), -math.sin(0.5), 0.0], [math.sin(0.5), math.cos(0.5), 0.0], [0, 0, 1.0]])
    pred_rot = torch.stack([torch.eye(3), torch.eye(3), turn, turn])
    d = torch.tensor([[1.0, 0, 0]]).expand(4, 3)
    pred_d = torch.tensor([[1.0, 0, 0], [0.0, 1, 0], [1.0, 0.1, 0], [1.0, 0, 0]])
    fig = probe_figures(pred_rot, pred_d, rot, d)
    assert fig["r10"] == 0.5 and fig["t03"] == 0.75


def test_probe_learns_from_pose_tokens_and_stays_at_chance_on_random_tokens():
    train_c2w, test_c2w = orbit_cameras(160, 6, 1), orbit_cameras(40, 6, 2)
    good = fit_camera_probe(pose_tokens(train_c2w), train_c2w, pose_tokens(test_c2w), test_c2w, steps=400)
    assert good.probe["r10"] > 0.9 and good.probe["t03"] > 0.8, good
    assert good.probe["r10"] > good.chance["r10"] + 0.3
    gen = torch.Generator().manual_seed(3)
    noise = fit_camera_probe(
        torch.randn(160, 6, 12, generator=gen), train_c2w, torch.randn(40, 6, 12, generator=gen), test_c2w, steps=400
    )
    assert noise.probe["r10"] < noise.chance["r10"] + 0.15, noise
    assert noise.probe["t03"] < noise.chance["t03"] + 0.15, noise
    assert set(good.as_dict("val/probe_")) >= {"val/probe_r10", "val/probe_t03", "val/probe_r10_chance"}


def test_probe_refuses_mismatched_tokens():
    c2w = orbit_cameras(2, 3, 0)
    with pytest.raises(ValueError, match="tokens"):
        fit_camera_probe(torch.zeros(2, 4, 5), c2w, torch.zeros(2, 3, 5), c2w)


def test_probe_trains_inside_inference_mode():
    """`selfsup3d validate` runs the validation loop under inference mode."""
    c2w = orbit_cameras(8, 4, 0)
    with torch.inference_mode():
        tokens = pose_tokens(c2w)
        result = fit_camera_probe(tokens, c2w, tokens, c2w, steps=3)
    assert 0.0 <= result.probe["r10"] <= 1.0
