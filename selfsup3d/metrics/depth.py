"""Depth of unknown scale against the truth, as monocular-depth papers score it.

A prediction whose scale is unknown (monocular depth, or depth in a self-supervised model's own units) is
scaled by the ratio of medians before the errors: ``AbsRel = mean |d̂ - d| / d`` and
``δ<1.25 = mean[max(d̂/d, d/d̂) < 1.25]`` over the pixels with known depth (``d > 0``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def median_scale(pred: Tensor, target: Tensor) -> Tensor:
    """``pred`` scaled so its median matches ``target``'s (1-D tensors of one image's valid pixels)."""
    return pred * (target.median() / pred.median().clamp(min=1e-12))


def scaled_depth_errors(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Depth of scenes of unknown scale against the truth: each scene's prediction ``[B, ...]`` (all its views)
    scaled by ``median(target) / median(pred)`` over the scene's pixels with known depth (``target > 0``), then
    ``abs_rel`` and ``delta1`` pooled over those pixels; scenes without depth are left out (NaN if none has)."""
    pred, target = pred.double().flatten(1), target.double().flatten(1)
    abs_rel, delta, count = pred.new_zeros(()), pred.new_zeros(()), 0
    for p, t in zip(pred, target):
        valid = torch.isfinite(t) & (t > 0)
        if not valid.any():
            continue
        p, t = median_scale(p[valid].clamp(min=1e-12), t[valid]), t[valid]
        abs_rel = abs_rel + ((p - t).abs() / t).sum()
        delta = delta + (torch.maximum(p / t, t / p) < 1.25).sum()
        count += t.numel()
    n = count if count else float("nan")
    return {"abs_rel": (abs_rel / n).float(), "delta1": (delta / n).float()}
