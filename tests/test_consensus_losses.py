"""Consensus, fidelity, depth and key-point losses on hand-made cases with known answers; stop-gradient
switches; a grid field that reproduces F2D gives zero consensus."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup3d.errors import ConfigError
from selfsup3d.geometry.cameras import intrinsics_from_fov, look_at
from selfsup3d.geometry.points import grid_field, posed_rays, ray_box_intersection
from selfsup3d.geometry.volume import render_rays
from selfsup3d.losses.consensus import (
    ConsensusLoss,
    consensus_loss,
    depth_loss,
    fidelity_loss,
    keypoint_descriptor_loss,
    keypoint_detection_loss,
    keypoint_heatmap,
    keypoint_reliability_loss,
    pixel_distance,
    resample_map,
)


# ---------------------------------------------------------------------------- consensus
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_consensus_is_exactly_zero_for_identical_maps_and_positive_otherwise(metric):
    torch.manual_seed(0)
    f = torch.randn(2, 3, 16, 5, 6)  # [B, V, C, h, w]
    assert consensus_loss(f, f.clone(), metric=metric).item() == 0.0
    g = f + 0.1 * torch.randn_like(f)
    assert consensus_loss(g, f, metric=metric).item() > 0.0


def test_cosine_consensus_ignores_scale_l2_does_not_and_cosine_is_one_minus_cos():
    torch.manual_seed(0)
    a, b = torch.randn(4, 8, 3, 3), torch.randn(4, 8, 3, 3)
    assert consensus_loss(3.0 * a, a, metric="cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert consensus_loss(3.0 * a, a, metric="l2").item() == pytest.approx((4 * a.square()).mean().item(), rel=1e-5)
    expected = (1 - F.cosine_similarity(a, b, dim=1)).mean()
    assert consensus_loss(a, b).item() == pytest.approx(expected.item(), rel=1e-5)
    assert consensus_loss(a, -a).item() == pytest.approx(2.0, rel=1e-6)


def test_consensus_mask_selects_pixels():
    a = torch.zeros(1, 4, 2, 2)
    a[:, 0] = 1.0
    b = a.clone()
    b[0, :, 1, 1] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # orthogonal at one pixel: distance 1 there
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    assert consensus_loss(a, b, mask).item() == pytest.approx(0.25)
    mask[0, 0, 1, 1] = False
    assert consensus_loss(a, b, mask).item() == 0.0
    assert consensus_loss(a, b, mask[:, 0]).item() == 0.0  # [..., h, w] masks too
    empty = torch.zeros_like(mask)
    x = a.clone().requires_grad_()
    loss = consensus_loss(x, b, empty)
    assert loss.item() == 0.0 and loss.requires_grad  # no pixel counts: 0, still in the graph
    with pytest.raises(ValueError, match="does not match"):
        consensus_loss(a, b, torch.ones(1, 1, 3, 3))


@pytest.mark.parametrize(("detach_2d", "detach_3d"), [(False, False), (True, False), (False, True)])
def test_consensus_stop_gradient_switches(detach_2d, detach_3d):
    torch.manual_seed(0)
    f3d = torch.randn(2, 8, 4, 4, requires_grad=True)
    f2d = torch.randn(2, 8, 4, 4, requires_grad=True)
    ConsensusLoss("cosine", detach_2d=detach_2d, detach_3d=detach_3d)(f3d, f2d).backward()
    assert (f3d.grad is not None and f3d.grad.abs().sum() > 0) == (not detach_3d)
    assert (f2d.grad is not None and f2d.grad.abs().sum() > 0) == (not detach_2d)


def test_consensus_module_refuses_configs_that_train_nothing():
    with pytest.raises(ConfigError, match="both"):
        ConsensusLoss(detach_2d=True, detach_3d=True)
    with pytest.raises(ConfigError, match="metric"):
        ConsensusLoss(metric="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metric"):
        pixel_distance(torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1), "l1")  # type: ignore[arg-type]


def test_consensus_is_zero_for_a_rendered_field_that_reproduces_f2d():
    """A feature grid holding one vector per half of the cube, behind an opaque density: rendered into a view
    it reproduces the 2D map that has that vector on each half, so the consensus is zero; another map is not."""
    r, size = 16, 12
    feats = torch.zeros(1, 2, r, r, r)
    feats[0, 0, :, :, : r // 2] = 1.0  # x < 0: (1, 0)
    feats[0, 1, :, :, r // 2 :] = 1.0  # x > 0: (0, 1)
    density = torch.full((1, 1, r, r, r), 200.0)
    c2w = look_at(torch.tensor([[0.0, 0.0, 3.0]]), torch.zeros(1, 3), up=torch.tensor([[0.0, 1.0, 0.0]]))
    K = intrinsics_from_fov(math.radians(30), size, size)[None]
    o, d = posed_rays(K, c2w, size, size)
    t_near, t_far, hit = ray_box_intersection(o, d)
    assert hit.all()
    out = render_rays(grid_field(feats, density), o, d, 1.5, 4.5, num_coarse=64, num_fine=0, perturb=False)
    f3d = out.rgb.view(1, size, size, 2).permute(0, 3, 1, 2)
    # the 2D map: each pixel's vector is the one of the half of the cube where its ray enters the box
    x_at_surface = (o + t_near[..., None] * d)[..., 0].view(1, 1, size, size)
    f2d = torch.cat([(x_at_surface < 0).float(), (x_at_surface > 0).float()], dim=1)
    interior = (x_at_surface.abs() > 2.0 / r).float()  # away from the seam, where trilinear blending mixes both
    assert consensus_loss(f3d, f2d, interior).item() < 1e-6
    assert consensus_loss(f3d, f2d.flip(1), interior).item() > 0.9


# ---------------------------------------------------------------------------- fidelity, depth
def test_resample_map_averages_patches_exactly_and_keeps_lead_dims():
    x = torch.arange(16.0).view(1, 1, 1, 4, 4)
    out = resample_map(x, (2, 2))
    assert out.shape == (1, 1, 1, 2, 2)
    assert out.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert resample_map(x, (4, 4)) is x
    assert resample_map(x, (3, 3)).shape == (1, 1, 1, 3, 3)
    assert resample_map(x, (8, 8)).shape == (1, 1, 1, 8, 8)


def test_fidelity_compares_on_the_coarse_grid_and_never_trains_the_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 6, 4, 4, requires_grad=True)  # [B, V, C, h, w], a 4x4 patch grid
    student = F.interpolate(teacher.detach().flatten(0, 1), scale_factor=4, mode="nearest").view(2, 3, 6, 16, 16)
    student.requires_grad_()
    # a 4x upsampling head whose patch means are the teacher's: no fidelity cost
    assert fidelity_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert fidelity_loss(student, teacher, metric="l2").item() == pytest.approx(0.0, abs=1e-10)
    # on the student's grid the bilinear teacher differs from the blocky student
    loss = fidelity_loss(student, teacher, target_grid="student")
    assert loss.item() > 1e-3
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    # a coarser student: the teacher is averaged onto it
    coarse = resample_map(teacher.detach(), (2, 2))
    assert fidelity_loss(coarse, teacher).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="agree"):
        fidelity_loss(torch.zeros(2, 3, 5, 4, 4), teacher)
    with pytest.raises(ValueError, match="target_grid"):
        fidelity_loss(student, teacher, target_grid="teacher")  # type: ignore[arg-type]


def test_depth_loss_counts_known_pixels_only():
    target = torch.tensor([[[[1.0, 2.0], [0.0, float("nan")]]]])
    rendered = torch.tensor([[[[1.5, 1.0], [5.0, 5.0]]]])
    assert depth_loss(rendered, target).item() == pytest.approx(0.75)
    mask = torch.tensor([[[[True, False], [True, True]]]])
    assert depth_loss(rendered, target, mask).item() == pytest.approx(0.5)


# ---------------------------------------------------------------------------- key points
def test_heatmap_peaks_at_projections_and_ignores_invisible_ones():
    uv = torch.tensor([[[2.5, 1.5], [6.0, 6.0], [0.5, 6.5]]])
    visible = torch.tensor([[True, True, False]])
    heat = keypoint_heatmap(uv, visible, 8, 8, sigma=1.0, weights=torch.tensor([[1.0, 0.5, 1.0]]))
    assert heat.shape == (1, 1, 8, 8)
    assert heat[0, 0, 1, 2].item() == pytest.approx(1.0)  # pixel centre exactly at the first projection
    assert heat[0, 0, 5, 5].item() == pytest.approx(0.5 * math.exp(-0.25))  # half a pixel off in u and v
    assert heat[0, 0, 6, 0].item() < 1e-6  # the invisible one leaves no bump
    assert heat.max() <= 1.0


def test_detection_loss_is_small_for_a_matching_detector_and_balanced():
    target = torch.zeros(1, 1, 16, 16)
    target[0, 0, 3, 4] = 1.0
    good = torch.where(target > 0, 8.0, -8.0)
    assert keypoint_detection_loss(good, target).item() < 1e-3
    assert keypoint_detection_loss(-good, target).item() > 7.0
    # balanced: a detector that is silent everywhere costs as much as one that fires everywhere
    silent = keypoint_detection_loss(torch.full_like(target, -8.0), target)
    loud = keypoint_detection_loss(torch.full_like(target, 8.0), target)
    assert silent.item() == pytest.approx(loud.item(), rel=1e-4)
    # masked-out pixels do not count: without the key point's pixel only the (wrongly firing) negatives remain
    mask = torch.ones_like(target)
    mask[0, 0, 3, 4] = 0
    assert keypoint_detection_loss(-good, target, mask).item() == pytest.approx(
        0.5 * F.softplus(torch.tensor(8.0)).item(), rel=1e-5
    )
    mask = torch.zeros_like(target)
    mask[0, 0, 3, 4] = 1  # only the key point's pixel: the negatives' half is empty
    assert keypoint_detection_loss(good, target, mask).item() == pytest.approx(
        0.5 * F.softplus(torch.tensor(-8.0)).item(), rel=1e-3
    )


def _descriptors(b: int, v: int, n: int, e: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d3 = F.normalize(torch.randn(b, n, e, generator=g), dim=-1)
    d2 = d3[:, None].expand(b, v, n, e).clone()
    return d3, d2


def test_descriptor_loss_rewards_matching_descriptors_and_ignores_invisible_projections():
    d3, d2 = _descriptors(2, 3, 6, 32)
    visible = torch.ones(2, 3, 6, dtype=torch.bool)
    loss, prob = keypoint_descriptor_loss(d3, d2, visible, temperature=0.05)
    assert loss.item() < 0.05 and (prob > 0.95).all()
    shuffled, prob_s = keypoint_descriptor_loss(d3, d2[:, :, torch.randperm(6)], visible, temperature=0.05)
    assert shuffled.item() > 5.0 and prob_s.mean() < 0.5
    # garbage at invisible projections changes nothing
    visible[:, 1, 2] = False
    noisy = d2.clone()
    noisy[:, 1, 2] = -noisy[:, 1, 2]
    a, pa = keypoint_descriptor_loss(d3, d2, visible, temperature=0.05)
    b, pb = keypoint_descriptor_loss(d3, noisy, visible, temperature=0.05)
    assert a.item() == pytest.approx(b.item(), rel=1e-5) and torch.allclose(pa, pb)
    # a key point seen in no view has match probability 0; invalid key points never count
    visible[:, :, 4] = False
    _, p = keypoint_descriptor_loss(d3, d2, visible)
    assert (p[:, 4] == 0).all()
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[:, 5] = False
    c, _ = keypoint_descriptor_loss(d3, noisy.index_fill(2, torch.tensor([5]), 0.0), visible, valid, temperature=0.05)
    d, _ = keypoint_descriptor_loss(d3, noisy, visible, valid, temperature=0.05)
    assert c.item() == pytest.approx(d.item(), rel=1e-5)


def test_descriptor_loss_across_scenes_penalises_scenes_that_look_alike():
    # scene 1 has scene 0's descriptors: within a scene they match, across scenes they are confused
    d3, d2 = _descriptors(1, 2, 5, 16)
    d3, d2 = d3.repeat(2, 1, 1), d2.repeat(2, 1, 1, 1)
    visible = torch.ones(2, 2, 5, dtype=torch.bool)
    _, own = keypoint_descriptor_loss(d3, d2, visible, temperature=0.02, cross_scene=False)
    _, cross = keypoint_descriptor_loss(d3, d2, visible, temperature=0.02, cross_scene=True)
    assert (own > 0.99).all()
    assert torch.allclose(cross, torch.full_like(cross, 0.5), atol=0.01)


def test_descriptor_loss_gradients_reach_both_branches():
    d3, d2 = _descriptors(1, 2, 4, 8)
    d3 = (d3 + 0.3 * torch.randn_like(d3)).requires_grad_()
    d2 = d2.clone().requires_grad_()
    loss, prob = keypoint_descriptor_loss(d3, d2, torch.ones(1, 2, 4, dtype=torch.bool))
    loss.backward()
    assert d3.grad.abs().sum() > 0 and d2.grad.abs().sum() > 0 and not prob.requires_grad


def test_reliability_pushes_scores_towards_the_match_probability():
    logits = torch.zeros(1, 3, requires_grad=True)
    prob = torch.tensor([[1.0, 0.0, 0.5]])
    loss = keypoint_reliability_loss(logits, prob)
    loss.backward()
    assert logits.grad[0, 0] < 0 and logits.grad[0, 1] > 0 and logits.grad[0, 2].abs() < 1e-7
    # empty slots (score -inf) with zero weight do not count and do not poison the loss
    padded = torch.tensor([[2.0, float("-inf")]])
    value = keypoint_reliability_loss(padded, torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
    assert value.item() == pytest.approx(F.softplus(torch.tensor(-2.0)).item(), rel=1e-5)
