"""Volume rendering against analytic cases: slabs, thin layers, importance sampling, depth targets."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup3d.geometry.volume import (
    composite,
    merge_samples,
    normalize_depth,
    render_rays,
    sample_intervals,
    sample_pdf,
    stratified_samples,
)

NEAR, FAR = 1.0, 3.0


def slab_density(t: torch.Tensor, a: float, b: float, sigma: float) -> torch.Tensor:
    return torch.where((t >= a) & (t <= b), torch.full_like(t, sigma), torch.zeros_like(t))


def test_stratified_samples_stay_in_their_bins():
    t = stratified_samples(NEAR, FAR, (5,), 8, perturb=True, generator=torch.Generator().manual_seed(0))
    step = (FAR - NEAR) / 8
    bins = torch.floor((t - NEAR) / step)
    assert torch.equal(bins, torch.arange(8.0).expand(5, 8))
    centres = stratified_samples(NEAR, FAR, (2,), 4, perturb=False)
    assert torch.allclose(centres[0], torch.tensor([1.25, 1.75, 2.25, 2.75]))


def test_intervals_tile_the_range():
    t = torch.sort(torch.rand(7, 13) * (FAR - NEAR) + NEAR, dim=-1).values
    lengths = sample_intervals(t, NEAR, FAR)
    assert (lengths >= 0).all()
    assert torch.allclose(lengths.sum(-1), torch.full((7,), FAR - NEAR))


@pytest.mark.parametrize("sigma", [0.3, 2.0, 10.0])
def test_constant_density_slab_transmittance_is_exact_on_bin_aligned_samples(sigma):
    # 40 bins of 0.05; the slab [1.5, 2.5] covers bins 10..29 exactly
    t = stratified_samples(NEAR, FAR, (1,), 40, perturb=False)
    out = composite(slab_density(t, 1.5, 2.5, sigma), torch.ones(1, 40, 3), t, NEAR, FAR)
    expected = 1.0 - math.exp(-sigma * 1.0)
    assert out.opacity.item() == pytest.approx(expected, rel=1e-5)
    assert out.weights.sum().item() == pytest.approx(expected, rel=1e-5)


def test_slab_transmittance_uses_distance_along_the_ray():
    # a direction with |d| = 2 per unit depth doubles the optical thickness
    t = stratified_samples(NEAR, FAR, (1,), 40, perturb=False)
    out = composite(slab_density(t, 1.5, 2.5, 0.5), torch.ones(1, 40, 3), t, NEAR, FAR, ray_norm=torch.tensor([2.0]))
    assert out.opacity.item() == pytest.approx(1.0 - math.exp(-0.5 * 2.0), rel=1e-5)


def test_slab_expected_depth_matches_the_integral():
    sigma, a, b = 1.5, 1.5, 2.5
    t = stratified_samples(NEAR, FAR, (1,), 20000, perturb=False)
    out = composite(slab_density(t, a, b, sigma), torch.zeros(1, 20000, 3), t, NEAR, FAR)
    length = b - a
    hit = 1.0 - math.exp(-sigma * length)
    # ∫_a^b t σ e^{-σ(t-a)} dt, plus the light that passes at the far plane
    integral = a * hit + (1.0 - math.exp(-sigma * length) * (1.0 + sigma * length)) / sigma
    expected = integral + (1.0 - hit) * FAR
    assert out.depth.item() == pytest.approx(expected, abs=2e-4)


def test_thin_opaque_layer_gives_its_depth_and_colour():
    t = stratified_samples(NEAR, FAR, (3,), 64, perturb=True, generator=torch.Generator().manual_seed(1))
    surface = 2.2
    density = torch.zeros_like(t)
    # the first sample behind the surface is fully opaque
    first = (t >= surface).float().argmax(-1)
    density.scatter_(-1, first[:, None], 1e6)
    colours = torch.zeros(3, 64, 3)
    colours[torch.arange(3), first] = torch.tensor([0.2, 0.4, 0.6])
    out = composite(density, colours, t, NEAR, FAR, background=1.0)
    assert torch.allclose(out.opacity, torch.ones(3), atol=1e-6)
    assert torch.allclose(out.depth, t.gather(-1, first[:, None]).squeeze(-1), atol=1e-5)
    assert (out.depth - surface).abs().max() < (FAR - NEAR) / 64 + 1e-6
    assert torch.allclose(out.rgb, torch.tensor([0.2, 0.4, 0.6]).expand(3, 3), atol=1e-5)


def test_empty_rays_show_the_background_at_far():
    t = stratified_samples(NEAR, FAR, (2,), 8, perturb=False)
    out = composite(torch.zeros(2, 8), torch.rand(2, 8, 3), t, NEAR, FAR, background=torch.tensor([1.0, 0.5, 0.0]))
    assert torch.allclose(out.depth, torch.full((2,), FAR))
    assert torch.allclose(out.rgb, torch.tensor([1.0, 0.5, 0.0]).expand(2, 3))
    assert torch.equal(out.opacity, torch.zeros(2))


def test_importance_samples_concentrate_at_a_surface():
    t = stratified_samples(NEAR, FAR, (100,), 16, perturb=True, generator=torch.Generator().manual_seed(2))
    surface = 1.9
    density = torch.where(t > surface, torch.full_like(t, 50.0), torch.zeros_like(t))
    coarse = composite(density, torch.zeros(100, 16, 3), t, NEAR, FAR)
    fine = sample_pdf(t, coarse.weights, NEAR, FAR, 16, perturb=True, generator=torch.Generator().manual_seed(3))
    assert (fine[..., 1:] >= fine[..., :-1]).all()  # sorted
    assert fine.min() >= NEAR and fine.max() <= FAR
    bin_width = (FAR - NEAR) / 16
    near_surface = ((fine - surface).abs() < 2 * bin_width).float().mean()
    uniform_share = 4 * bin_width / (FAR - NEAR)
    assert near_surface > 0.9 > 3 * uniform_share
    # and they follow the weights: a ray whose coarse weights are uniform samples uniformly
    flat = sample_pdf(t[:1], torch.ones(1, 16), NEAR, FAR, 1000, perturb=False)
    assert torch.allclose(flat, torch.linspace(NEAR, FAR, 1001)[:-1] + (FAR - NEAR) / 2000, atol=0.1)


def test_importance_sampling_inverts_a_known_cdf():
    # all the weight on the interval of sample 1 (edges 1.5 .. 2.5): evenly spaced quantiles land evenly there
    t = torch.tensor([[1.0, 2.0, 3.0]])
    fine = sample_pdf(t, torch.tensor([[0.0, 1.0, 0.0]]), NEAR, FAR, 4, perturb=False, floor=0.0)
    assert torch.allclose(fine, torch.tensor([[1.625, 1.875, 2.125, 2.375]]))


def test_merge_samples_sorts_values_along():
    t, v, c = merge_samples(
        torch.tensor([[1.0, 3.0]]),
        torch.tensor([[2.0, 0.5]]),
        (torch.tensor([[10.0, 30.0]]), torch.tensor([[20.0, 5.0]])),
        (torch.tensor([[[1.0], [3.0]]]), torch.tensor([[[2.0], [0.5]]])),
    )
    assert torch.equal(t, torch.tensor([[0.5, 1.0, 2.0, 3.0]]))
    assert torch.equal(v, torch.tensor([[5.0, 10.0, 20.0, 30.0]]))
    assert torch.equal(c[..., 0], t)


def test_render_rays_finds_a_plane_and_backpropagates():
    surface = 2.0
    scale = torch.tensor(1.0, requires_grad=True)

    def field(points):
        z = points[..., 2]
        density = scale * 200.0 * torch.sigmoid((z - surface) * 200.0)
        rgb = torch.stack([torch.sigmoid(points[..., 0]), torch.zeros_like(z), torch.ones_like(z)], dim=-1)
        return density, rgb

    origins = torch.zeros(1, 6, 3)
    directions = torch.cat([torch.randn(1, 6, 2) * 0.2, torch.ones(1, 6, 1)], dim=-1)
    out = render_rays(field, origins, directions, NEAR, FAR, 16, 16, perturb=False)
    assert out.t.shape == (1, 6, 32) and out.density.shape == (1, 6, 32)
    coarse_only = render_rays(field, origins, directions, NEAR, FAR, 16, 0, perturb=False)
    # importance samples sharpen the surface estimate
    assert (out.depth - surface).abs().max() < (coarse_only.depth - surface).abs().max()
    assert (out.depth - surface).abs().max() < 0.04
    out.depth.sum().backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)


def test_normalize_depth_modes():
    depth = torch.zeros(2, 1, 10, 10)
    depth[0, 0] = torch.linspace(1, 100, 100).view(10, 10)
    depth[1, 0, :6] = 7.0
    depth[1, 0, 6:] = 14.0
    depth[1, 0, 0, 0] = 0.0  # unknown
    out, valid = normalize_depth(depth, NEAR, FAR, "percentile", quantiles=(0.0, 1.0), margin=0.1)
    assert not valid[1, 0, 0, 0] and out[1, 0, 0, 0] == 0
    assert out[0].max().item() == pytest.approx(FAR - 0.2) and out[0].min().item() == pytest.approx(NEAR + 0.2)
    # invariant to scale and shift
    shifted, _ = normalize_depth(depth[:1] * 3 + 5, NEAR, FAR, "percentile", quantiles=(0.0, 1.0), margin=0.1)
    assert torch.allclose(shifted, out[:1], atol=1e-5)
    med, _ = normalize_depth(depth, NEAR, FAR, "median")
    assert med[1, 0, 1, 0].item() == pytest.approx(2.0)  # median 7 -> middle of [1, 3]; 14 -> clamped to 3
    assert med[1, 0, 9, 9].item() == pytest.approx(3.0)
    raw, _ = normalize_depth(depth, NEAR, FAR, "none")
    assert raw[0].min() >= NEAR and raw[0].max() <= FAR
