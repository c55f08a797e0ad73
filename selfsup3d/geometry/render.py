"""One renderer of posed rays for any field: colour, density, features, scores.

Rays follow :mod:`selfsup3d.geometry.volume`'s convention: ``origin + t · direction`` with the direction's
**camera z = 1**, so ``t`` is z-depth and a rendered depth compares directly with the data's z-depth maps.
:func:`camera_rays` makes such rays for pinhole cameras (``K`` in pixels, OpenCV ``c2w``, pixel centres at
``+0.5``, see :mod:`selfsup3d.geometry.cameras`); :class:`RayRenderer` samples a field along them (stratified +
importance samples, :func:`~selfsup3d.geometry.volume.render_rays`), a chunk of rays at a time, optionally
recomputing each chunk's activations in the backward pass so memory does not grow with the number of rays.

The field is any callable ``points [B, R, S, 3] -> (density [B, R, S], values [B, R, S, C])``: a triplane MLP
(:class:`~selfsup3d.heads.triplane.TriplaneField`), a 3D feature grid, a test's analytic slab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from selfsup3d.errors import require
from selfsup3d.geometry.cameras import camera_directions
from selfsup3d.geometry.volume import Bound, Field, render_rays


def camera_rays(K: Tensor, c2w: Tensor, height: int, width: int, pixels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """World-space rays of cameras ``K [..., 3, 3]``, ``c2w [..., 4, 4]`` through pixel centres.

    Args:
        K: pixel intrinsics.
        c2w: camera-to-world (OpenCV axes).
        height: image height.
        width: image width.
        pixels: ``[..., R]`` flat pixel indices (row-major) to keep; every pixel when ``None``.

    Returns:
        origins and directions ``[..., R, 3]`` (``R = H·W`` without ``pixels``), directions with camera z = 1.
    """
    cam = camera_directions(K, height, width).flatten(-3, -2)  # [..., H·W, 3]
    if pixels is not None:
        cam = cam.gather(-2, pixels[..., None].expand(*pixels.shape, 3))
    directions = cam @ c2w[..., :3, :3].transpose(-1, -2)
    origins = c2w[..., None, :3, 3].expand_as(directions)
    return origins, directions


@dataclass
class RenderedRays:
    """Rendered rays (leading shape ``[B, R]``).

    Attributes:
        values: ``[B, R, C]`` composited values (colour, features).
        depth: ``[B, R]`` expected z-depth (missing opacity at ``far``).
        opacity: ``[B, R]`` accumulated opacity.
        mean_density: ``[B, R]`` mean density over the ray's samples (for a density regulariser).
    """

    values: Tensor
    depth: Tensor
    opacity: Tensor
    mean_density: Tensor


class RayRenderer(nn.Module):
    """Volume rendering of a field along rays, in chunks (see the module docstring).

    Args:
        near: start of the depth range (rays may also be given their own range in :meth:`forward`).
        far: end of the depth range.
        num_coarse: stratified samples per ray.
        num_fine: importance samples per ray, drawn from the coarse weights (0: none).
        background: values behind the far plane (a float, or one per channel); ``null`` adds none.
        chunk: rays per batch element rendered at a time (``null``: all at once).
        recompute: in training, recompute each chunk's activations in the backward pass (activation
            checkpointing): one more forward of the field, memory independent of the number of rays.
    """

    def __init__(
        self,
        near: float,
        far: float,
        num_coarse: int = 16,
        num_fine: int = 16,
        background: float | None = None,
        chunk: int | None = 8192,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= near < far:
            raise ValueError(f"need 0 <= near < far, got {near}, {far}")
        require(num_coarse >= 1, "num_coarse", ">= 1", num_coarse, ValueError)
        require(num_fine >= 0, "num_fine", ">= 0", num_fine, ValueError)
        require(chunk is None or chunk >= 1, "chunk", ">= 1 or None", chunk, ValueError)
        self.near, self.far = near, far
        self.num_coarse, self.num_fine = num_coarse, num_fine
        self.background, self.chunk, self.recompute = background, chunk, recompute

    def _render(
        self, field: Field, origins: Tensor, directions: Tensor, near: Bound, far: Bound, perturb: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out = render_rays(
            field, origins, directions, near, far, self.num_coarse, self.num_fine, perturb, self.background
        )
        assert out.density is not None
        return out.rgb, out.depth, out.opacity, out.density.mean(dim=-1)

    def forward(
        self,
        field: Field,
        origins: Tensor,
        directions: Tensor,
        perturb: bool = True,
        near: Tensor | None = None,
        far: Tensor | None = None,
    ) -> RenderedRays:
        """Render rays ``origins, directions [B, R, 3]`` through ``field``.

        Args:
            field: the field (see the module docstring).
            origins: ray origins.
            directions: ray directions with camera z = 1.
            perturb: random sample positions (training); deterministic ones otherwise.
            near: ``[B, R]`` per-ray start of the range (default: the renderer's ``near``).
            far: ``[B, R]`` per-ray end of the range (default: the renderer's ``far``).
        """
        n = origins.shape[1]
        step = self.chunk or n
        parts = []
        for start in range(0, n, step):
            sl = slice(start, start + step)
            lo = self.near if near is None else near[:, sl]
            hi = self.far if far is None else far[:, sl]
            args = (field, origins[:, sl], directions[:, sl], lo, hi, perturb)
            if self.recompute and self.chunk is not None and torch.is_grad_enabled():
                parts.append(checkpoint(self._render, *args, use_reentrant=False))
            else:
                parts.append(self._render(*args))
        values, depth, opacity, density = (torch.cat(p, dim=1) for p in zip(*parts))
        return RenderedRays(values=values, depth=depth, opacity=opacity, mean_density=density)
