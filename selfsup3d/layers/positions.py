"""Fixed 2D sin-cos positional codes of patch grids (row-major, as the encoder's tokens)."""

from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed
from torch import Tensor


def sincos_positions(grid: tuple[int, int], dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[h * w, dim]`` 2D sin-cos positions of a patch grid, row-major (as the encoder's tokens)."""
    return build_sincos2d_pos_embed(list(grid), dim, device=device, dtype=torch.float32).to(dtype)


def sincos_grid(coords: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """2D sin-cos codes ``[n², dim]`` of the grid ``coords × coords`` (row-major): sines and cosines of the
    column coordinate at ``dim / 4`` frequencies, then of the row coordinate."""
    omega = 1.0 / temperature ** (torch.arange(dim // 4, device=coords.device, dtype=torch.float32) / (dim // 4))
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    out = []
    for c in (cols.flatten(), rows.flatten()):
        angles = c[:, None] * omega[None]
        out += [angles.sin(), angles.cos()]
    return torch.cat(out, dim=1)
