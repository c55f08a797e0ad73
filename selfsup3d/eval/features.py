"""Frozen features for the 3D-awareness probes: any encoder, and the baselines, behind one interface.

A :class:`FeatureSource` turns a set of views (:class:`Views`: images, and for the oracle the true depth
and cameras) into :class:`Features`: a dense map ``[N, D, h, w]`` that covers the whole image (a ViT's
patch grid, or one feature per pixel) and one global vector per image ``[N, G]``.

Conventions (shared by every probe in :mod:`selfsup3d.eval`):

* images are ``[N, 3, H, W]`` in ``[0, 1]`` at the *common* resolution where probes compare encoders; an
  encoder is fed the images resized to its own input size, and its dense map is read at pixel positions
  of the common resolution by bilinear interpolation (:func:`sample_at`), so encoders of different patch
  sizes and training resolutions are compared at the same pixels;
* pixel ``(row i, column j)`` has its centre at ``(u, v) = (j + 0.5, i + 0.5)`` (as in
  :mod:`selfsup3d.geometry.cameras`); a dense map of any size ``h × w`` spans the same image extent, so
  the value at ``(u, v)`` is the map's bilinear interpolation at ``(u / W · w, v / H · h)`` (with
  ``align_corners=False``, the convention of ``F.interpolate``).

Sources:

* :class:`EncoderFeatures`: any module whose forward gives an
  :class:`~selfsup3d.encoders.EncoderOutput` and that has ``patch_size`` (a :class:`ViTEncoder`): dense =
  final patch tokens, global = class token ‖ mean patch token (DINOv2's linear-evaluation feature);
* :class:`ColourFeatures`: the no-learning baseline, each pixel's colours in a ``5 × 5`` window
  (centred on grey: colour − 0.5, so cosine similarity compares colours, not brightness alone);
* :class:`OracleFeatures`: the true 3D world position of each pixel (from depth and cameras) in a
  multi-frequency sine/cosine encoding, whose dot products depend only on the difference of positions, so
  its cosine nearest neighbour is the nearest 3D point (a sanity check: near-perfect correspondence);
* :class:`ConstantFeatures`: the same feature everywhere (a sanity check: chance).

The global vector of the per-pixel baselines is the mean and the standard deviation of their dense map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup3d.errors import require
from selfsup3d.geometry.cameras import unproject_depth


@dataclass
class Views:
    """A batch of views at the common resolution.

    Attributes:
        images: ``[N, 3, H, W]`` float in ``[0, 1]``.
        depth: ``[N, 1, H, W]`` metric z-depth, 0 = unknown (needed by the oracle and the probes' targets).
        K: ``[N, 3, 3]`` pixel intrinsics.
        c2w: ``[N, 4, 4]`` camera-to-world, OpenCV axes.
    """

    images: Tensor
    depth: Tensor | None = None
    K: Tensor | None = None
    c2w: Tensor | None = None

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    def to(self, device: torch.device | str) -> Views:
        return Views(*(None if t is None else t.to(device) for t in (self.images, self.depth, self.K, self.c2w)))

    def select(self, index: Tensor) -> Views:
        """The views at ``index`` (a ``[M]`` index tensor), in that order."""
        return Views(*(None if t is None else t[index] for t in (self.images, self.depth, self.K, self.c2w)))


@dataclass
class Features:
    """What a source gives for ``N`` views.

    Attributes:
        dense: ``[N, D, h, w]`` feature map spanning the whole image.
        vector: ``[N, G]`` one global feature per image.
    """

    dense: Tensor
    vector: Tensor


def sample_at(dense: Tensor, uv: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """Bilinear samples of dense maps at pixel positions of the common resolution.

    Args:
        dense: ``[N, D, h, w]`` maps spanning the image.
        uv: ``[N, P, 2]`` pixel coordinates ``(u, v)`` at resolution ``image_hw`` (centres at ``+0.5``).
        image_hw: ``(H, W)`` of the common resolution.

    Returns:
        ``[N, P, D]`` features (border values beyond the outermost map centres).
    """
    h, w = image_hw
    grid = torch.stack([uv[..., 0] / w * 2 - 1, uv[..., 1] / h * 2 - 1], dim=-1).to(dense.dtype)
    out = F.grid_sample(dense, grid[:, :, None, :], mode="bilinear", padding_mode="border", align_corners=False)
    return out[..., 0].transpose(1, 2)


def pixel_uv(index: Tensor, width: int) -> Tensor:
    """Pixel-centre coordinates ``[..., 2]`` of flat pixel indices (row-major, ``index = row * W + col``)."""
    col = (index % width).to(torch.float32)
    row = torch.div(index, width, rounding_mode="floor").to(torch.float32)
    return torch.stack([col + 0.5, row + 0.5], dim=-1)


def resample_grid(dense: Tensor, size: int) -> Tensor:
    """A dense map brought to a ``size × size`` grid: average pooling when it is finer, bilinear
    interpolation when it is coarser (both span the same image extent)."""
    h, w = dense.shape[-2:]
    if (h, w) == (size, size):
        return dense
    if h >= size and w >= size:
        return F.adaptive_avg_pool2d(dense, size)
    return F.interpolate(dense, size=(size, size), mode="bilinear", align_corners=False)


def _moments(dense: Tensor) -> Tensor:
    flat = dense.flatten(2)
    return torch.cat([flat.mean(-1), flat.std(-1, unbiased=False)], dim=-1)


class FeatureSource:
    """Base of the sources: ``source(views) -> Features``; frozen, no gradients.

    Attributes:
        kind: what it is (``encoder``, ``colour``, ``oracle``, ``constant``), for the report.
    """

    kind = "source"

    def __call__(self, views: Views) -> Features:
        raise NotImplementedError

    def to(self, device: torch.device | str) -> FeatureSource:
        return self

    def describe(self) -> dict[str, Any]:
        """What the report says about the source (kind, sizes)."""
        return {"kind": self.kind}


class EncoderFeatures(FeatureSource):
    """Frozen features of an encoder: any module whose forward maps ``[B, 3, h, w]`` images in ``[0, 1]``
    to an :class:`~selfsup3d.encoders.EncoderOutput` and which has ``patch_size`` and ``embed_dim``.

    Args:
        encoder: the module (put in eval mode; never trained here).
        input_hw: the size it is fed (its training size by default: ``encoder.config["img_size"]``, else the
            images' size); rounded to a multiple of the patch size.
        batch_size: images per forward pass.
    """

    kind = "encoder"

    def __init__(self, encoder: nn.Module, input_hw: tuple[int, int] | None = None, batch_size: int = 64) -> None:
        self.encoder = encoder.eval().requires_grad_(False)
        self.patch_size = int(encoder.patch_size)
        if input_hw is None:
            config = getattr(encoder, "config", None) or {}
            size = config.get("img_size") if isinstance(config, dict) else None
            input_hw = (int(size), int(size)) if isinstance(size, int) else None
        self.input_hw = None if input_hw is None else self._round(input_hw)
        self.batch_size = batch_size

    def _round(self, hw: tuple[int, int]) -> tuple[int, int]:
        p = self.patch_size
        return max(p, round(hw[0] / p) * p), max(p, round(hw[1] / p) * p)

    def to(self, device: torch.device | str) -> EncoderFeatures:
        self.encoder.to(device)
        return self

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "embed_dim": int(self.encoder.embed_dim),
            "patch_size": self.patch_size,
            "input_size": list(self.input_hw) if self.input_hw else None,
        }

    def __call__(self, views: Views) -> Features:
        hw = self.input_hw or self._round(views.hw)
        parts = [
            encoder_features(self.encoder, views.images[start : start + self.batch_size], hw)
            for start in range(0, views.images.shape[0], self.batch_size)
        ]
        return Features(torch.cat([p.dense for p in parts]), torch.cat([p.vector for p in parts]))


def encoder_patch_size(encoder: nn.Module) -> int:
    """``patch_size`` of an encoder, also through a wrapper with a ``module`` (e.g. a frozen teacher)."""
    size = getattr(encoder, "patch_size", None)
    if size is None and isinstance(getattr(encoder, "module", None), nn.Module):
        size = getattr(encoder.module, "patch_size", None)
    if size is None:
        raise ValueError(f"{type(encoder).__name__} has no patch_size")
    return int(size)


@torch.no_grad()
def encoder_features(encoder: nn.Module, images: Tensor, input_hw: tuple[int, int] | None = None) -> Features:
    """Features of images ``[N, 3, H, W]`` in ``[0, 1]`` from an encoder giving an ``EncoderOutput``, without
    gradients and without changing the encoder's mode: dense = final patch grid, vector = class token ‖ mean
    patch token. Images are resized (bilinear, antialiased) to ``input_hw``, by default to the nearest
    multiple of the patch size."""
    if input_hw is None:
        p = encoder_patch_size(encoder)
        input_hw = (max(p, round(images.shape[-2] / p) * p), max(p, round(images.shape[-1] / p) * p))
    x = images.float()
    if tuple(x.shape[-2:]) != tuple(input_hw):
        x = F.interpolate(x, size=input_hw, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    out = encoder(x)
    return Features(out.patch_grid.float(), torch.cat([out.cls.float(), out.patches.float().mean(dim=1)], dim=-1))


class ColourFeatures(FeatureSource):
    """No-learning baseline: each pixel's colours in a ``window × window`` neighbourhood (minus 0.5), at the
    images' resolution (edges replicated).

    Args:
        window: odd window size.
    """

    kind = "colour"

    def __init__(self, window: int = 5) -> None:
        require(window >= 1 and window % 2 == 1, "the colour window", "a positive odd number", window, ValueError)
        self.window = window

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "embed_dim": 3 * self.window**2, "window": self.window}

    @torch.no_grad()
    def __call__(self, views: Views) -> Features:
        x = views.images.float() - 0.5
        n, c, h, w = x.shape
        r = self.window // 2
        padded = F.pad(x, (r, r, r, r), mode="replicate")
        dense = F.unfold(padded, self.window).reshape(n, c * self.window**2, h, w)
        return Features(dense, _moments(dense))


class OracleFeatures(FeatureSource):
    """Sanity check: the true world position ``p`` of each pixel as ``[sin(ω_k p), cos(ω_k p)]`` per axis,
    ``ω_k = π 2^k / extent`` for ``k < num_frequencies``. The dot product of two encodings is
    ``Σ_axes Σ_k cos(ω_k Δ)``, a function of the offset ``Δ`` alone, largest at ``Δ = 0`` and (for offsets
    below ``extent``) decreasing with ``|Δ|`` near it: cosine nearest neighbours are nearest 3D points.
    Pixels without depth get zeros.

    Args:
        num_frequencies: frequencies per axis (8: periods from ``2·extent`` down to ``extent / 64``).
        extent: scene size in world units (positions differ by less than it); 4 suits the embedded renders.
    """

    kind = "oracle"

    def __init__(self, num_frequencies: int = 8, extent: float = 4.0) -> None:
        self.freqs = math.pi * (2.0 ** torch.arange(num_frequencies, dtype=torch.float64)) / extent

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "embed_dim": 6 * len(self.freqs)}

    @torch.no_grad()
    def __call__(self, views: Views) -> Features:
        if views.depth is None or views.K is None or views.c2w is None:
            raise ValueError("the oracle encoder needs the views' depth and cameras")
        points = unproject_depth(views.depth.double(), views.K.double(), views.c2w.double())  # [N, H, W, 3]
        angles = points[..., None] * self.freqs.to(points.device)  # [N, H, W, 3, L]
        enc = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # [N, H, W, 6L]
        enc = enc * (views.depth[:, 0, :, :, None] > 0)
        dense = enc.permute(0, 3, 1, 2).float().contiguous()
        return Features(dense, _moments(dense))


class ConstantFeatures(FeatureSource):
    """Sanity check: one constant feature for every pixel and image (no information at all)."""

    kind = "constant"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "embed_dim": 1}

    @torch.no_grad()
    def __call__(self, views: Views) -> Features:
        n = views.images.shape[0]
        ones = views.images.new_ones(n, 1, 1, 1).float()
        return Features(ones, ones.flatten(1))


def derangements(num_scenes: int, num_views: int, generator: torch.Generator) -> Tensor:
    """``[S, V]`` random permutations without a fixed point (every view moves), one per scene."""
    if num_views < 2:
        raise ValueError("shuffling views needs at least two views per scene")
    out = []
    for _ in range(num_scenes):
        while True:
            perm = torch.randperm(num_views, generator=generator)
            if not (perm == torch.arange(num_views)).any():
                break
        out.append(perm)
    return torch.stack(out)


def permute_views(views: Views, perms: Tensor) -> Views:
    """Views of scene-major batches (``V = perms.shape[1]`` per scene) permuted within each scene: slot ``i``
    of scene ``s`` gets view ``perms[s, i]``. Used to break the link between views and cameras."""
    v = perms.shape[1]
    base = torch.arange(perms.shape[0], device=perms.device)[:, None] * v
    return views.select((base + perms).flatten().to(views.images.device))
