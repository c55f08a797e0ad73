"""Picture helpers: grids with row labels, depth colouring, feature PCA."""

from __future__ import annotations

import pytest
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


def _margin_ink(grid: torch.Tensor, top: int, bottom: int, width: int) -> float:
    """How much dark (text) there is in the left ``width`` columns of rows ``top:bottom``."""
    return float((grid[:, top:bottom, :width] < 0.5).float().mean())


def test_image_grid_row_labels_sit_in_a_left_margin():
    a, b = torch.ones(2, 3, 16, 16), torch.ones(2, 3, 16, 16)
    plain = image_grid([a, b], pad=2)
    labelled = image_grid([a, b], pad=2, labels=["input", ""])
    margin = labelled.shape[-1] - plain.shape[-1]
    assert labelled.shape[:2] == plain.shape[:2] and margin > 10
    assert torch.equal(labelled[:, :, margin:], plain)  # the pictures are unchanged, only shifted right
    assert _margin_ink(labelled, 0, 20, margin) > 0.01  # text drawn beside the first row ...
    assert _margin_ink(labelled, 20, 40, margin) == 0  # ... and nothing beside the unlabelled one
    with pytest.raises(ValueError, match="labels"):
        image_grid([a, b], labels=["only one"])


def test_picture_callbacks_label_their_rows():
    from selfsup3d.callbacks.masked_view import MaskedViewPictures
    from selfsup3d.callbacks.triplane import triplane_picture

    white = {k: torch.ones(1, 2, 3, 16, 16) for k in ("context", "target", "render")}
    grid = MaskedViewPictures(max_scenes=1, min_size=16).render_grid(white)
    views = 2 * (16 + 4)
    margin = grid.shape[-1] - views
    assert margin > 10
    for row in range(3):  # context, target, render
        assert _margin_ink(grid, row * 20, (row + 1) * 20, margin) > 0.01
    outputs = {"image": torch.ones(2, 3, 16, 16), "render_rgb": torch.ones(2, 3, 16, 16)}
    outputs["render_depth"] = torch.full((2, 1, 16, 16), 2.0)
    picture = triplane_picture(outputs, num_images=2, near=1.0, far=3.0)
    margin = picture.shape[-1] - views
    assert margin > 10 and _margin_ink(picture, 0, 20, margin) > 0.01
