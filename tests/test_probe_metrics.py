"""Every figure ``selfsup3d probe`` reports, on small synthetic cases with a known answer."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup3d.eval.correspondence import (
    CorrespondenceRecall,
    chance_fractions,
    match_errors,
    nearest_neighbours,
    relative_rotation_deg,
    scene_correspondence,
    visible_queries,
)
from selfsup3d.eval.dense import DepthMetrics, NormalMetrics, normals_from_depth
from selfsup3d.eval.feature_pose_probe import PoseAUC, pose_errors, prior_pose, relative_pose_targets
from selfsup3d.eval.features import ColourFeatures, OracleFeatures, Views, pixel_uv, resample_grid, sample_at
from selfsup3d.geometry.cameras import intrinsics_from_fov, look_at, make_se3
from selfsup3d.metrics.depth import median_scale
from selfsup3d.metrics.pose import pose_auc
from selfsup3d.metrics.view_retrieval import retrieval_chance, retrieval_hits

SIZE = 32


def _fronto_camera(size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """A camera at the origin looking down +z at the plane z = 2 (OpenCV axes)."""
    K = intrinsics_from_fov(math.radians(60.0), size, size)
    return K, torch.eye(4)


def _roll(deg: float) -> torch.Tensor:
    a = math.radians(deg)
    rot = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    return make_se3(rot, torch.zeros(3))


def _fourier(uv: torch.Tensor, size: int) -> torch.Tensor:
    """Position features of pixel coordinates whose dot products depend on the offset only."""
    freqs = math.pi * 2.0 ** torch.arange(6) / size
    angles = uv[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


# ---------------------------------------------------------------------------- correspondence
def test_visible_queries_same_camera_lands_on_the_same_pixels_and_back_facing_sees_nothing():
    K, c2w = _fronto_camera()
    depth = torch.full((1, SIZE, SIZE), 2.0)
    depth[0, :4] = 0
    index, uv = visible_queries(depth, K, c2w, depth, K, c2w)
    assert index.numel() == (SIZE - 4) * SIZE
    assert torch.allclose(uv, pixel_uv(index, SIZE), atol=1e-4)
    away = c2w.clone()
    away[:3, :3] = torch.diag(torch.tensor([-1.0, 1.0, -1.0]))  # turned around: the plane is behind it
    assert visible_queries(depth, K, c2w, depth, K, away)[0].numel() == 0
    # an occluder in front of the plane in view j hides everything (depth test)
    assert visible_queries(depth, K, c2w, torch.full_like(depth, 1.0), K, c2w)[0].numel() == 0


def test_recall_of_matches_shifted_by_two_pixels_is_zero_below_and_one_above():
    """Features of view j are view i's moved two pixels left: every match is off by exactly 2 px."""
    K, c2w = _fronto_camera()
    depth_i = torch.full((1, SIZE, SIZE), 2.0)
    depth_i[0, :, :3] = 0  # queries whose shifted match would fall off the image are not asked
    depth_j = torch.full((1, SIZE, SIZE), 2.0)
    uv = pixel_uv(torch.arange(SIZE * SIZE), SIZE).reshape(SIZE, SIZE, 2)
    feat_i = _fourier(uv, SIZE).permute(2, 0, 1)
    feat_j = _fourier(uv + torch.tensor([2.0, 0.0]), SIZE).permute(2, 0, 1)
    metric = CorrespondenceRecall(thresholds=(0.025, 0.05, 0.1))  # 0.8, 1.6, 3.2 px at 32 px
    depth = torch.stack([depth_i, depth_j])
    added = scene_correspondence(
        torch.stack([feat_i, feat_j]), depth, K.expand(2, 3, 3), c2w.expand(2, 4, 4), metric, 64, 32, chance=True
    )
    out = metric.compute()
    assert added == 1 and float(out["matches"]) == 32
    assert out["recall"].tolist() == [0.0, 0.0, 1.0]
    assert out["bin_recall"][0].tolist() == [0.0, 0.0, 1.0]  # identical cameras: 0 degrees
    assert torch.isnan(out["bin_recall"][1:]).all()
    # chance: the fraction of the 32x32 database within the threshold of a query (a pixel centre): only
    # the pixel itself within 0.8 px; at most its 3x3 neighbourhood within 1.6 px, 37 pixels within 3.2 px
    assert float(out["chance"][0]) == pytest.approx(1 / SIZE**2)
    assert 8 / SIZE**2 < float(out["chance"][1]) <= 9 / SIZE**2
    assert 30 / SIZE**2 < float(out["chance"][2]) <= 37 / SIZE**2


