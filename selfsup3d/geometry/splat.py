"""3D Gaussian splatting as small pure functions: projection to 2D (EWA) and front-to-back alpha compositing.

The math is 3D Gaussian splatting's (Kerbl et al. 2023) as gsplat implements it, so that the CPU path here and
gsplat's CUDA rasteriser agree on the same Gaussians (``bench/splat.py`` checks it before it times):

* a Gaussian ``(μ, Σ)`` in world space goes to the camera frame (``w2c``), its covariance to the image plane
  through the Jacobian of the perspective projection at ``μ`` (the lateral offset clamped to 1.3 × the field of
  view, as gsplat does), plus ``eps2d`` on the diagonal (a low-pass filter of about a pixel);
* at a pixel centre ``p`` (pixel ``(row i, column j)`` has its centre at ``(j + 0.5, i + 0.5)``), a projected
  Gaussian with mean ``m``, conic (inverse 2D covariance) ``Q`` and opacity ``o`` has
  ``α = min(0.999, o · exp(-½ (p - m)ᵀ Q (p - m)))``; contributions with ``α < 1/255`` are skipped;
* the pixel composites its Gaussians front to back by camera-frame depth:
  ``C = Σᵢ cᵢ αᵢ Tᵢ + T_final · background`` with ``Tᵢ = Πⱼ<ᵢ (1 - αⱼ)``, and stops before the Gaussian
  that would bring the transmittance to ``1e-4`` or below;
* Gaussians closer than ``near`` (camera-frame z) are not drawn.

:func:`rasterize` evaluates every Gaussian only on the pixels within reach of its mean (where ``α`` can reach
``1/255``) and composites all of a batch's pixels at once: contributions are sorted by (image, pixel, depth)
and the transmittance is a cumulative sum of ``log(1 - α)`` within each pixel's run, so autograd gives the
gradients (means, covariances, opacities, colours, and through them depth and cameras) without a hand-written
backward. :func:`rasterize_reference` is the brute-force definition (every Gaussian at every pixel, composited
in a loop) that tests hold it to.

Conventions are :mod:`selfsup3d.geometry.cameras`'s: ``K`` in pixels, ``c2w`` OpenCV camera-to-world.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from kornia.geometry.conversions import quaternion_to_rotation_matrix
from torch import Tensor

from selfsup3d.geometry.cameras import se3_inverse

ALPHA_MIN = 1.0 / 255.0
"""Contributions below this opacity are skipped (gsplat's threshold)."""
ALPHA_MAX = 0.999
"""A single Gaussian never makes a pixel fully opaque."""
T_MIN = 1e-4
"""Compositing stops before the Gaussian that would bring the transmittance to this or below."""


def covariance(scales: Tensor, quats: Tensor | None = None) -> Tensor:
    """3D covariances ``R S Sᵀ Rᵀ`` ``[..., 3, 3]`` of per-axis standard deviations ``scales [..., 3]`` (or
    ``[..., 1]`` for isotropic Gaussians) and rotations ``quats [..., 4]`` in ``(w, x, y, z)`` order, as gsplat takes
    them (normalised by kornia; ``None``: axis-aligned)."""
    scales = scales.expand(*scales.shape[:-1], 3)
    if quats is None:
        return torch.diag_embed(scales * scales)
    m = quaternion_to_rotation_matrix(quats) * scales[..., None, :]
    return m @ m.transpose(-1, -2)


@dataclass
class Projected:
    """Gaussians projected into images: all ``[I, N, ...]`` for ``I`` images of ``N`` Gaussians each.

    Attributes:
        means2d: ``[I, N, 2]`` pixel coordinates ``(u, v)`` of the means.
        conics: ``[I, N, 3]`` the inverse 2D covariance's ``(a, b, c)``: ``σ = ½ (a dx² + c dy²) + b dx dy``.
        depths: ``[I, N]`` camera-frame z of the means.
        radii: ``[I, N]`` (long) gsplat's 3-sigma radius in pixels; 0 for Gaussians that are not drawn (behind
            ``near``, degenerate, or entirely outside the image).
    """

    means2d: Tensor
    conics: Tensor
    depths: Tensor
    radii: Tensor


def project(
    means: Tensor,
    covs: Tensor,
    K: Tensor,
    c2w: Tensor,
    height: int,
    width: int,
    eps2d: float = 0.3,
    near: float = 0.01,
) -> Projected:
    """Project ``[I, N, 3]`` Gaussian means with covariances ``[I, N, 3, 3]`` into ``I`` cameras ``K [I, 3, 3]``,
    ``c2w [I, 4, 4]`` (EWA splatting, gsplat's pinhole projection)."""
    w2c = se3_inverse(c2w)
    rot, trans = w2c[:, None, :3, :3], w2c[:, None, :3, 3]
    cam = (rot @ means[..., None]).squeeze(-1) + trans  # [I, N, 3]
    cov_cam = rot @ covs @ rot.transpose(-1, -2)
    tx, ty, tz = cam.unbind(-1)
    fx, fy = K[:, None, 0, 0], K[:, None, 1, 1]
    cx, cy = K[:, None, 0, 2], K[:, None, 1, 2]
    z = torch.where(tz.abs() < 1e-8, torch.full_like(tz, 1e-8), tz)
    # the Jacobian at a clamped lateral offset (gsplat): Gaussians far outside the view do not blow up
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    jx = z * torch.minimum(torch.maximum(tx / z, -(cx / fx + 0.3 * tan_x)), (width - cx) / fx + 0.3 * tan_x)
    jy = z * torch.minimum(torch.maximum(ty / z, -(cy / fy + 0.3 * tan_y)), (height - cy) / fy + 0.3 * tan_y)
    zero = torch.zeros_like(z)
    J = torch.stack([fx / z, zero, -fx * jx / (z * z), zero, fy / z, -fy * jy / (z * z)], dim=-1).unflatten(-1, (2, 3))
    cov2d = J @ cov_cam @ J.transpose(-1, -2)
    a = cov2d[..., 0, 0] + eps2d
    b = 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0])
    c = cov2d[..., 1, 1] + eps2d
    det = (a * c - b * b).clamp(min=1e-10)
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)
    means2d = torch.stack([fx * tx / z + cx, fy * ty / z + cy], dim=-1)
    with torch.no_grad():
        mid = 0.5 * (a + c)
        radius = torch.ceil(3.0 * torch.sqrt(mid + torch.sqrt((mid * mid - det).clamp(min=0.01))))
        inside = (
            (means2d[..., 0] + radius > 0)
            & (means2d[..., 0] - radius < width)
            & (means2d[..., 1] + radius > 0)
            & (means2d[..., 1] - radius < height)
        )
        drawn = (tz > near) & inside & torch.isfinite(radius)
        radii = torch.where(drawn, radius, torch.zeros_like(radius)).long()
    return Projected(means2d, conics, tz, radii)


