"""Key points: heads, non-maximum suppression in 2D and 3D, and projection of a synthetic scene's 3D key
points into views (where they should land, occluded ones invisible), closing the loop with 2D detection."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup3d.geometry.cameras import intrinsics_from_fov, look_at
from selfsup3d.geometry.points import voxel_centres
from selfsup3d.heads.keypoints import (
    KeypointHead2D,
    KeypointHead3D,
    project_keypoints,
    sample_descriptors_2d,
    sample_descriptors_3d,
    select_keypoints_2d,
    select_keypoints_3d,
)
from selfsup3d.losses.consensus import keypoint_heatmap


def test_heads_give_logits_and_unit_descriptors_with_gradients():
    torch.manual_seed(0)
    head2d, head3d = KeypointHead2D(12, descriptor_dim=6), KeypointHead3D(12, descriptor_dim=6, hidden=8)
    x2 = torch.randn(2, 12, 5, 7, requires_grad=True)
    x3 = torch.randn(2, 12, 4, 4, 4, requires_grad=True)
    s2, d2 = head2d(x2)
    s3, d3 = head3d(x3)
    assert s2.shape == (2, 1, 5, 7) and d2.shape == (2, 6, 5, 7)
    assert s3.shape == (2, 1, 4, 4, 4) and d3.shape == (2, 6, 4, 4, 4)
    assert torch.allclose(d2.norm(dim=1), torch.ones(2, 5, 7), atol=1e-5)
    assert torch.allclose(d3.norm(dim=1), torch.ones(2, 4, 4, 4), atol=1e-5)
    (s2.sum() + d2[:, 0].sum() + s3.sum() + d3[:, 0].sum()).backward()
    assert x2.grad.abs().sum() > 0 and x3.grad.abs().sum() > 0


def test_select_2d_suppresses_neighbours_and_orders_by_score():
    scores = torch.full((1, 1, 6, 8), -5.0)
    scores[0, 0, 1, 2] = 3.0  # peak A at row 1, column 2
    scores[0, 0, 1, 3] = 2.5  # its neighbour: suppressed with radius 1
    scores[0, 0, 4, 6] = 2.0  # peak B
    scores[0, 0, 4, 4] = 1.0  # two columns from B: survives radius 1, suppressed by radius 2
    desc = torch.randn(1, 4, 6, 8)
    kp = select_keypoints_2d(scores, k=3, radius=1, descriptors=desc, threshold=0.0)
    assert kp.valid.tolist() == [[True, True, True]]
    assert kp.positions[0].tolist() == [[2.5, 1.5], [6.5, 4.5], [4.5, 4.5]]  # (u, v) = (column, row) + 0.5
    assert kp.scores[0].tolist() == [3.0, 2.0, 1.0]
    assert torch.equal(kp.descriptors[0, 1], desc[0, :, 4, 6])
    kp2 = select_keypoints_2d(scores, k=3, radius=2, threshold=0.0)
    assert kp2.valid.tolist() == [[True, True, False]]  # only two above the threshold after suppression
    assert kp2.scores[0, 2] == float("-inf") and kp2.positions[0, 2].tolist() == [0.0, 0.0]
    assert kp2.descriptors is None


def test_select_2d_pads_when_the_map_has_fewer_cells_than_k():
    kp = select_keypoints_2d(torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]]), k=6, radius=0)
    assert kp.valid.tolist() == [[True] * 4 + [False] * 2]
    assert kp.positions.shape == (1, 6, 2)


def test_select_3d_keeps_occupied_local_maxima_at_voxel_centres():
    r = 8
    scores = torch.zeros(1, 1, r, r, r)
    occupancy = torch.zeros_like(scores)
    occupancy[0, 0, 2:6, 2:6, 2:6] = 1.0
    scores[0, 0, 3, 4, 2] = 5.0  # key point: z index 3, y index 4, x index 2
    scores[0, 0, 3, 4, 3] = 4.0  # neighbour: suppressed
    scores[0, 0, 5, 2, 5] = 3.0  # key point
    scores[0, 0, 0, 0, 0] = 9.0  # the highest score, but in empty space
    desc = torch.randn(1, 3, r, r, r)
    kp = select_keypoints_3d(scores, occupancy, k=2, radius=1, descriptors=desc)
    centres = voxel_centres(r)
    assert kp.valid.all()
    assert torch.allclose(kp.positions[0, 0], centres[3, 4, 2]) and torch.allclose(kp.positions[0, 1], centres[5, 2, 5])
    assert kp.positions[0, 0].tolist() == pytest.approx([-0.375, 0.125, -0.125])  # (x, y, z)
    assert kp.scores[0].tolist() == [5.0, 3.0]
    assert torch.equal(kp.descriptors[0, 1], desc[0, :, 5, 2, 5])
    # descriptors read trilinearly at the key points are the voxel's, normalised
    assert torch.allclose(
        sample_descriptors_3d(desc, kp.positions)[0, 0],
        torch.nn.functional.normalize(desc[0, :, 3, 4, 2], dim=0),
        atol=1e-5,
    )
    # an empty scene gives no key points
    none = select_keypoints_3d(scores, torch.zeros_like(occupancy), k=2)
    assert not none.valid.any()


def test_selection_passes_gradients_to_the_selected_scores():
    scores = torch.randn(2, 1, 4, 4, 4, requires_grad=True)
    kp = select_keypoints_3d(scores, torch.ones_like(scores), k=3, radius=1)
    kp.scores[kp.valid].sum().backward()
    assert scores.grad.sum() == kp.valid.sum()


def _scene() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two cameras looking at the origin from +z and from +x; both image 32x32 with a 50 degree fov."""
    eye = torch.tensor([[0.0, 0.0, 3.0], [3.0, 0.0, 0.0]])
    c2w = look_at(eye, torch.zeros(2, 3), up=torch.tensor([[0.0, 1.0, 0.0]] * 2))
    K = intrinsics_from_fov(math.radians(50), 32, 32).expand(2, 3, 3)
    return K[None], c2w[None], eye


