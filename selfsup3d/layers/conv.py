"""Blocks over dense maps: convolutional up-sampling (decoders from patch grids to planes or images) and a
residual per-cell MLP head."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


class UpBlock(nn.Module):
    """Bilinear ×2 upsampling, 3×3 convolution, GroupNorm, SiLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm = nn.GroupNorm(math.gcd(8, out_channels), out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return F.silu(self.norm(self.conv(x)))


class ResidualHead(nn.Module):
    """``x + MLP(LayerNorm(x))`` per cell of a ``[N, D, h, w]`` map; the MLP's output layer starts at zero, so
    the head starts as the identity (``F2D`` = the encoder's patch features)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        y = x.permute(0, 2, 3, 1)
        return x + self.mlp(self.norm(y)).permute(0, 3, 1, 2)