def test_chance_fraction_counts_pixel_centres_within_the_threshold():
    db = pixel_uv(torch.arange(64), 8)
    query = torch.tensor([[4.5, 4.5]])  # a pixel centre
    # within 1.5 px: the pixel and its 8 neighbours (distance 1 and sqrt 2); within 0.5: itself
    assert chance_fractions(query, db, torch.tensor([0.5, 1.5])).tolist() == [[1 / 64, 9 / 64]]


def test_oracle_features_match_a_rotated_view_and_the_pair_lands_in_its_rotation_bin():
    """A camera rolled by 45 degrees about its axis: the oracle (true 3D positions) still matches within
    the smallest threshold, and the pair counts in the 30-60 degree bin."""
    size = 64
    K, c2w = _fronto_camera(size)
    depth = torch.full((2, 1, size, size), 2.0)
    cams = torch.stack([c2w, _roll(45.0)])
    views = Views(torch.zeros(2, 3, size, size), depth, K.expand(2, 3, 3), cams)
    dense = OracleFeatures()(views).dense
    metric = CorrespondenceRecall()
    scene_correspondence(dense, depth, views.K, cams, metric, num_queries=400, num_matches=200)
    out = metric.compute()
    assert float(relative_rotation_deg(cams[0], cams[1])) == pytest.approx(45.0, abs=1e-3)
    assert float(out["bin_matches"][2]) == 200 and float(out["bin_matches"].sum()) == 200
    assert float(out["recall"][0]) >= 0.95


def test_ratio_test_weights_and_kept_matches():
    db = torch.eye(3)
    index, weight = nearest_neighbours(torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]), db)
    assert index[0] == 0 and weight[0] == pytest.approx(1.0)  # exact match: d1 = 0
    assert weight[1] == pytest.approx(0.0, abs=1e-6)  # equidistant from two entries: ambiguous
    _, w_const = nearest_neighbours(torch.ones(4, 2), torch.ones(5, 2))
    assert torch.equal(w_const, torch.zeros(4))
    # the confident match is kept first
    errors, kept = match_errors(
        torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), db, torch.zeros(3, 2), torch.ones(2, 2), 1
    )
    assert kept.tolist() == [1] and errors.tolist() == [pytest.approx(math.sqrt(2))]


# ---------------------------------------------------------------------------- features
def test_sample_at_reads_pixel_centres_like_interpolate():
    dense = torch.randn(1, 5, 4, 4)
    up = torch.nn.functional.interpolate(dense, size=(16, 16), mode="bilinear", align_corners=False)
    uv = pixel_uv(torch.arange(256), 16)[None]
    assert torch.allclose(sample_at(dense, uv, (16, 16))[0], up[0].flatten(1).T, atol=1e-5)
    assert resample_grid(torch.ones(1, 2, 16, 16), 8).shape == (1, 2, 8, 8)
    assert resample_grid(torch.ones(1, 2, 4, 4), 8).shape == (1, 2, 8, 8)


def test_colour_features_are_the_window_colours_minus_grey():
    images = torch.rand(1, 3, 6, 6)
    dense = ColourFeatures(3)(Views(images)).dense
    assert dense.shape == (1, 27, 6, 6)
    centre = dense[0].reshape(3, 9, 6, 6)[:, 4]  # the middle of the 3x3 window is the pixel itself
    assert torch.allclose(centre, images[0] - 0.5)


# ---------------------------------------------------------------------------- depth and normals
def test_depth_metrics_of_known_errors():
    target = torch.tensor([1.0, 2.0, 4.0])
    m = DepthMetrics()
    m.update(2 * target, target)
    out = m.compute()
    assert float(out["abs_rel"]) == pytest.approx(1.0)
    assert float(out["delta1"]) == 0.0
    assert float(out["rmse"]) == pytest.approx(math.sqrt((1 + 4 + 16) / 3))
    m = DepthMetrics()
    m.update(target * 1.1, target)
    assert float(m.compute()["delta1"]) == 1.0 and float(m.compute()["abs_rel"]) == pytest.approx(0.1)
    assert torch.allclose(median_scale(3 * target, target), target)


