"""Pixel-aligned 3D Gaussians of the context views (E-RayZer's explicit renderer, Zhao et al. 2026).

Every pixel of every context view becomes one 3D Gaussian on the pixel's ray through its (predicted) camera, at
a predicted depth, with a predicted opacity, size and colour; :func:`render_gaussians` splats them into any
cameras (:mod:`selfsup3d.geometry.splat` on the CPU, gsplat on CUDA when installed). Rendering a target then
depends on the depths and the cameras, and on nothing a network could use to paint the target some other way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

from selfsup3d.geometry.cameras import camera_directions, se3_inverse
from selfsup3d.geometry.rays import unpatchify
from selfsup3d.geometry.splat import covariance, project, rasterize
from selfsup3d.layers.transformer import init_linear

Backend = Literal["auto", "torch", "gsplat"]


@dataclass
class PixelGaussians:
    """Gaussians of ``V`` context views of ``H x W`` pixels, one per pixel, for a batch of ``B`` scenes.

    Attributes:
        means: ``[B, V*H*W, 3]`` centres (world frame of the cameras they were placed with).
        scales: ``[B, V*H*W, 1]`` isotropic standard deviations (world units).
        opacities: ``[B, V*H*W]`` in ``(0, 1)``.
        colours: ``[B, V*H*W, 3]`` in ``(0, 1)``.
        depth: ``[B, V, 1, H, W]`` z-depth of every pixel's Gaussian along its ray (for pictures and metrics).
        background: ``[B, 3]`` colour behind all Gaussians.
    """

    means: Tensor
    scales: Tensor
    opacities: Tensor
    colours: Tensor
    depth: Tensor
    background: Tensor

    def maps(self, views: int, height: int, width: int) -> dict[str, Tensor]:
        """Opacity and colour as ``[B, V, C, H, W]`` maps (pictures)."""
        b = self.means.shape[0]
        return {
            "opacity": self.opacities.reshape(b, views, 1, height, width),
            "colour": self.colours.reshape(b, views, height, width, 3).permute(0, 1, 4, 2, 3),
        }


def pixel_aligned(
    colour: Tensor, depth: Tensor, opacity: Tensor, size_px: Tensor | float, K: Tensor, c2w: Tensor, background: Tensor
) -> PixelGaussians:
    """One Gaussian per pixel of ``V`` views: on the pixel's ray through ``K [B, V, 3, 3]``, ``c2w [B, V, 4, 4]`` at
    the z-depth ``depth [B, V, H, W]``, with ``colour [B, V, 3, H, W]``, ``opacity [B, V, H, W]``, an isotropic
    size of ``size_px`` pixels at its depth (a tensor like ``depth`` or a number) and one ``background [B, 3]``."""
    b, v, h, w = depth.shape
    K, c2w = K.float(), c2w.float()
    cam = camera_directions(K, h, w) * depth[..., None]  # [B, V, H, W, 3]
    means = (c2w[:, :, None, None, :3, :3] @ cam[..., None]).squeeze(-1) + c2w[:, :, None, None, :3, 3]
    scales = depth * size_px / K[:, :, 0, 0, None, None]
    return PixelGaussians(
        means=means.reshape(b, -1, 3),
        scales=scales.reshape(b, -1, 1),
        opacities=opacity.reshape(b, -1),
        colours=colour.permute(0, 1, 3, 4, 2).reshape(b, -1, 3),
        depth=depth[:, :, None],
        background=background,
    )


class PixelGaussianHead(nn.Module):
    """Per-pixel Gaussian parameters from per-patch tokens of the context views.

    A linear layer turns each token into ``p²`` pixels' raw parameters (disparity, opacity, size, colour), so a
    token decides the Gaussians of its patch. Every output starts near a plausible scene: the layer's weights
    start near zero, so all pixels begin at depth ``init_depth``, opacity ``sigmoid(opacity_bias)``, a size of
    ``size_px`` pixels and their own colour.

    * depth: inverse depth ``1/z = sigmoid(x + b) / near`` (``b`` makes ``z = init_depth`` at ``x = 0``), so a
      Gaussian can go anywhere from ``near`` to (nearly) infinitely far, as a background must;
    * size: an isotropic standard deviation of ``size_px · exp(size_range · tanh(x))`` pixels at its depth;
    * colour: ``sigmoid(logit(pixel) + x)``: the pixel's own colour, corrected;
    * background: an MLP on the mean of the tokens gives each scene one colour behind all Gaussians.

    Args:
        dim: token width.
        patch_size: pixels per token side.
        near: the closest depth.
        init_depth: depth at the start.
        opacity_bias: opacity logit at the start (E-RayZer: -2).
        size_px: Gaussian size at the start, in pixels (standard deviation).
        size_range: log-range of the size around ``size_px``.
    """

    OUTPUTS = 6  # disparity, opacity, size, colour (3)

    def __init__(
        self,
        dim: int,
        patch_size: int,
        near: float = 0.05,
        init_depth: float = 1.0,
        opacity_bias: float = 0.0,
        size_px: float = 0.5,
        size_range: float = 1.5,
        min_opacity: float = 0.0,
        far: float | None = None,
    ) -> None:
        super().__init__()
        if not 0 < near < init_depth:
            raise ValueError(f"need 0 < near < init_depth, got near={near}, init_depth={init_depth}")
        self.patch_size = patch_size
        self.near = near
        self.min_opacity = min_opacity
        self.min_disparity = 0.0 if far is None else 1.0 / far
        self.disparity_bias = math.log((near / init_depth) / (1.0 - near / init_depth))
        self.opacity_bias = opacity_bias
        self.size_px, self.size_range = size_px, size_range
        self.proj = nn.Linear(dim, self.OUTPUTS * patch_size * patch_size)
        nn.init.normal_(self.proj.weight, std=1e-3)
        nn.init.zeros_(self.proj.bias)
        self.background = Mlp(dim, dim, 3)
        self.background.apply(init_linear)

    def forward(self, tokens: Tensor, images: Tensor, K: Tensor, c2w: Tensor) -> PixelGaussians:
        """Gaussians of ``[B, V, N, dim]`` context tokens of the views ``images [B, V, 3, H, W]`` (in ``[0, 1]``)
        placed with the cameras ``K [B, V, 3, 3]``, ``c2w [B, V, 4, 4]``."""
        h, w = images.shape[-2:]
        raw = unpatchify(self.proj(tokens).float(), self.patch_size, h, w)  # [B, V, 6, H, W]
        disparity = torch.sigmoid(raw[:, :, 0] + self.disparity_bias) / self.near
        depth = 1.0 / disparity.clamp(min=max(self.min_disparity, 1e-4))  # [B, V, H, W]
        opacity = self.min_opacity + (1.0 - self.min_opacity) * torch.sigmoid(raw[:, :, 1] + self.opacity_bias)
        size_px = self.size_px * torch.exp(self.size_range * torch.tanh(raw[:, :, 2]))
        pixel = images.float().clamp(1e-3, 1 - 1e-3)
        colour = torch.sigmoid(torch.logit(pixel) + raw[:, :, 3:])  # [B, V, 3, H, W]
        background = torch.sigmoid(self.background(tokens.mean(dim=(1, 2))).float())
        return pixel_aligned(colour, depth, opacity, size_px, K, c2w, background)


def gsplat_available() -> bool:
    """Whether gsplat can render here (installed, and a CUDA device)."""
    if not torch.cuda.is_available():
        return False
    try:
        import gsplat  # noqa: F401
    except ImportError:
        return False
    return True


def render_gaussians(
    gaussians: PixelGaussians,
    K: Tensor,
    c2w: Tensor,
    height: int,
    width: int,
    backend: Backend = "auto",
    with_depth: bool = True,
    eps2d: float = 0.3,
) -> dict[str, Tensor]:
    """Splat each scene's Gaussians into its cameras ``K [B, T, 3, 3]``, ``c2w [B, T, 4, 4]``.

    Returns ``image [B, T, 3, H, W]``, ``alpha [B, T, 1, H, W]`` and (``with_depth``) ``depth [B, T, 1, H, W]``
    (the expected z-depth of the visible Gaussians, divided by ``alpha``).
    """
    if backend == "auto":
        backend = "gsplat" if gaussians.means.is_cuda and gsplat_available() else "torch"
    render = _render_gsplat if backend == "gsplat" else _render_torch
    # image [B, T, 3 (+1 accumulated z-depth), H, W] over the background, alpha [B, T, 1, H, W]
    image, alpha = render(gaussians, K, c2w, height, width, with_depth, eps2d)
    out = {"image": image[:, :, :3], "alpha": alpha}
    if with_depth:
        out["depth"] = image[:, :, 3:] / alpha.clamp(min=1e-6)
    return out


def per_target(x: Tensor, t: int) -> Tensor:
    """``[B, ...]`` -> ``[B * T, ...]``: each scene's tensor once per target camera (a view, no copy)."""
    return x[:, None].expand(x.shape[0], t, *x.shape[1:]).reshape(x.shape[0] * t, *x.shape[1:])


