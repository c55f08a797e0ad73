"""Novel-view metrics and baselines against analytic cases."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup3d.geometry.cameras import look_at, spherical_to_cartesian
from selfsup3d.metrics.nvs import (
    MAX_PSNR,
    camera_distance,
    context_mean_baseline,
    mean_colour_baseline,
    nearest_view_baseline,
    nearest_view_index,
    psnr,
    ssim,
)


def test_psnr_of_a_known_error():
    target = torch.zeros(2, 3, 3, 8, 8)
    pred = target + 0.1  # MSE 0.01 -> 20 dB
    out = psnr(pred, target)
    assert out.shape == (2, 3)
    assert torch.allclose(out, torch.full((2, 3), 20.0), atol=1e-4)
    assert psnr(target, target).max() == MAX_PSNR
    with pytest.raises(ValueError):
        psnr(pred, target[..., :4])


def test_ssim_is_one_for_identical_images_and_lower_for_noise():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 4, 3, 16, 16, generator=g)
    assert torch.allclose(ssim(img, img), torch.ones(2, 4), atol=1e-4)
    noisy = (img + 0.3 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    assert (ssim(noisy, img) < 0.9).all()
    # tiny images still work (smaller window)
    assert ssim(img[..., :8, :8], img[..., :8, :8]).shape == (2, 4)


def test_mean_colour_baseline():
    context = torch.zeros(2, 2, 3, 4, 4)
    context[0, 0, 0] = 1.0  # scene 0: half of its context pixels are red
    context[1, :, 2] = 0.5
    out = mean_colour_baseline(context, num_targets=3)
    assert out.shape == (2, 3, 3, 4, 4)
    assert torch.allclose(out[0, :, :, 0, 0], torch.tensor([0.5, 0.0, 0.0]).expand(3, 3))
    assert torch.allclose(out[1, :, :, 2, 1], torch.tensor([0.0, 0.0, 0.5]).expand(3, 3))


def test_context_mean_baseline_is_the_per_pixel_mean():
    context = torch.zeros(1, 2, 3, 2, 2)
    context[0, 0, :, 0, 0] = 1.0
    out = context_mean_baseline(context, num_targets=2)
    assert out.shape == (1, 2, 3, 2, 2)
    assert torch.allclose(out[0, 1, :, 0, 0], torch.full((3,), 0.5)) and out[0, :, :, 1, 1].abs().max() == 0


def ring(azimuths_deg: list[float]) -> torch.Tensor:
    az = torch.tensor(azimuths_deg).deg2rad()[None]
    eye = spherical_to_cartesian(az, torch.zeros_like(az), torch.full_like(az, 2.0))
    return look_at(eye, torch.zeros_like(eye))


def test_nearest_view_picks_the_closest_camera():
    context_c2w = ring([0.0, 90.0, 180.0, 270.0])
    target_c2w = ring([80.0, 185.0, 355.0])
    assert nearest_view_index(context_c2w, target_c2w).tolist() == [[1, 2, 0]]
    context = torch.arange(4.0).view(1, 4, 1, 1, 1).expand(1, 4, 3, 2, 2) / 4
    out = nearest_view_baseline(context, context_c2w, target_c2w)
    assert out.shape == (1, 3, 3, 2, 2)
    assert torch.allclose(out[0, :, 0, 0, 0], torch.tensor([0.25, 0.5, 0.0]))


def test_camera_distance_adds_angle_and_scaled_distance():
    a, b = ring([0.0]), ring([90.0])
    # 90 degrees apart; centres 2*sqrt(2) apart on a ring of radius 2
    assert camera_distance(a, b, scale=1.0).item() == pytest.approx(math.pi / 2 + 2 * math.sqrt(2), abs=1e-4)
    assert camera_distance(a, a).item() == pytest.approx(0.0, abs=1e-3)
