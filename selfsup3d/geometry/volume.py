"""Volume rendering as small pure functions: ray samples, compositing, importance sampling, depth targets.

Conventions:

* Rays are ``origin + t · direction`` where ``direction`` has **camera z = 1** (not unit length), so
  ``t`` is z-depth and a rendered depth compares directly with z-depth maps. Distances along a ray are
  ``Δt · |direction|`` (``ray_norm``).
* Samples are sorted depths ``t`` ``[..., S]`` in ``[near, far]``. Sample ``i`` stands for the interval
  between the midpoints to its neighbours, the first interval starting at ``near`` and the last ending
  at ``far`` (:func:`sample_intervals`), so the intervals tile ``[near, far]`` whatever the samples. For
  stratified samples at bin centres these are exactly the bins.
* Compositing: ``alpha_i = 1 - exp(-σ_i δ_i)``, transmittance ``T_i = exp(-Σ_{j<i} σ_j δ_j)``, weights
  ``w_i = T_i alpha_i``; values (colour, or any ``C`` channels: features, scores) ``Σ w_i c_i + (1 - Σ w_i) ·
  background``; depth ``Σ w_i t_i + (1 - Σ w_i) · far`` (what the ray does not hit is at the far plane).
* ``near`` and ``far`` are floats (one range for every ray) or tensors broadcastable to the rays' leading
  shape (a range per ray, e.g. where each ray enters and leaves a box).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch
from torch import Tensor

from selfsup3d.errors import require

Bound: TypeAlias = "float | Tensor"
"""A depth bound: one float for every ray, or a tensor broadcastable to the rays' leading shape."""


def _bound(value: float | Tensor, lead: tuple[int, ...] | torch.Size, like: Tensor) -> Tensor:
    """``value`` as a ``[*lead, 1]`` tensor of ``like``'s dtype and device."""
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).expand(lead)[..., None]


@dataclass
class Composite:
    """What compositing a batch of rays gives (leading shape ``[...]`` of the rays).

    Attributes:
        rgb: ``[..., C]`` composited values (colour for ``C = 3``).
        depth: ``[...]`` expected z-depth, with the missing opacity at ``far``.
        opacity: ``[...]`` accumulated opacity ``Σ w_i`` in ``[0, 1]``.
        weights: ``[..., S]`` per-sample weights.
    """

    rgb: Tensor
    depth: Tensor
    opacity: Tensor
    weights: Tensor


@dataclass
class RenderResult(Composite):
    """A composite plus the samples it was made of.

    Attributes:
        t: ``[..., S]`` sorted sample depths (coarse and importance samples merged).
        density: ``[..., S]`` densities at ``t`` (for the density regulariser).
        coarse_weights: ``[..., S_coarse]`` weights of the coarse pass (detached).
    """

    t: Tensor | None = None
    density: Tensor | None = None
    coarse_weights: Tensor | None = None


