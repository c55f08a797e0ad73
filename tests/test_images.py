from __future__ import annotations

import torch

from selfsup3d.callbacks.images import colorize, feature_pca, image_grid


def test_image_grid_layout():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.ones(3, 1, 8, 8)  # grey, larger: resized to the first row's height
    g = image_grid([a, b], pad=1)
    assert g.shape == (3, 2 * 6, 3 * 6)
    assert g[:, 1:5, 1:5].eq(0).all() and g[:, 7:11, 1:5].eq(1).all()


def test_colorize_orders_values_and_blanks_invalid():
    depth = torch.linspace(1, 2, 16).view(1, 1, 4, 4)
    invalid = torch.zeros_like(depth, dtype=torch.bool)
    invalid[..., 0, 0] = True
    rgb = colorize(depth, vmin=1.0, vmax=2.0, cmap="gray", invalid=invalid)
    assert rgb.shape == (1, 3, 4, 4) and rgb[0, :, 0, 0].eq(0).all()
    grey = rgb[0, 0].flatten()[1:]
    assert torch.all(grey[1:] >= grey[:-1])


def test_feature_pca_separates_two_clusters():
    f = torch.zeros(1, 8, 4, 4)
    f[:, 0, :, :2] = 5.0  # left half differs along one feature direction
    f += 0.01 * torch.randn_like(f)
    rgb = feature_pca(f)
    left, right = rgb[0, :, :, :2].mean((1, 2)), rgb[0, :, :, 2:].mean((1, 2))
    assert (left - right).abs().max() > 0.5
