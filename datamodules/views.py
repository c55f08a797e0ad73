"""One multi-view stream for every objective: a multi-view batch's views as a single-view batch.

A single-view objective (the triplane objective, a plug-in) can train on multi-view shards without a second
stream: :func:`views_as_images` turns ``images [B, V, 3, H, W]`` (with its ``depth``, ``mask``, ``label``,
``key``) into ``image [B·V', 3, H, W]`` and the rest, where ``V'`` is all views or ``max_views`` of each scene.
The objectives' base class applies it when an objective that reads single images is given a multi-view
source (:attr:`~selfsup3d.objectives.PretrainObjective.input_kind`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor


def views_as_images(batch: Mapping[str, Any], max_views: int | None = None) -> dict[str, Any]:
    """The views of a multi-view batch as single images.

    Args:
        batch: a multi-view batch (``images [B, V, 3, H, W]``, optional ``depth``/``mask`` ``[B, V, 1, H, W]``,
            ``label [B]``, ``key``).
        max_views: take the first ``max_views`` views of each scene (``None``: all). Training batches come in
            random view order, so the first views are a random subset; validation's order is fixed.

    Returns:
        A single-view batch: ``image [B·V', 3, H, W]``, ``depth``/``mask`` ``[B·V', 1, H, W]`` when present,
        ``label [B·V']``, ``key`` (``SCENE_v<slot>``).
    """
    images: Tensor = batch["images"]
    b, v = images.shape[:2]
    keep = v if max_views is None else max(1, min(v, max_views))
    out: dict[str, Any] = {"image": images[:, :keep].flatten(0, 1)}
    for name in ("depth", "mask"):
        if isinstance(batch.get(name), Tensor):
            out[name] = batch[name][:, :keep].flatten(0, 1)
    label = batch.get("label")
    if isinstance(label, Tensor):
        out["label"] = label.repeat_interleave(keep)
    keys = batch.get("key")
    if isinstance(keys, (list, tuple)):
        out["key"] = [f"{k}_v{slot:03d}" for k in keys for slot in range(keep)]
    return out


PER_VIEW = ("images", "K", "c2w", "depth", "mask")
"""The fields of a multi-view batch that have a view axis (axis 1)."""


def select_views(batch: Mapping[str, Any], views: slice) -> dict[str, Any]:
    """The views ``views`` of a multi-view batch: every per-view tensor sliced on its view axis."""
    return {k: (v[:, views] if k in PER_VIEW and isinstance(v, Tensor) else v) for k, v in batch.items()}


def batch_size(batch: Any) -> int:
    """Samples in a batch: scenes of a multi-view batch, images of a single-view one (1 when unknown)."""
    if isinstance(batch, Mapping):
        for name in ("images", "image"):
            if isinstance(batch.get(name), Tensor):
                return int(batch[name].shape[0])
        for value in batch.values():
            if isinstance(value, Tensor) and value.ndim > 0:
                return int(value.shape[0])
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return int(batch[0].shape[0])
    return 1