def stratified_samples(
    near: Bound,
    far: Bound,
    shape: tuple[int, ...],
    num_samples: int,
    perturb: bool = True,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sorted depths, one per equal bin of ``[near, far]``: bin centres, or uniform in each bin (``perturb``).

    Args:
        near: start of the depth range.
        far: end of the depth range.
        shape: leading shape of the rays.
        num_samples: samples (bins) per ray.
        perturb: jitter each sample uniformly inside its bin (training); bin centres otherwise.
        device: where the tensor lives.
        generator: random generator for the jitter.

    Returns:
        ``[*shape, num_samples]`` depths.
    """
    require(num_samples >= 1, "num_samples", ">= 1", num_samples, ValueError)
    if not isinstance(near, Tensor) and not isinstance(far, Tensor) and not far > near:
        raise ValueError(f"far ({far}) must be greater than near ({near})")
    offset = (
        torch.rand(*shape, num_samples, device=device, generator=generator)
        if perturb
        else torch.full((*shape, num_samples), 0.5, device=device)
    )
    lo, hi = _bound(near, tuple(shape), offset), _bound(far, tuple(shape), offset)
    return lo + (torch.arange(num_samples, device=device, dtype=offset.dtype) + offset) * ((hi - lo) / num_samples)


def interval_edges(t: Tensor, near: Bound, far: Bound) -> Tensor:
    """``[..., S + 1]`` edges of the intervals the sorted samples ``t`` ``[..., S]`` stand for."""
    mids = 0.5 * (t[..., 1:] + t[..., :-1])
    lead = t.shape[:-1]
    return torch.cat([_bound(near, lead, t), mids, _bound(far, lead, t)], dim=-1)


def sample_intervals(t: Tensor, near: Bound, far: Bound) -> Tensor:
    """``[..., S]`` lengths (in depth) of the intervals the sorted samples ``t`` stand for; they sum to
    ``far - near``."""
    return interval_edges(t, near, far).diff(dim=-1)


def composite(
    density: Tensor,
    rgb: Tensor,
    t: Tensor,
    near: Bound,
    far: Bound,
    ray_norm: Tensor | None = None,
    background: Tensor | float | None = None,
) -> Composite:
    """Alpha-composite samples along rays (see the module docstring for the formulas).

    Computed in float32 whatever the input dtype (bf16 transmittance products lose the far samples).

    Args:
        density: ``[..., S]`` non-negative densities (per unit distance).
        rgb: ``[..., S, C]`` colours (or any per-sample values).
        t: ``[..., S]`` sorted sample depths.
        near: start of the depth range.
        far: end of the depth range.
        ray_norm: ``[...]`` length of each ray's direction (distance per unit of ``t``); 1 when ``None``.
        background: values behind everything (a float, or ``[C]``/``[..., C]``); nothing when ``None``.

    Returns:
        :class:`Composite` with values, depth, opacity and weights.
    """
    density = density.float()
    rgb = rgb.float()
    t = t.float()
    delta = sample_intervals(t, near, far)
    if ray_norm is not None:
        delta = delta * ray_norm.float()[..., None]
    optical = density * delta
    # exclusive cumulative sum: the light that reaches sample i
    shifted = torch.cat([torch.zeros_like(optical[..., :1]), optical[..., :-1]], dim=-1)
    transmittance = torch.exp(-torch.cumsum(shifted, dim=-1))
    alpha = -torch.expm1(-optical)
    weights = transmittance * alpha
    opacity = weights.sum(dim=-1)
    color = (weights[..., None] * rgb).sum(dim=-2)
    if background is not None:
        bg = torch.as_tensor(background, dtype=color.dtype, device=color.device)
        color = color + (1.0 - opacity)[..., None] * bg
    depth = (weights * t).sum(dim=-1) + (1.0 - opacity) * _bound(far, opacity.shape, opacity)[..., 0]
    return Composite(rgb=color, depth=depth, opacity=opacity, weights=weights)


def sample_pdf(
    t: Tensor,
    weights: Tensor,
    near: Bound,
    far: Bound,
    num_samples: int,
    perturb: bool = True,
    floor: float = 0.01,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Importance samples: draw depths from the piecewise-constant density that spreads each weight
    uniformly over its sample's interval (inverse transform sampling).

    Args:
        t: ``[..., S]`` sorted sample depths of the coarse pass.
        weights: ``[..., S]`` their compositing weights (gradients are not propagated).
        near: start of the depth range.
        far: end of the depth range.
        num_samples: new samples per ray.
        perturb: stratified random quantiles (training); evenly spaced quantiles otherwise.
        floor: probability mass spread uniformly over ``[near, far]``, as a share of the total, so
            empty rays still sample the whole range.
        generator: random generator for the quantiles.

    Returns:
        ``[..., num_samples]`` sorted depths in ``[near, far]``.
    """
    t = t.detach().float()
    weights = weights.detach().float()
    edges = interval_edges(t, near, far)  # [..., S+1]
    lengths = edges.diff(dim=-1)
    uniform = lengths / lengths.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    pmf = weights / weights.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    pmf = (1.0 - floor) * pmf + floor * uniform
    has_mass = weights.sum(dim=-1, keepdim=True) > 1e-12
    pmf = torch.where(has_mass, pmf, uniform)
    cdf = torch.cumsum(pmf, dim=-1)
    cdf = torch.cat([torch.zeros_like(cdf[..., :1]), cdf], dim=-1)  # [..., S+1]
    cdf = cdf / cdf[..., -1:]
    lead = t.shape[:-1]
    if perturb:
        u = torch.rand(*lead, num_samples, device=t.device, generator=generator)
    else:
        u = torch.full((*lead, num_samples), 0.5, device=t.device)
    u = (torch.arange(num_samples, device=t.device, dtype=u.dtype) + u) / num_samples
    idx = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True).clamp(1, edges.shape[-1] - 1)
    cdf_lo, cdf_hi = cdf.gather(-1, idx - 1), cdf.gather(-1, idx)
    edge_lo, edge_hi = edges.gather(-1, idx - 1), edges.gather(-1, idx)
    frac = (u - cdf_lo) / (cdf_hi - cdf_lo).clamp(min=1e-12)
    samples = edge_lo + frac.clamp(0, 1) * (edge_hi - edge_lo)
    return torch.minimum(torch.maximum(samples, edges[..., :1]), edges[..., -1:])


