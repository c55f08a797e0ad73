"""The 3D U-Net: shapes at several resolutions, errors for grids it cannot halve, gradient flow, speed."""

from __future__ import annotations

import time

import pytest
import torch

from selfsup3d.layers.unet3d import UNet3D


@pytest.mark.parametrize(("levels", "shape"), [(0, (5, 6, 7)), (1, (8, 8, 8)), (2, (16, 8, 12)), (3, (32, 32, 32))])
def test_unet_keeps_the_grid_and_maps_channels(levels, shape):
    torch.manual_seed(0)
    net = UNet3D(4, 7, width=8, levels=levels)
    out = net(torch.randn(2, 4, *shape))
    assert out.shape == (2, 7, *shape)
    assert net.widths == [8 * 2**level for level in range(levels + 1)]


def test_unet_width_cap_and_divisibility_error():
    net = UNet3D(1, 1, width=8, levels=3, max_width=16)
    assert net.widths == [8, 16, 16, 16]
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.zeros(1, 1, 16, 16, 12))
    with pytest.raises(ValueError, match=r"\[B, C, D, H, W\]"):
        net(torch.zeros(1, 16, 16, 16))


def test_unet_gradients_reach_every_parameter_and_the_input():
    torch.manual_seed(0)
    net = UNet3D(3, 5, width=8, levels=2)
    x = torch.randn(1, 3, 8, 8, 8, requires_grad=True)
    net(x).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_unet_output_depends_on_far_away_voxels_through_the_coarse_levels():
    # with 2 levels the receptive field spans the 8^3 grid: a change in one corner reaches the opposite one
    torch.manual_seed(0)
    net = UNet3D(1, 1, width=8, levels=2).eval()
    x = torch.zeros(1, 1, 8, 8, 8)
    y = x.clone()
    y[..., 0, 0, 0] = 1.0
    with torch.no_grad():
        delta = (net(y) - net(x)).abs()
    assert delta[..., 7, 7, 7] > 0


def test_unet_32_cubed_width_16_forward_backward_is_fast_on_one_thread():
    torch.manual_seed(0)
    net = UNet3D(4, 33, width=16, levels=3)
    x = torch.randn(2, 4, 32, 32, 32)
    net(x).mean().backward()  # warm-up
    t0 = time.perf_counter()
    net(x).mean().backward()
    elapsed = time.perf_counter() - t0
    assert elapsed < 3.0, f"forward + backward took {elapsed:.2f} s"  # about 0.2 s on one core