def _pinhole(point: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor) -> tuple[float, float, float]:
    """Reference projection written out: world -> camera with R^T (p - c), then u = fx x / z + cx."""
    cam = c2w[:3, :3].T @ (point - c2w[:3, 3])
    return (K[0, 0] * cam[0] / cam[2] + K[0, 2]).item(), (K[1, 1] * cam[1] / cam[2] + K[1, 2]).item(), cam[2].item()


def test_keypoints_of_a_synthetic_scene_project_where_they_should_and_occluded_ones_are_invisible():
    """Bright voxels in a grid are the 3D key points; they project where a pinhole camera puts them; a wall in
    one view's depth map hides the one behind it; the 2D detector run on the projected heatmap finds them."""
    r = 16
    centres = voxel_centres(r)
    bright = [(9, 8, 8), (8, 11, 5), (4, 3, 12)]  # (k, j, i) = (z, y, x) indices
    scores = torch.full((1, 1, r, r, r), -3.0)
    for k, j, i in bright:
        scores[0, 0, k, j, i] = 4.0
    kp = select_keypoints_3d(scores, torch.ones_like(scores), k=3, radius=2, threshold=0.0)
    expected = torch.stack([centres[k, j, i] for k, j, i in bright])
    assert kp.valid.all() and torch.allclose(kp.positions[0], expected)

    K, c2w, eye = _scene()
    # depth maps: view 0 sees a wall at z-depth 3.0 (the origin's depth), view 1 sees nothing: unknown
    depth = torch.zeros(1, 2, 1, 32, 32)
    depth[0, 0] = 3.0
    uv, visible = project_keypoints(kp.positions, K, c2w, depth, tolerance=0.2)
    assert uv.shape == (1, 2, 3, 2) and visible.shape == (1, 2, 3)
    for v in range(2):
        for n in range(3):
            u_ref, v_ref, _ = _pinhole(kp.positions[0, n], K[0, v], c2w[0, v])
            assert uv[0, v, n].tolist() == pytest.approx([u_ref, v_ref], abs=1e-4)
    # view 0 looks down -z from z = 3: z-depth is 3 - z; the point with z index 4 (z = -0.44) is 3.44 deep,
    # behind the wall at 3.0 + 0.2; the others (z = 0.19, 0.06) are in front of it
    depths = [_pinhole(p, K[0, 0], c2w[0, 0])[2] for p in kp.positions[0]]
    assert depths[2] > 3.2 and max(depths[:2]) < 3.2
    assert visible[0, 0].tolist() == [True, True, False]
    assert visible[0, 1].tolist() == [False, False, False]  # no depth there: nothing confirms them
    # without depth maps only the image bounds and the camera's side count
    _, seen = project_keypoints(kp.positions, K, c2w, image_size=(32, 32))
    assert seen.all()
    behind = project_keypoints(torch.tensor([[[0.0, 0.0, 4.0], [0.0, 0.0, -1.0]]]), K, c2w, image_size=(32, 32))[1]
    assert behind[0, 0].tolist() == [False, True]  # z = 4 is behind camera 0 (at z = 3 looking down -z)
    outside = project_keypoints(torch.tensor([[[0.0, 5.0, 0.0]]]), K, c2w, image_size=(32, 32))[1]
    assert not outside.any()

    # closing the loop: a 2D detector whose scores are the projected heatmap finds the visible key points
    heat = keypoint_heatmap(uv[0], visible[0], 32, 32, sigma=1.0)  # [V, 1, H, W]
    logits = torch.logit(heat.clamp(1e-4, 1 - 1e-4))
    found = select_keypoints_2d(logits, k=3, radius=2, threshold=0.0)
    assert found.valid[0].sum() == 2 and found.valid[1].sum() == 0
    for pos in found.positions[0, :2]:
        assert (uv[0, 0, :2] - pos).norm(dim=-1).min() < 0.75  # the pixel centre nearest to the projection