def merge_samples(t_a: Tensor, t_b: Tensor, *values: tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:
    """Merge two sets of samples along the last axis of ``t`` and sort them by depth.

    Args:
        t_a: ``[..., Sa]`` depths.
        t_b: ``[..., Sb]`` depths.
        values: pairs ``(a, b)`` of per-sample values ``[..., Sa, *f]`` and ``[..., Sb, *f]`` that follow
            the same permutation.

    Returns:
        The merged sorted depths ``[..., Sa + Sb]`` followed by each merged value.
    """
    t = torch.cat([t_a, t_b], dim=-1)
    t_sorted, order = torch.sort(t, dim=-1)
    merged = [t_sorted]
    dim = t.ndim - 1
    for a, b in values:
        v = torch.cat([a, b], dim=dim)
        idx = order.view(*order.shape, *([1] * (v.ndim - order.ndim))).expand_as(v)
        merged.append(v.gather(dim, idx))
    return tuple(merged)


Field = Callable[[Tensor], tuple[Tensor, Tensor]]
"""A field: points ``[B, R, S, 3]`` -> densities ``[B, R, S]`` and values ``[B, R, S, C]`` (colours, features)."""


def render_rays(
    field: Field,
    origins: Tensor,
    directions: Tensor,
    near: Bound,
    far: Bound,
    num_coarse: int = 16,
    num_fine: int = 16,
    perturb: bool = True,
    background: Tensor | float | None = None,
    generator: torch.Generator | None = None,
) -> RenderResult:
    """Render rays through a radiance field: stratified coarse samples, importance samples from the
    coarse weights, every sample evaluated once, one final composite over all of them.

    Args:
        field: the radiance field (see :data:`Field`).
        origins: ``[B, R, 3]`` ray origins.
        directions: ``[B, R, 3]`` ray directions with camera z = 1 (``t`` is z-depth).
        near: start of the depth range.
        far: end of the depth range.
        num_coarse: stratified samples per ray.
        num_fine: importance samples per ray (0: coarse only).
        perturb: random sample positions (training) or deterministic ones (evaluation).
        background: colour behind everything, see :func:`composite`.
        generator: random generator.

    Returns:
        :class:`RenderResult` with colour ``[B, R, 3]``, depth, opacity ``[B, R]``, weights and samples.
    """
    lead = origins.shape[:-1]
    ray_norm = directions.norm(dim=-1)
    t = stratified_samples(near, far, lead, num_coarse, perturb, origins.device, generator)
    density, rgb = field(origins[..., None, :] + t[..., None] * directions[..., None, :])
    with torch.no_grad():  # the coarse composite only steers the importance samples
        coarse = composite(density.detach(), rgb.detach(), t, near, far, ray_norm, background)
    if num_fine > 0:
        t_fine = sample_pdf(t, coarse.weights, near, far, num_fine, perturb, generator=generator)
        density_f, rgb_f = field(origins[..., None, :] + t_fine[..., None] * directions[..., None, :])
        t, density, rgb = merge_samples(t, t_fine, (density, density_f), (rgb, rgb_f))
        out = composite(density, rgb, t, near, far, ray_norm, background)
    else:
        out = composite(density, rgb, t, near, far, ray_norm, background)
    return RenderResult(
        rgb=out.rgb,
        depth=out.depth,
        opacity=out.opacity,
        weights=out.weights,
        t=t,
        density=density,
        coarse_weights=coarse.weights.detach(),
    )


# ---------------------------------------------------------------------------- depth targets
DepthNormalization = Literal["percentile", "median", "none"]


def normalize_depth(
    depth: Tensor,
    near: float,
    far: float,
    mode: DepthNormalization = "percentile",
    quantiles: tuple[float, float] = (0.02, 0.98),
    margin: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Map depth maps of unknown scale into the renderer's ``[near, far]`` range, per image.

    * ``percentile`` (affine, for relative pseudo depth): the ``quantiles[0]`` and ``quantiles[1]``
      quantiles of an image's valid depths go to ``near + margin·(far - near)`` and
      ``far - margin·(far - near)``; values beyond are clamped into ``[near, far]``. Robust to a few
      outliers and invariant to the depth's scale and shift.
    * ``median`` (scale only, for metric depth seen by a camera of unknown distance): the image's median
      valid depth goes to the middle of the range, proportions are kept, then clamped.
    * ``none``: depth used as is (metric depth whose camera matches the renderer's), clamped.

    Args:
        depth: ``[B, 1, H, W]`` depth-like maps (larger = farther); 0 or non-finite = unknown.
        near: start of the renderer's depth range.
        far: end of the renderer's depth range.
        mode: ``percentile``, ``median`` or ``none``.
        quantiles: the robust low/high quantiles for ``percentile``.
        margin: share of the range kept free at each end for ``percentile``.

    Returns:
        The normalised maps ``[B, 1, H, W]`` (0 where unknown) and the validity mask ``[B, 1, H, W]``.
    """
    valid = torch.isfinite(depth) & (depth > 0)
    d = torch.where(valid, depth, torch.zeros_like(depth)).float()
    b = d.shape[0]
    flat, vflat = d.reshape(b, -1), valid.reshape(b, -1)
    if mode == "none":
        out = d.clamp(near, far)
    elif mode in ("percentile", "median"):
        # quantiles over the valid pixels of each image: NaN-out the invalid ones
        masked = torch.where(vflat, flat, torch.full_like(flat, float("nan")))
        if mode == "percentile":
            q = torch.tensor(quantiles, dtype=flat.dtype, device=flat.device)
            lo, hi = torch.nanquantile(masked, q, dim=1).unbind(0)  # [B] each
            lo, hi = torch.nan_to_num(lo, nan=0.0), torch.nan_to_num(hi, nan=1.0)
            span = (hi - lo).clamp(min=1e-6)
            unit = (d - lo.view(b, 1, 1, 1)) / span.view(b, 1, 1, 1)
            a, z = near + margin * (far - near), far - margin * (far - near)
            out = (a + unit * (z - a)).clamp(near, far)
        else:
            med = torch.nan_to_num(torch.nanmedian(masked, dim=1).values, nan=1.0).clamp(min=1e-6)
            out = (d * (0.5 * (near + far) / med).view(b, 1, 1, 1)).clamp(near, far)
    else:
        raise ValueError(f"depth normalisation must be 'percentile', 'median' or 'none', got {mode!r}")
    return torch.where(valid, out, torch.zeros_like(out)), valid