def test_normals_of_a_fronto_parallel_and_a_tilted_plane():
    K, _ = _fronto_camera()
    flat, valid = normals_from_depth(torch.full((1, 1, SIZE, SIZE), 2.0), K[None])
    inner = flat[0, :, 1:-1, 1:-1]
    assert valid[0, 0, 1:-1, 1:-1].all() and not valid[0, 0, 0].any()
    assert torch.allclose(inner, torch.tensor([0.0, 0.0, -1.0])[:, None, None].expand_as(inner), atol=1e-5)
    # the plane n . p = -2 with n tilted 30 degrees about the x axis (towards the camera's -y)
    n = torch.tensor([0.0, -math.sin(math.radians(30)), -math.cos(math.radians(30))], dtype=torch.float64)
    from selfsup3d.geometry.cameras import camera_directions

    dirs = camera_directions(K.double(), SIZE, SIZE)
    depth = (-2.0 / (dirs @ n))[None, None].float()
    tilted, valid = normals_from_depth(depth, K[None])
    got = tilted[0, :, 1:-1, 1:-1].flatten(1).T
    assert valid[0, 0, 1:-1, 1:-1].all()
    assert torch.allclose(got, n.float().expand_as(got), atol=1e-3)
    # a depth edge has no normal
    step = torch.full((1, 1, SIZE, SIZE), 2.0)
    step[..., SIZE // 2 :] = 3.0
    _, valid = normals_from_depth(step, K[None])
    assert not valid[0, 0, 5, SIZE // 2 - 1] and not valid[0, 0, 5, SIZE // 2] and valid[0, 0, 5, 5]


def test_normal_metrics_of_a_known_angle():
    target = torch.tensor([[0.0, 0.0, 1.0]]).expand(10, 3)
    a = math.radians(20)
    pred = torch.tensor([[0.0, math.sin(a), math.cos(a)]]).expand(10, 3) * 3  # unnormalised on purpose
    m = NormalMetrics()
    m.update(pred, target)
    out = m.compute()
    assert float(out["mean_deg"]) == pytest.approx(20.0, abs=1e-4)
    assert float(out["within11.25"]) == 0.0 and float(out["within30"]) == 1.0


# ---------------------------------------------------------------------------- pose
def test_relative_pose_targets_and_errors_of_a_known_pose():
    a = look_at(torch.tensor([0.0, -2.0, 0.0]), torch.zeros(3))
    b = look_at(torch.tensor([2.0, 0.0, 0.0]), torch.zeros(3))
    rot, direction = relative_pose_targets(a, b)
    assert float(relative_rotation_deg(a, b)) == pytest.approx(90.0, abs=1e-4)
    # camera b sits at (2, 0, 0): in a's frame (x right = world +x) it is right and ahead
    assert torch.allclose(direction, torch.tensor([1.0, 0.0, 1.0]) / math.sqrt(2), atol=1e-5)
    rot_err, trans_err = pose_errors(rot[None], direction[None], rot[None], direction[None])
    assert float(rot_err) == pytest.approx(0.0, abs=1e-3) and float(trans_err) == pytest.approx(0.0, abs=1e-3)
    tilt = _roll(10.0)[:3, :3]
    rot_err, _ = pose_errors((rot @ tilt)[None], direction[None], rot[None], direction[None])
    assert float(rot_err) == pytest.approx(10.0, abs=1e-3)
    same_r, same_t = prior_pose(rot.expand(5, 3, 3), direction.expand(5, 3))
    assert torch.allclose(same_r, rot, atol=1e-5) and torch.allclose(same_t, direction, atol=1e-5)


def test_pose_auc_from_sums_matches_the_reference_definition():
    m = PoseAUC(30)
    m.update(torch.full((4,), 15.0), torch.zeros(4))
    out = m.compute()
    assert float(out["rot_auc"]) == pytest.approx(0.5)  # err < k for k = 16..30: 15 of 30 thresholds
    assert float(out["trans_auc"]) == pytest.approx(1.0)
    assert float(out["auc"]) == pytest.approx(0.5)
    g = torch.Generator().manual_seed(0)
    r, t = torch.rand(50, generator=g) * 40, torch.rand(50, generator=g) * 40
    m = PoseAUC(30)
    m.update(r[:20], t[:20])
    m.update(r[20:], t[20:])
    assert float(m.compute()["auc"]) == pytest.approx(float(pose_auc(r, t, 30)))


# ---------------------------------------------------------------------------- retrieval
def test_retrieval_top1_and_chance():
    scene = torch.tensor([0, 0, 1, 1, 2, 2])
    assert retrieval_hits(torch.eye(3)[scene], scene).all()
    # views on a circle (degrees): only scene 2's two views are each other's nearest
    angles = torch.deg2rad(torch.tensor([0.0, 100.0, 10.0, 205.0, 300.0, 305.0]))
    feats = torch.stack([angles.cos(), angles.sin()], dim=-1)
    assert retrieval_hits(feats, scene).tolist() == [False, False, False, False, True, True]
    assert retrieval_chance(scene) == pytest.approx(1 / 5)