def test_sample_descriptors_2d_reads_the_map_at_pixel_positions():
    desc = torch.zeros(1, 2, 4, 4)
    desc[0, 0, 1, 2] = 1.0  # pixel row 1, column 2: centre (2.5, 1.5)
    desc[0, 1] = 0.1
    out = sample_descriptors_2d(desc, torch.tensor([[[2.5, 1.5], [0.5, 0.5]]]))
    assert torch.allclose(out[0, 0], torch.nn.functional.normalize(torch.tensor([1.0, 0.1]), dim=0), atol=1e-5)
    assert torch.allclose(out[0, 1], torch.tensor([0.0, 1.0]), atol=1e-5)


def test_selection_and_projection_treat_batch_items_independently():
    torch.manual_seed(0)
    scores2d = torch.randn(3, 1, 6, 6)
    desc2d = torch.randn(3, 5, 6, 6)
    both = select_keypoints_2d(scores2d, k=4, radius=1, descriptors=desc2d)
    for b in range(3):
        one = select_keypoints_2d(scores2d[b : b + 1], k=4, radius=1, descriptors=desc2d[b : b + 1])
        assert torch.equal(both.positions[b], one.positions[0]) and torch.equal(both.descriptors[b], one.descriptors[0])
    scores3d = torch.randn(2, 1, 4, 4, 4)
    occ = (torch.rand(2, 1, 4, 4, 4) > 0.3).float()
    kp = select_keypoints_3d(scores3d, occ, k=5, radius=1)
    K, c2w, _ = _scene()
    K2, c2w2 = K.repeat(2, 1, 1, 1), torch.cat([c2w, c2w.flip(1)])  # scene 1 sees the views in reverse order
    depth = torch.rand(2, 2, 1, 32, 32) + 2.5
    uv, vis = project_keypoints(kp.positions, K2, c2w2, depth, tolerance=0.1)
    for b in range(2):
        kb = select_keypoints_3d(scores3d[b : b + 1], occ[b : b + 1], k=5, radius=1)
        assert torch.equal(kb.positions[0], kp.positions[b])
        uv_b, vis_b = project_keypoints(kb.positions, K2[b : b + 1], c2w2[b : b + 1], depth[b : b + 1], tolerance=0.1)
        assert torch.allclose(uv_b[0], uv[b]) and torch.equal(vis_b[0], vis[b])
