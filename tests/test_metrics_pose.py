"""Pose metrics against analytic cases: alignment, pairwise errors, AUC."""

from __future__ import annotations

import math

import kornia
import pytest
import torch

from selfsup3d.geometry.cameras import look_at, make_se3, spherical_to_cartesian
from selfsup3d.metrics.pose import (
    align_trajectory,
    apply_similarity,
    camera_metrics,
    centre_error,
    pose_auc,
    relative_rotation_error,
    translation_direction_error,
    umeyama,
)


def orbit(num_views: int = 6, seed: int = 0, batch: int = 2) -> torch.Tensor:
    """Cameras on a sphere of radius 3 looking at the origin: ``[batch, V, 4, 4]``."""
    g = torch.Generator().manual_seed(seed)
    az = torch.rand(batch, num_views, generator=g) * 2 * math.pi
    el = torch.rand(batch, num_views, generator=g) * 1.0 - 0.3
    eye = spherical_to_cartesian(az, el, torch.full_like(az, 3.0))
    return look_at(eye, torch.zeros_like(eye))


def random_similarity(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    R = kornia.geometry.conversions.axis_angle_to_rotation_matrix(torch.randn(batch, 3, generator=g))
    s = torch.rand(batch, generator=g) * 3 + 0.2
    t = torch.randn(batch, 3, generator=g) * 5
    return s, R, t


def test_umeyama_recovers_a_known_similarity():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(3, 10, 3, generator=g)
    s, R, t = random_similarity(3)
    dst = s[:, None, None] * src @ R.transpose(-1, -2) + t[:, None]
    s_hat, R_hat, t_hat = umeyama(src, dst)
    assert torch.allclose(s_hat, s, atol=1e-5)
    assert torch.allclose(R_hat, R, atol=1e-5)
    assert torch.allclose(t_hat, t, atol=1e-4)
    assert torch.allclose(torch.linalg.det(R_hat), torch.ones(3), atol=1e-5)
    # rigid mode keeps the scale at 1
    s1, _, _ = umeyama(src, src @ R.transpose(-1, -2) + t[:, None], with_scale=False)
    assert torch.allclose(s1, torch.ones(3))


def test_umeyama_never_returns_a_reflection():
    g = torch.Generator().manual_seed(3)
    src = torch.randn(12, 3, generator=g)
    mirrored = src * torch.tensor([-1.0, 1.0, 1.0])  # no rotation maps src onto this exactly
    _, R, _ = umeyama(src, mirrored)
    assert torch.allclose(torch.linalg.det(R), torch.tensor(1.0), atol=1e-5)


def test_alignment_undoes_scale_rotation_and_translation_of_a_trajectory():
    gt = orbit(8)
    s, R, t = random_similarity(2, seed=5)
    moved = apply_similarity(s, R, t, gt)
    # the moved trajectory is a different one...
    assert (moved[..., :3, 3] - gt[..., :3, 3]).norm(dim=-1).mean() > 0.5
    aligned = align_trajectory(moved, gt)
    assert torch.allclose(aligned, gt, atol=1e-4)
    assert centre_error(aligned, gt).max() < 1e-4


def test_identical_trajectories_have_zero_error_and_auc_one():
    gt = orbit(5)
    metrics, aligned = camera_metrics(gt.clone(), gt)
    assert metrics["rot_err"] < 0.05 and metrics["trans_err"] < 0.05  # degrees (acos near 1)
    for tau in (5, 15, 30):
        assert metrics[f"auc{tau}"] == pytest.approx(1.0)
    assert torch.allclose(aligned, gt, atol=1e-4)


def test_pairwise_errors_are_invariant_to_a_similarity_of_the_prediction():
    gt = orbit(6, seed=2)
    pred = orbit(6, seed=3)  # an unrelated trajectory
    s, R, t = random_similarity(2, seed=4)
    moved = apply_similarity(s, R, t, pred)
    assert torch.allclose(relative_rotation_error(moved, gt), relative_rotation_error(pred, gt), atol=1e-2)
    assert torch.allclose(translation_direction_error(moved, gt), translation_direction_error(pred, gt), atol=1e-2)


def test_known_rotation_offset_of_one_camera():
    gt = orbit(3, batch=1)
    pred = gt.clone()
    # turn camera 2 by 20.5 degrees about its own optical axis: its centre stays, so translation errors stay 0
    rz = kornia.geometry.conversions.axis_angle_to_rotation_matrix(torch.tensor([[0.0, 0.0, math.radians(20.5)]]))
    pred[0, 2, :3, :3] = gt[0, 2, :3, :3] @ rz[0]
    rot = relative_rotation_error(pred, gt)  # pairs (0,1), (0,2), (1,2)
    assert torch.allclose(rot, torch.tensor([[0.0, 20.5, 20.5]]), atol=0.05)
    # pair (i, j) measures the direction to camera j in camera i's frame; i < j never uses camera 2's frame
    trans = translation_direction_error(pred, gt)
    assert torch.allclose(trans, torch.zeros(1, 3), atol=0.05)
    assert pose_auc(rot, trans, 30).item() == pytest.approx((30 + 2 * 10) / 90, abs=1e-6)


def test_translation_direction_error_of_a_flipped_camera_position():
    c2w = make_se3(torch.eye(3).expand(1, 2, 3, 3), torch.tensor([[[0.0, 0, 0], [1.0, 0, 0]]]))
    flipped = make_se3(torch.eye(3).expand(1, 2, 3, 3), torch.tensor([[[0.0, 0, 0], [0.0, 2.0, 0]]]))
    assert translation_direction_error(flipped, c2w).item() == pytest.approx(90.0, abs=1e-3)
    # scale does not matter
    longer = make_se3(torch.eye(3).expand(1, 2, 3, 3), torch.tensor([[[0.0, 0, 0], [7.0, 0, 0]]]))
    assert translation_direction_error(longer, c2w).item() == pytest.approx(0.0, abs=1e-2)


def test_pose_auc_matches_the_histogram_definition():
    rot = torch.tensor([0.5, 4.5, 10.0, 40.0])
    trans = torch.tensor([0.0, 0.0, 12.0, 0.0])
    # max errors: 0.5, 4.5, 12, 40; accuracy at k = 1..5: 1/4, 1/4, 1/4, 1/4, 2/4 -> mean 0.3
    assert pose_auc(rot, trans, 5).item() == pytest.approx(0.3)
    # k = 1..15: k<=4: 1/4 (4 values), 5..12: 2/4 (8 values), 13..15: 3/4 (3 values)
    assert pose_auc(rot, trans, 15).item() == pytest.approx((4 * 0.25 + 8 * 0.5 + 3 * 0.75) / 15)
    with pytest.raises(ValueError):
        pose_auc(rot, trans, 0)


def test_camera_metrics_rejects_single_views():
    with pytest.raises(ValueError, match="V>=2"):
        camera_metrics(orbit(1), orbit(1))
