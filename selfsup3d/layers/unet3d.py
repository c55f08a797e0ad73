"""A 3D convolutional U-Net over dense voxel grids (the 3D backbone of the feature-consensus objective).

``[B, in_channels, D, H, W] -> [B, out_channels, D, H, W]``: a stem, ``levels`` down-sampling stages
(stride-2 convolutions, width doubling up to ``max_width``), a bottleneck, and as many up-sampling stages
(transposed stride-2 convolutions) each joined with the encoder's features at that resolution by
concatenation, then a 1x1x1 projection. Every convolution is followed by GroupNorm and SiLU. Any grid whose
sides are divisible by ``2 ** levels`` works.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup3d.errors import require


def _groups(channels: int, groups: int) -> int:
    """The largest group count ``<= groups`` that divides ``channels``."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


class ConvNormAct3d(nn.Sequential):
    """``Conv3d`` (no bias) -> ``GroupNorm`` -> ``SiLU``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: cubic kernel size.
        stride: stride (2 halves the grid).
        groups: GroupNorm groups (reduced to a divisor of ``out_channels``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 8):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            nn.GroupNorm(_groups(out_channels, groups), out_channels),
            nn.SiLU(),
        )


class ResBlock3d(nn.Module):
    """Two 3x3x3 ``ConvNormAct3d`` with a residual connection (a 1x1x1 projection when widths differ).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        groups: GroupNorm groups.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int = 8):
        super().__init__()
        self.conv1 = ConvNormAct3d(in_channels, out_channels, groups=groups)
        self.conv2 = ConvNormAct3d(out_channels, out_channels, groups=groups)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.conv2(self.conv1(x))


class UNet3D(nn.Module):
    """A 3D U-Net with GroupNorm + SiLU and concatenated skip connections.

    Widths: ``width * 2 ** l`` at level ``l`` (level 0 = full resolution), capped at ``max_width``. The
    full-resolution stages are kept light (one convolution each side) since they dominate the cost; the
    coarser stages get a residual block.

    Args:
        in_channels: input channels (e.g. colour + occupancy).
        out_channels: output channels (e.g. features + density).
        width: channels at full resolution.
        levels: down-sampling stages; the grid's sides must be divisible by ``2 ** levels``.
        max_width: cap on the width of the coarser levels (``None``: no cap).
        groups: GroupNorm groups.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        width: int = 16,
        levels: int = 3,
        max_width: int | None = None,
        groups: int = 8,
    ) -> None:
        super().__init__()
        for name, value in {"in_channels": in_channels, "out_channels": out_channels, "width": width}.items():
            require(value >= 1, f"UNet3D {name}", ">= 1", value, ValueError)
        require(levels >= 0, "UNet3D levels", ">= 0", levels, ValueError)
        self.levels = levels
        widths = [min(width * 2**level, max_width or width * 2**level) for level in range(levels + 1)]
        self.widths = widths
        self.stem = ConvNormAct3d(in_channels, widths[0], groups=groups)
        self.down = nn.ModuleList()
        self.enc = nn.ModuleList()
        for level in range(1, levels + 1):
            self.down.append(ConvNormAct3d(widths[level - 1], widths[level], stride=2, groups=groups))
            self.enc.append(ResBlock3d(widths[level], widths[level], groups=groups))
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for level in range(levels, 0, -1):
            self.up.append(nn.ConvTranspose3d(widths[level], widths[level - 1], kernel_size=2, stride=2))
            fuse = (
                ConvNormAct3d(2 * widths[level - 1], widths[level - 1], groups=groups)
                if level == 1
                else ResBlock3d(2 * widths[level - 1], widths[level - 1], groups=groups)
            )
            self.dec.append(fuse)
        self.head = nn.Conv3d(widths[0], out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_channels, D, H, W] -> [B, out_channels, D, H, W]``."""
        if x.ndim != 5:
            raise ValueError(f"UNet3D expects [B, C, D, H, W], got shape {tuple(x.shape)}")
        step = 2**self.levels
        if any(s % step for s in x.shape[-3:]):
            raise ValueError(
                f"UNet3D with {self.levels} levels needs grid sides divisible by {step}, got {tuple(x.shape[-3:])}"
            )
        x = self.stem(x)
        skips = [x]
        for down, enc in zip(self.down, self.enc):
            x = enc(down(x))
            skips.append(x)
        skips.pop()  # the bottleneck itself
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)