def _alpha_xy(dx: Tensor, dy: Tensor, a: Tensor, b: Tensor, c: Tensor, opacity: Tensor) -> Tensor:
    """gsplat's per-pixel opacity of Gaussians with conic ``(a, b, c)`` at offsets ``(dx, dy)`` (pixel centre minus
    mean); 0 where it falls below :data:`ALPHA_MIN` or the quadratic form is negative."""
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    alpha = (opacity * torch.exp(-sigma)).clamp(max=ALPHA_MAX)
    return torch.where((sigma >= 0) & (alpha >= ALPHA_MIN), alpha, torch.zeros_like(alpha))


def _alpha(delta: Tensor, conics: Tensor, opacities: Tensor) -> Tensor:
    """:func:`_alpha_xy` of offsets ``delta [..., 2]`` and conics ``[..., 3]``."""
    a, b, c = conics.unbind(-1)
    return _alpha_xy(delta[..., 0], delta[..., 1], a, b, c, opacities)


def reach_radii(projected: Projected, opacities: Tensor, max_radius: int | None = None) -> Tensor:
    """``[I, N]`` half-widths in pixels of the window each Gaussian must be evaluated in: a pixel centre farther
    from the mean than ``extent`` (where ``α`` falls to ``1/255``) is at least ``floor(extent + 0.5)`` pixels from
    the pixel the mean falls in; at most ``max_radius``; -1 for Gaussians that are not drawn (no window)."""
    with torch.no_grad():
        a, b, c = projected.conics.unbind(-1)
        det = (a * c - b * b).clamp(min=1e-20)
        mid = 0.5 * (a + c)
        lam_min = (mid - torch.sqrt((mid * mid - det).clamp(min=0))).clamp(min=1e-12)  # 1 / largest variance
        extent = torch.sqrt(2.0 * torch.log((opacities * 255.0).clamp(min=1.0)) / lam_min)
        radius = torch.floor(extent + 0.5)
        if max_radius is not None:
            radius = radius.clamp(max=max_radius)
        drawn = (projected.radii > 0) & (opacities * 255.0 >= 1.0) & torch.isfinite(radius)
        return torch.where(drawn, radius, torch.full_like(radius, -1)).long()


