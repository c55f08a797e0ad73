"""Heads of the 3D-Prior objective (:class:`~selfsup3d.objectives.triplane.TriplaneReconstruction`).

* :class:`TriplaneDecoder`: learnable ``3 × g × g`` triplane queries cross-attend to the encoder's
  representation, then upsampling blocks (bilinear ×2 + convolution) reach ``R × R`` planes of ``C``
  channels.
* :class:`TriplaneField`: features read from the three planes (bilinear), summed, then a 2-layer MLP
  gives density and colour.
* :class:`FixedCameraRenderer`: the rays of one fixed, viewer-centred pinhole camera through the triplane
  box, rendered by the shared :class:`~selfsup3d.geometry.render.RayRenderer`.
* :class:`ConvDecoder`: the "no triplane" ablation, colour and depth straight from the patch tokens.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from selfsup3d.errors import ConfigError, require
from selfsup3d.geometry.cameras import camera_directions, intrinsics_from_fov
from selfsup3d.geometry.render import RayRenderer, RenderedRays
from selfsup3d.geometry.triplane import Aggregate, inside_box, sample_texels_sparse, sample_triplane, triplane_texels
from selfsup3d.layers.attention import QueryBlock
from selfsup3d.layers.conv import UpBlock
from selfsup3d.layers.positions import sincos_grid

Sampler = Literal["auto", "grid_sample", "sparse"]

_MLP_BLOCK = 1 << 14
"""Points per block whose MLP activations are recomputed together in the backward pass."""


def _num_doublings(start: int, end: int, what: str) -> int:
    ratio = end / start
    n = round(math.log2(ratio)) if ratio >= 1 else -1
    if n < 0 or start * 2**n != end:
        raise ConfigError(f"{what}: {end} must be {start} times a power of two")
    return n


class TriplaneDecoder(nn.Module):
    """Representation tokens to triplanes.

    Args:
        in_dim: width of the representation tokens (``L·D`` for the last ``L`` layers of a ``D``-wide ViT).
        dim: width of the triplane queries.
        depth: query blocks.
        num_heads: attention heads.
        grid: the queries form ``3 × grid × grid`` tokens (16 in the paper).
        plane_size: output resolution ``R`` of each plane (128 in the paper); ``grid`` times a power of two.
        channels: output channels ``C`` of each plane.
        mlp_ratio: MLP width of the query blocks as a multiple of ``dim``.
        self_attention: self-attention among the queries in each block.
        positional: a spatial prior for the cross-attention: fixed 2D sin-cos codes of the query's ``(u, v)``
            on its plane and of each patch token's position (both grids normalised to the same extent) are
            added to queries and keys after their projections (see :class:`CrossAttention`), so a plane
            texel attends to the patches it sees from the first step; the class token gets none.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int = 512,
        depth: int = 2,
        num_heads: int = 8,
        grid: int = 16,
        plane_size: int = 128,
        channels: int = 32,
        mlp_ratio: float = 4.0,
        self_attention: bool = True,
        positional: bool = True,
    ) -> None:
        super().__init__()
        self.grid, self.plane_size, self.channels, self.dim = grid, plane_size, channels, dim
        self.num_heads, self.positional = num_heads, positional
        if positional and (dim // num_heads) % 4:
            raise ConfigError("model.decoder_dim / decoder_heads must be a multiple of 4 for positional codes")
        n_up = _num_doublings(grid, plane_size, "model.triplane_size vs model.triplane_grid")
        self.in_proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, dim))
        self.queries = nn.Parameter(torch.zeros(1, 3 * grid * grid, dim))
        trunc_normal_(self.queries, std=0.02)
        self.blocks = nn.ModuleList(QueryBlock(dim, dim, num_heads, mlp_ratio, self_attention) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        widths = [dim]
        for _ in range(n_up):
            widths.append(max(widths[-1] // 2, channels))
        self.up = nn.Sequential(*(UpBlock(a, b) for a, b in zip(widths[:-1], widths[1:])))
        self.out = nn.Conv2d(widths[-1], channels, 3, padding=1)

    def no_weight_decay(self) -> set[str]:
        return {"queries"}

    def _sincos(self, side: int, device: torch.device) -> Tensor:
        """``[side², head_dim]`` 2D sin-cos codes of a ``side × side`` grid (row-major), positions scaled to
        the extent of the query grid so that grids of different sizes line up."""
        coords = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) * self.grid / side - 0.5
        return sincos_grid(coords, self.dim // self.num_heads)

    def forward(self, tokens: Tensor) -> Tensor:
        """``[B, T, in_dim]`` tokens to ``[B, 3, C, R, R]`` triplanes."""
        b, n = tokens.shape[:2]
        context = self.in_proj(tokens)
        x = self.queries.expand(b, -1, -1)
        q_pos = k_pos = None
        side = int(round((n - 1) ** 0.5))
        if self.positional and side * side == n - 1:  # class token first, then a square patch grid
            q_pos = self._sincos(self.grid, x.device).repeat(3, 1)
            k_pos = torch.cat([torch.zeros_like(q_pos[:1]), self._sincos(side, x.device)], dim=0)
        for block in self.blocks:
            x = block(x, context, q_pos, k_pos)
        x = self.norm(x)
        g = self.grid
        x = x.view(b * 3, g, g, -1).permute(0, 3, 1, 2)
        planes = self.out(self.up(x))
        return planes.view(b, 3, self.channels, self.plane_size, self.plane_size)


class TriplaneField(nn.Module):
    """Radiance field of a triplane: plane features summed at each point, a 2-layer MLP, density and colour.

    Args:
        channels: channels of the triplanes.
        hidden: hidden width of the MLP.
        box_size: edge of the cube the planes cover.
        aggregate: how the three planes' features combine (``sum``, ``mean``, ``concat``).
        sampler: ``grid_sample``, ``sparse`` (:func:`~selfsup3d.geometry.triplane.sample_texels_sparse`,
            fastest on the CPU; sum/mean only) or ``auto`` (sparse on the CPU, grid_sample elsewhere).
        density_shift: added to the raw density before the softplus; negative values start the field
            mostly empty.
        recompute_mlp: keep only the sampled features for the backward pass and recompute the MLP's hidden
            activations there (activation checkpointing of the cheap part; saves most of the memory).
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 64,
        box_size: float = 2.0,
        aggregate: Aggregate = "sum",
        sampler: Sampler = "auto",
        density_shift: float = -1.0,
        recompute_mlp: bool = True,
    ) -> None:
        super().__init__()
        if sampler == "sparse" and aggregate == "concat":
            raise ConfigError("model.sampler 'sparse' sums the planes: use plane_aggregate 'sum' or 'mean'")
        self.box_size, self.aggregate, self.sampler, self.density_shift = box_size, aggregate, sampler, density_shift
        self.recompute_mlp = recompute_mlp
        in_dim = channels * (3 if aggregate == "concat" else 1)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.Softplus(), nn.Linear(hidden, 4))

    def uses_sparse(self, device: torch.device) -> bool:
        """Whether triplanes on ``device`` are read by the sparse sampler."""
        if self.sampler == "sparse":
            return True
        return self.sampler == "auto" and device.type == "cpu" and self.aggregate != "concat"

    def prepare(self, planes: Tensor) -> Tensor:
        """Planes ``[B, 3, C, R, R]`` in the layout :meth:`query` reads (channels-last for the sparse sampler);
        convert once per image batch, query many times."""
        return triplane_texels(planes.float()) if self.uses_sparse(planes.device) else planes

    def _decode(self, features: Tensor, inside: Tensor) -> tuple[Tensor, Tensor]:
        raw = self.mlp(features.to(self.mlp[0].weight.dtype)).float()
        density = F.softplus(raw[..., 0] + self.density_shift) * inside
        return density, torch.sigmoid(raw[..., 1:])

    def query(self, prepared: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
        """Densities ``[B, ...]`` and colours ``[B, ..., 3]`` at points ``[B, ..., 3]`` in the box's frame, from
        planes converted by :meth:`prepare`."""
        b, lead = points.shape[0], points.shape[1:-1]
        flat = points.reshape(b, -1, 3)
        if self.uses_sparse(points.device):
            features = sample_texels_sparse(prepared, flat, self.box_size, self.aggregate)  # type: ignore[arg-type]
        else:
            features = sample_triplane(prepared, flat, self.box_size, self.aggregate)
        inside = inside_box(flat, self.box_size)
        if self.recompute_mlp and torch.is_grad_enabled():
            # blocks of points, each recomputed on its own in the backward pass: the hidden activations
            # exist for one block at a time
            features, inside = features.reshape(-1, features.shape[-1]), inside.reshape(-1)
            parts = [
                checkpoint(self._decode, f, i, use_reentrant=False)
                for f, i in zip(features.split(_MLP_BLOCK), inside.split(_MLP_BLOCK))
            ]
            density, rgb = (torch.cat(p) for p in zip(*parts))
        else:
            density, rgb = self._decode(features, inside)
        return density.view(b, *lead), rgb.view(b, *lead, 3)

    def forward(self, planes: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
        """Densities ``[B, ...]`` and colours ``[B, ..., 3]`` at points ``[B, ..., 3]`` in the box's frame."""
        return self.query(self.prepare(planes), points)


class FixedCameraRenderer(nn.Module):
    """The fixed, viewer-centred camera of the 3D-Prior objective and volume rendering through it.

    The camera sits at the origin looking down +z (OpenCV axes); the triplane box of edge ``box_size`` is
    centred on the optical axis at depth ``(near + far) / 2``. Rays have camera z = 1, so the rendered
    depth is z-depth in ``[near, far]``.

    Args:
        size: rendered image size ``H = W``.
        fov_deg: horizontal field of view in degrees.
        near: near plane (z-depth).
        far: far plane (z-depth).
        box_size: edge of the triplane box; ``null`` is ``far - near``.
        num_coarse: stratified samples per ray.
        num_fine: importance samples per ray.
        background: colour behind the far plane; ``null`` adds none (black).
        ray_chunk: rays per image rendered at a time (``null``: all at once).
        recompute_chunks: in training, recompute each chunk's activations in the backward pass instead of
            keeping them (activation checkpointing): memory no longer grows with the number of rays.
    """

    def __init__(
        self,
        size: int = 256,
        fov_deg: float = 30.0,
        near: float = 1.5,
        far: float = 3.5,
        box_size: float | None = None,
        num_coarse: int = 16,
        num_fine: int = 16,
        background: float | None = None,
        ray_chunk: int | None = 8192,
        recompute_chunks: bool = False,
    ) -> None:
        super().__init__()
        if not 0 < near < far:
            raise ConfigError(f"model.near and model.far must satisfy 0 < near < far, got {near}, {far}")
        require(0 < fov_deg < 180, "model.fov_deg", "in (0, 180)", fov_deg)
        require(num_coarse >= 1, "model.num_coarse", ">= 1", num_coarse)
        require(num_fine >= 0, "model.num_fine", ">= 0", num_fine)
        require(ray_chunk is None or ray_chunk >= 1, "model.ray_chunk", ">= 1 or null", ray_chunk)
        self.size, self.near, self.far = size, near, far
        self.box_size = box_size if box_size is not None else far - near
        self.rays = RayRenderer(near, far, num_coarse, num_fine, background, ray_chunk, recompute_chunks)
        K = intrinsics_from_fov(math.radians(fov_deg), size, size)
        self.register_buffer("K", K, persistent=False)
        self.register_buffer("directions", camera_directions(K, size, size).reshape(-1, 3), persistent=False)
        self.register_buffer("box_center", torch.tensor([0.0, 0.0, 0.5 * (near + far)]), persistent=False)

    def forward(
        self, field: TriplaneField, planes: Tensor, pixels: Tensor | None = None, perturb: bool = True
    ) -> RenderedRays:
        """Render ``pixels`` (``[B, R]`` flat indices into the ``size × size`` image; all pixels when
        ``None``) of each image's triplanes ``[B, 3, C, r, r]``."""
        b = planes.shape[0]
        directions = self.directions.to(planes.device)
        dirs = directions[pixels] if pixels is not None else directions.expand(b, -1, -1)
        origins = -self.box_center.to(planes.device).expand_as(dirs)  # the camera centre in the box's frame
        prepared = field.prepare(planes)

        def radiance(points: Tensor) -> tuple[Tensor, Tensor]:
            return field.query(prepared, points)

        return self.rays(radiance, origins, dirs, perturb)


class ConvDecoder(nn.Module):
    """The "no triplane" ablation: colour and depth predicted straight from the patch tokens by
    upsampling blocks (bilinear ×2 + convolution), no 3D representation and no rendering.

    Args:
        in_dim: width of the representation tokens.
        grid: side of the encoder's patch grid.
        dim: width after the input projection (halved by every upsampling block, at least 16).
        out_size: output image size.
        near: depth at sigmoid 0.
        far: depth at sigmoid 1.
    """

    def __init__(
        self, in_dim: int, grid: int, dim: int = 256, out_size: int = 256, near: float = 1.5, far: float = 3.5
    ) -> None:
        super().__init__()
        self.out_size, self.near, self.far, self.dim = out_size, near, far, dim
        self.in_proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, dim))
        widths, size = [dim], grid
        while size < out_size:
            widths.append(max(widths[-1] // 2, 16))
            size *= 2
        self.up = nn.Sequential(*(UpBlock(a, b) for a, b in zip(widths[:-1], widths[1:])))
        self.head = nn.Conv2d(widths[-1], 4, 3, padding=1)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Patch tokens ``[B, h·w, in_dim]`` to colour ``[B, 3, S, S]`` and depth ``[B, 1, S, S]``."""
        b = tokens.shape[0]
        x = self.up(self.in_proj(tokens).transpose(1, 2).reshape(b, self.dim, *grid))
        x = F.interpolate(x, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        out = self.head(x).float()
        return torch.sigmoid(out[:, :3]), self.near + (self.far - self.near) * torch.sigmoid(out[:, 3:])
