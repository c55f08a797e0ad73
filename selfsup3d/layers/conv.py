"""Convolutional up-sampling blocks (decoders from patch grids to planes or images)."""

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