def _render_torch(
    g: PixelGaussians, K: Tensor, c2w: Tensor, height: int, width: int, with_depth: bool, eps2d: float
) -> tuple[Tensor, Tensor]:
    b, t = K.shape[:2]
    projected = project(
        per_target(g.means, t), covariance(per_target(g.scales, t)), K.reshape(b * t, 3, 3).float(),
        c2w.reshape(b * t, 4, 4).float(), height, width, eps2d=eps2d,
    )  # fmt: skip
    colours = per_target(g.colours, t)
    background = g.background
    if with_depth:  # z-depth differs per target camera: a fourth channel, 0 on the background
        colours = torch.cat([colours, projected.depths[..., None]], dim=-1)
        background = F.pad(background, (0, 1))
    image, alpha = rasterize(
        projected, per_target(g.opacities, t), colours, height, width, background.repeat_interleave(t, 0)
    )
    return image.unflatten(0, (b, t)), alpha.unflatten(0, (b, t))


def _render_gsplat(
    g: PixelGaussians, K: Tensor, c2w: Tensor, height: int, width: int, with_depth: bool, eps2d: float
) -> tuple[Tensor, Tensor]:
    """gsplat's CUDA rasteriser on the same Gaussians (isotropic: identity rotations), one scene at a time."""
    from gsplat import rasterization

    images, alphas = [], []
    quats = F.pad(g.means.new_ones(g.means.shape[1], 1), (0, 3))  # (w, x, y, z) = identity
    for i in range(g.means.shape[0]):
        image, alpha, _ = rasterization(
            g.means[i].float(),
            quats,
            g.scales[i].float().expand(-1, 3),
            g.opacities[i].float(),
            g.colours[i].float(),
            se3_inverse(c2w[i].float()),
            K[i].float(),
            width,
            height,
            packed=False,
            eps2d=eps2d,
            render_mode="RGB+D" if with_depth else "RGB",  # D: accumulated z-depth, as the torch path
            backgrounds=g.background[i].float().expand(K.shape[1], -1),  # gsplat adds depth's 0 itself
        )
        images.append(image.permute(0, 3, 1, 2))
        alphas.append(alpha.permute(0, 3, 1, 2))
    return torch.stack(images), torch.stack(alphas)
