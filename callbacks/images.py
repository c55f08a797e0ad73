"""Small helpers for pictures in TensorBoard: grids, depth colouring, feature PCA.

All take and return float tensors in ``[0, 1]`` with channels first, so callbacks can stack rows of
inputs, renders and depth maps into one image, each row named in a margin on the left."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter


def tensorboard(trainer: Trainer) -> SummaryWriter | None:
    """The trainer's TensorBoard writer, or ``None`` when no TensorBoard logger is attached."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def image_grid(rows: list[Tensor], pad: int = 2, value: float = 1.0, labels: Sequence[str] | None = None) -> Tensor:
    """Stack rows of images into one ``[3, H', W']`` picture.

    Args:
        rows: each ``[N, C, H, W]`` with ``C`` in ``{1, 3}`` (grey is repeated); rows may have different ``N``
            and sizes (images are resized to the first row's height).
        pad: pixels around every image.
        value: the background grey level (padding and label margin).
        labels: one name per row (``""`` for none), written in a margin on the left of the picture.
    """
    if not rows:
        raise ValueError("image_grid needs at least one row")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"image_grid got {len(labels)} labels for {len(rows)} rows")
    h = rows[0].shape[-2]
    out_rows = []
    width = 0
    for row in rows:
        row = row.detach().float().cpu().clamp(0, 1)
        if row.shape[1] == 1:
            row = row.expand(-1, 3, -1, -1)
        if row.shape[-2] != h:
            w = round(row.shape[-1] * h / row.shape[-2])
            row = F.interpolate(row, size=(h, w), mode="nearest")
        padded = F.pad(row, (pad, pad, pad, pad), value=value)
        out_rows.append(torch.cat(list(padded), dim=-1))
        width = max(width, out_rows[-1].shape[-1])
    out_rows = [F.pad(r, (0, width - r.shape[-1]), value=value) for r in out_rows]
    if labels is not None and any(labels):
        strips = label_strips(list(labels), h + 2 * pad, pad, value)
        out_rows = [torch.cat([strip, r], dim=-1) for strip, r in zip(strips, out_rows)]
    return torch.cat(out_rows, dim=-2)


def label_strips(labels: list[str], height: int, pad: int = 2, value: float = 1.0) -> list[Tensor]:
    """One ``[3, height, W]`` strip per label with the text drawn on the background ``value`` (black text on a
    light background, white on a dark one); all strips have the width of the longest text."""
    font = _font(int(min(16, max(9, height * 0.5))))
    ink = 0 if value > 0.5 else 255
    boxes = [font.getbbox(text) if text else (0, 0, 0, 0) for text in labels]
    width = max(box[2] for box in boxes) + 2 * pad + 2
    strips = []
    for text, (_, top, _, bottom) in zip(labels, boxes):
        canvas = Image.new("L", (width, height), round(value * 255))
        if text:
            ImageDraw.Draw(canvas).text((pad + 1, (height - bottom - top) / 2), text, fill=ink, font=font)
        strips.append(torch.from_numpy(np.array(canvas)).float().div(255).expand(3, -1, -1))
    return strips


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's own font (no font files needed); the bitmap one where Pillow was built without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def colorize(
    values: Tensor,
    vmin: float | Tensor | None = None,
    vmax: float | Tensor | None = None,
    cmap: str = "turbo",
    invalid: Tensor | None = None,
) -> Tensor:
    """Map ``[N, 1, H, W]`` scalars (depth, error) to ``[N, 3, H, W]`` colours; ``invalid`` pixels are black.

    ``vmin``/``vmax`` default to each image's 2nd/98th percentile of the valid pixels."""
    x = values.detach().float().cpu()
    mask = torch.ones_like(x, dtype=torch.bool) if invalid is None else ~invalid.detach().cpu().bool()
    flat = x.flatten(1)
    valid = mask.flatten(1)
    lo = torch.stack([v[m].quantile(0.02) if m.any() else v.new_tensor(0.0) for v, m in zip(flat, valid)])
    hi = torch.stack([v[m].quantile(0.98) if m.any() else v.new_tensor(1.0) for v, m in zip(flat, valid)])
    lo = torch.as_tensor(vmin).expand_as(lo) if vmin is not None else lo
    hi = torch.as_tensor(vmax).expand_as(hi) if vmax is not None else hi
    t = ((x - lo.view(-1, 1, 1, 1)) / (hi - lo).clamp(min=1e-8).view(-1, 1, 1, 1)).clamp(0, 1)
    lut = torch.tensor(colormaps[cmap](torch.linspace(0, 1, 256).numpy())[:, :3], dtype=torch.float32)
    rgb = lut[(t[:, 0] * 255).round().long()].permute(0, 3, 1, 2)
    return rgb * mask.float()


def feature_pca(features: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """First three principal components of dense features ``[N, D, h, w]`` as ``[N, 3, h, w]`` colours.

    One PCA basis is fitted over all ``N`` maps, so colours are comparable across images."""
    f = features.detach().float().cpu()
    n, d, h, w = f.shape
    x = f.permute(0, 2, 3, 1).reshape(-1, d)
    x = x - x.mean(0, keepdim=True)
    _, _, v = torch.pca_lowrank(x, q=min(3, d), center=False)
    proj = x @ v[:, :3]
    lo, hi = proj.quantile(0.01, dim=0), proj.quantile(0.99, dim=0)
    proj = ((proj - lo) / (hi - lo).clamp(min=1e-8)).clamp(0, 1)
    if proj.shape[1] < 3:
        proj = F.pad(proj, (0, 3 - proj.shape[1]))
    out = proj.reshape(n, h, w, 3).permute(0, 3, 1, 2)
    return F.interpolate(out, size=size, mode="nearest") if size else out