def reach(projected: Projected, opacities: Tensor, max_radius: int | None = None) -> int:
    """Half-width in pixels of the window every Gaussian must be evaluated in: the farthest a pixel centre can be
    from a mean and still get ``α ≥ 1/255`` (at least 1, at most ``max_radius``)."""
    with torch.no_grad():
        a, b, c = projected.conics.float().unbind(-1)
        det = (a * c - b * b).clamp(min=1e-20)
        # the covariance's largest eigenvalue, from the conic's smallest
        mid = 0.5 * (a + c)
        lam_min = (mid - torch.sqrt((mid * mid - det).clamp(min=0))).clamp(min=1e-12)
        extent = torch.sqrt(2.0 * torch.log((opacities.float() * 255.0).clamp(min=1.0)) / lam_min)
        extent = torch.where(projected.radii > 0, extent, torch.zeros_like(extent))
        # a pixel centre within ``extent`` of the mean is at most floor(extent + 0.5) pixels from the mean's pixel
        r = int(math.floor(float(extent.max()) + 0.5)) if extent.numel() else 1
    r = max(r, 1)
    return min(r, max_radius) if max_radius is not None else r


def rasterize(
    projected: Projected,
    opacities: Tensor,
    colors: Tensor,
    height: int,
    width: int,
    background: Tensor | None = None,
    max_radius: int | None = 8,
) -> tuple[Tensor, Tensor]:
    """Composite projected Gaussians into ``I`` images, differentiably.

    Args:
        projected: :func:`project`'s output for ``I`` images of ``N`` Gaussians.
        opacities: ``[I, N]`` in ``[0, 1]``.
        colors: ``[I, N, C]`` any channels (colour, depth, features).
        height, width: the image size.
        background: ``[I, C]`` or ``[C]`` behind the Gaussians (``None``: zeros).
        max_radius: the evaluation window's largest half-width in pixels (:func:`reach`); Gaussians wider than it
            are cut off there (pixel-aligned Gaussians are about a pixel wide).

    Returns:
        ``image [I, C, H, W]`` and ``alpha [I, 1, H, W]`` (the accumulated opacity, ``1 - T_final``).
    """
    i_count, n, channels = colors.shape
    device = colors.device
    out = colors.new_zeros(i_count * height * width, channels)
    acc = colors.new_zeros(i_count * height * width)
    if n == 0:
        return _finish(out, acc, background, i_count, channels, height, width)
    # every per-Gaussian quantity in one table, so that gathering it per contribution is one indexing
    table = torch.cat([projected.means2d, projected.conics, opacities[..., None], colors], dim=-1).reshape(
        i_count * n, -1
    )
    with torch.no_grad():
        # Gaussians in depth order per image, so that contributions come out depth-sorted within every pixel
        order = torch.argsort(projected.depths, dim=1)
        ids = (order + torch.arange(i_count, device=device)[:, None] * n).flatten()  # into [I * N]
        radius = reach_radii(projected, opacities, max_radius).flatten()[ids]  # -1: not drawn
        side = 2 * radius + 1
        count = torch.where(radius >= 0, side * side, torch.zeros_like(side))
        # one entry per (Gaussian, pixel of the window around its mean), Gaussians in depth order
        gaussian = torch.repeat_interleave(torch.arange(ids.numel(), device=device), count)
        local = torch.arange(gaussian.numel(), device=device) - (torch.cumsum(count, 0) - count)[gaussian]
        side_g, radius_g = side[gaussian], radius[gaussian]
        sorted_means = projected.means2d.reshape(i_count * n, 2)[ids]
        px = torch.floor(sorted_means[:, 0]).long()[gaussian] + local % side_g - radius_g
        py = torch.floor(sorted_means[:, 1]).long()[gaussian] + local // side_g - radius_g
        inside = (px >= 0) & (px < width) & (py >= 0) & (py < height)
        gaussian, px, py = gaussian[inside], px[inside], py[inside]
        mx, my, ca, cb, cc, op = table[:, :6][ids[gaussian]].unbind(-1)
        alpha = _alpha_xy(px + 0.5 - mx, py + 0.5 - my, ca, cb, cc, op)
        keep = alpha > 0
        gaussian, px, py = gaussian[keep], px[keep], py[keep]
        pix = (ids[gaussian] // n) * (height * width) + py * width + px
        # contributions in (image, pixel) order; the stable sort keeps the depth order within a pixel
        pix, perm = torch.sort(pix, stable=True)
        source = ids[gaussian[perm]]  # the contributing Gaussian in [I * N]
        cx = px[perm].to(table.dtype) + 0.5
        cy = py[perm].to(table.dtype) + 0.5
    mx, my, ca, cb, cc, op, *cols = table[source].unbind(-1)
    a = _alpha_xy(cx - mx, cy - my, ca, cb, cc, op)
    c = torch.stack(cols, dim=-1)
    weights = _composite_weights(pix, a)
    out = out.index_add(0, pix, weights[:, None] * c)
    acc = acc.index_add(0, pix, weights)
    return _finish(out, acc, background, i_count, channels, height, width)


def _composite_weights(pixel: Tensor, alpha: Tensor) -> Tensor:
    """Front-to-back weights ``αᵢ Tᵢ`` of contributions sorted by pixel (runs) and depth within each run, with
    gsplat's stop: a contribution that would bring the transmittance to :data:`T_MIN` or below, and every one
    after it in the same pixel, gets weight 0."""
    log_t = torch.log1p(-alpha).double()
    inclusive = torch.cumsum(log_t, 0)
    exclusive = inclusive - log_t
    start = torch.ones_like(pixel, dtype=torch.bool)
    start[1:] = pixel[1:] != pixel[:-1]
    run = torch.cumsum(start.long(), 0) - 1
    offset = exclusive[start][run]  # the running sum where this pixel's run begins
    t_before = torch.exp(exclusive - offset).to(alpha.dtype)
    with torch.no_grad():
        live = (inclusive - offset) > math.log(T_MIN)
    return torch.where(live, alpha * t_before, torch.zeros_like(alpha))


def _finish(
    out: Tensor, acc: Tensor, background: Tensor | None, i_count: int, channels: int, height: int, width: int
) -> tuple[Tensor, Tensor]:
    image = out.reshape(i_count, height, width, channels)
    alpha = acc.reshape(i_count, height, width, 1)
    if background is not None:
        bg = background.reshape(-1, 1, 1, channels) if background.ndim == 2 else background.reshape(1, 1, 1, channels)
        image = image + (1.0 - alpha) * bg
    return image.permute(0, 3, 1, 2), alpha.permute(0, 3, 1, 2)


def rasterize_reference(
    projected: Projected,
    opacities: Tensor,
    colors: Tensor,
    height: int,
    width: int,
    background: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`rasterize` by definition, for tests: every Gaussian at every pixel, composited in a loop over the
    Gaussians in depth order (memory ``I × H × W × N``: tiny scenes only)."""
    i_count, n, channels = colors.shape
    pix = torch.stack(
        torch.meshgrid(
            torch.arange(width, dtype=colors.dtype) + 0.5, torch.arange(height, dtype=colors.dtype) + 0.5, indexing="xy"
        ),
        dim=-1,
    ).reshape(-1, 2)  # [H*W, 2] as (u, v)
    image = colors.new_zeros(i_count, height * width, channels)
    trans = colors.new_ones(i_count, height * width)
    done = torch.zeros(i_count, height * width, dtype=torch.bool)
    order = torch.argsort(projected.depths.detach(), dim=1)
    for k in range(n):
        g = order[:, k]
        idx = torch.arange(i_count)
        mean = projected.means2d[idx, g]  # [I, 2]
        alpha = _alpha(pix[None] - mean[:, None], projected.conics[idx, g][:, None], opacities[idx, g][:, None])
        alpha = torch.where((projected.radii[idx, g] > 0)[:, None], alpha, torch.zeros_like(alpha))
        next_t = trans * (1.0 - alpha)
        stop = (alpha > 0) & (next_t <= T_MIN)
        done = done | stop
        use = (~done) & (alpha > 0)
        image = image + torch.where(use[..., None], (alpha * trans)[..., None] * colors[idx, g][:, None], 0.0)
        trans = torch.where(use, next_t, trans)
    alpha_img = 1.0 - trans
    if background is not None:
        bg = background if background.ndim == 2 else background[None].expand(i_count, -1)
        image = image + trans[..., None] * bg[:, None]
    return (
        image.reshape(i_count, height, width, channels).permute(0, 3, 1, 2),
        alpha_img.reshape(i_count, 1, height, width),
    )
