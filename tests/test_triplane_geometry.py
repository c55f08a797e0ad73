"""Triplane projection and sampling: analytic values, agreement of the two samplers, gradients."""

from __future__ import annotations

import pytest
import torch

from selfsup3d.geometry.triplane import inside_box, project_to_planes, sample_triplane, sample_triplane_sparse


def linear_planes(size: int, box: float) -> torch.Tensor:
    """Planes whose single channel is ``u`` on plane 0, ``v`` on plane 1 and ``u + v`` on plane 2, where
    ``(u, v)`` are the world coordinates of each texel centre."""
    centres = (torch.arange(size) + 0.5) / size * box - box / 2
    v, u = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([u, v, u + v])[None, :, None]  # [1, 3, 1, R, R]


def test_project_to_planes_axes_and_scale():
    p = torch.tensor([[0.5, -0.25, 1.0]])
    uv = project_to_planes(p, box_size=2.0)
    assert torch.allclose(uv[:, 0], torch.tensor([[0.5, -0.25], [0.5, 1.0], [-0.25, 1.0]]))
    assert inside_box(torch.tensor([[0.9, -0.9, 0.99], [1.1, 0.0, 0.0]]), 2.0).tolist() == [True, False]


@pytest.mark.parametrize("sampler", [sample_triplane, sample_triplane_sparse])
def test_bilinear_sampling_reproduces_linear_fields(sampler):
    box = 2.0
    planes = linear_planes(16, box)
    # stay inside the outermost texel centres, where bilinear interpolation is exact for linear fields
    points = (torch.rand(1, 500, 3) * 2 - 1) * (box / 2 - box / 16)
    x, y, z = points[0].unbind(-1)
    features = sampler(planes, points, box, "sum")[0, :, 0]
    # plane 0 reads (x, y) -> x; plane 1 reads (x, z) -> z; plane 2 reads (y, z) -> y + z
    assert torch.allclose(features, x + z + (y + z), atol=1e-5)
    mean = sampler(planes, points, box, "mean")[0, :, 0]
    assert torch.allclose(mean, features / 3, atol=1e-5)


def test_concat_keeps_planes_apart():
    planes = linear_planes(8, 2.0)
    points = torch.tensor([[[0.1, 0.2, 0.3]]])
    feats = sample_triplane(planes, points, 2.0, "concat")
    assert feats.shape == (1, 1, 3)
    assert torch.allclose(feats[0, 0], torch.tensor([0.1, 0.3, 0.5]), atol=1e-5)


def test_points_outside_the_box_read_zeros():
    planes = torch.ones(1, 3, 4, 8, 8)
    points = torch.tensor([[[0.0, 0.0, 5.0], [3.0, 3.0, 3.0]]])
    for sampler in (sample_triplane, sample_triplane_sparse):
        feats = sampler(planes, points, 2.0)
        assert torch.allclose(feats[0, 1], torch.zeros(4))  # all three planes outside
        assert torch.allclose(feats[0, 0], torch.ones(4))  # only the xy plane inside


def test_sparse_sampler_matches_grid_sample_with_gradients():
    torch.manual_seed(0)
    planes_a = torch.randn(2, 3, 5, 8, 8, requires_grad=True)
    planes_b = planes_a.detach().clone().requires_grad_(True)
    points = torch.rand(2, 300, 3) * 2.6 - 1.3  # some outside the box and on the border texels
    grad = torch.randn(2, 300, 5)
    a = sample_triplane(planes_a, points, 2.0, "sum")
    b = sample_triplane_sparse(planes_b, points, 2.0, "sum")
    assert torch.allclose(a, b, atol=1e-5)
    a.backward(grad)
    b.backward(grad)
    assert torch.allclose(planes_a.grad, planes_b.grad, atol=1e-4)


def test_sparse_sampler_refuses_what_it_cannot_do():
    planes = torch.zeros(1, 3, 2, 4, 4)
    with pytest.raises(ValueError, match="sum"):
        sample_triplane_sparse(planes, torch.zeros(1, 1, 3), 2.0, "concat")
    with pytest.raises(ValueError, match="points"):
        sample_triplane_sparse(planes, torch.zeros(1, 1, 3, requires_grad=True), 2.0)
