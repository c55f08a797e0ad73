"""``MultiViewShards``: multi-view scenes (images, cameras, optional depth and masks) from WebDataset shards."""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from selfsup3d.datamodules.base import (
    Collate,
    ShardDataModule,
    ShardSummary,
    ViewFields,
    crop_box,
    crop_intrinsics,
    read_view,
    require_depth_scale,
)
from selfsup3d.datamodules.format import SampleError, check_views, decode_rgb, parse_cameras, parse_meta, sample_where
from selfsup3d.datamodules.spec import DataSpec
from selfsup3d.errors import ConfigError


def eval_view_order(num_available: int, num_views: int, num_context: int) -> list[int]:
    """Deterministic view choice for validation: ``num_views`` views evenly spread over the scene's
    ``num_available``, reordered so the first ``num_context`` (evenly spaced among them) are the context."""
    chosen = [(j * num_available) // num_views for j in range(num_views)]
    context_pos = [(k * num_views) // num_context for k in range(num_context)]
    targets = [p for p in range(num_views) if p not in context_pos]
    return [chosen[p] for p in context_pos + targets]


class MultiViewDecoder:
    """Raw scene -> numpy ``images`` uint8 ``[V, 3, H, W]``, ``K``, ``c2w``, optional ``depth``/``mask``, label, key.

    Args:
        num_views: views per sample.
        num_context: context views (validation order, see :func:`eval_view_order`).
        out_hw: delivered ``(height, width)``.
        with_depth: decode ``NNN.depth.png`` (metres; a scene without depth is a bad sample).
        with_masks: decode ``NNN.mask.png``.
        max_zoom: training crops zoom in by a random factor in ``[1, max_zoom]`` at a random position.
    """

    def __init__(
        self,
        num_views: int,
        num_context: int,
        out_hw: tuple[int, int],
        with_depth: bool,
        with_masks: bool,
        max_zoom: float = 1.0,
    ) -> None:
        self.num_views, self.num_context, self.out_hw = num_views, num_context, out_hw
        self.with_depth, self.with_masks, self.max_zoom = with_depth, with_masks, max_zoom

    def count(self, raw: dict[str, Any]) -> int:
        return 1

    def __call__(self, raw: dict[str, Any], rng: random.Random | None) -> list[dict[str, Any]]:
        url, key = sample_where(raw)
        cameras = parse_cameras(raw)
        check_views(raw, cameras)
        n = cameras.num_views
        if n < self.num_views:
            raise SampleError(url, key, None, f"too few views: the scene has {n}, data.num_views is {self.num_views}")
        depth_scale = require_depth_scale(raw, cameras.depth_scale) if self.with_depth else None
        meta = parse_meta(raw)
        if rng is None:
            order = eval_view_order(n, self.num_views, self.num_context)
        else:
            order = rng.sample(range(n), self.num_views)
        size = (cameras.width, cameras.height)
        views, Ks = [], []
        for view in order:
            zoom = 1.0 if rng is None else rng.uniform(1.0, self.max_zoom)
            box = crop_box(size, self.out_hw, zoom, rng)
            fields = ViewFields.of(raw, view)
            image = decode_rgb(raw, fields.image, size)
            views.append(read_view(raw, fields, image, box, self.out_hw, depth_scale, self.with_masks))
            Ks.append(crop_intrinsics(cameras.K[view], box, self.out_hw))
        sample = {name: np.stack([v[name] for v in views]) for name in views[0]}
        sample["images"] = sample.pop("image")
        sample.update(
            K=np.stack(Ks).astype(np.float32),
            c2w=cameras.c2w[order].astype(np.float32),
            label=int(meta["label"]),
            key=key,
        )
        return [sample]


class MultiViewShards(ShardDataModule):
    """Multi-view scenes from WebDataset shards in the selfsup3d format (``docs/shard-format.md``).

    A batch is a dict (tensors on the training device; images travel as uint8 and become float in
    ``on_after_batch_transfer``):

    - ``images``: float32 ``[B, V, 3, H, W]`` in ``[0, 1]``.
    - ``K``: float32 ``[B, V, 3, 3]`` pixel intrinsics of the delivered (cropped/resized) images; the image's
      top-left corner is ``(0, 0)``, the centre of pixel ``(row i, column j)`` is ``(j + 0.5, i + 0.5)``.
    - ``c2w``: float32 ``[B, V, 4, 4]`` camera-to-world, OpenCV axes (x right, y down, z forward), in the
      shard's world units.
    - ``depth``: float32 ``[B, V, 1, H, W]`` metric z-depth, 0 = unknown (with ``with_depth``; by default when
      the shards have depth).
    - ``mask``: float32 ``[B, V, 1, H, W]`` in ``{0, 1}`` (with ``with_masks``).
    - ``num_context``: int; views ``[:num_context]`` are the context set, the rest the targets.
    - ``label``: int64 ``[B]``, -1 when unknown.
    - ``key``: list of ``B`` scene keys.

    In training the ``V`` views are a random subset of the scene's views in random order (so the context
    set is random); in validation they are evenly spread over the scene's views, the context evenly spaced
    among them (:func:`eval_view_order`). Training streams resampled shards and every rank gets
    ``batches_per_epoch`` batches per epoch; validation is one deterministic pass with equal batch counts
    on all ranks (or ``val_batches`` batches). Bad samples are skipped with a warning naming shard and key
    and counted in :attr:`skipped` (``strict=True`` raises instead); see ``SkippedSamplesLogger``.

    Args:
        train_urls: training shards (see :class:`~selfsup3d.datamodules.base.ShardDataModule` for the forms).
        val_urls: validation shards; ``null`` for no validation.
        num_views: views per scene in a sample (scenes with fewer are skipped as bad).
        num_context_views: context views; default ``num_views // 2``; needs ``1 <= it < num_views``.
        max_zoom: training crops zoom in by a random factor in ``[1, max_zoom]`` at a random position
            (1 = no zoom; validation always uses 1 and centre crops).
        **kwargs: the loader, size, depth/mask, jitter and epoch arguments of
            :class:`~selfsup3d.datamodules.base.ShardDataModule` (``batch_size`` is scenes per batch here).
    """

    def __init__(
        self,
        train_urls: str | list[str],
        val_urls: str | list[str] | None = None,
        num_views: int = 4,
        num_context_views: int | None = None,
        max_zoom: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(train_urls, val_urls, **kwargs)
        if num_views < 2:
            raise ConfigError(f"{self.key('num_views')} must be >= 2 (context and target views), got {num_views}")
        num_context = num_views // 2 if num_context_views is None else num_context_views
        if not 1 <= num_context < num_views:
            raise ConfigError(
                f"{self.key('num_context_views')} must satisfy 1 <= {self.key('num_context_views')} < "
                f"{self.key('num_views')}, got num_context_views={num_context_views}, num_views={num_views}"
            )
        if max_zoom < 1:
            raise ConfigError(f"{self.key('max_zoom')} must be >= 1, got {max_zoom}")
        self.num_views = num_views
        self.num_context_views = num_context
        self.max_zoom = max_zoom

    def _check_summary(self, summary: ShardSummary, split: str) -> None:
        urls = self.key(f"{split}_urls")
        if not summary.multiview:
            raise ConfigError(
                f"{urls} holds single-view samples ({summary.where}): MultiViewShards reads multi-view scenes; "
                "use selfsup3d.datamodules.SingleViewShards for images"
            )
        if summary.num_views < self.num_views:
            raise ConfigError(
                f"{self.key('num_views')}={self.num_views} but the scenes of {urls} have {summary.num_views} views "
                f"({summary.where}): ask for at most {summary.num_views}"
            )
        if self.with_depth and not summary.has_depth:
            raise ConfigError(
                f"{self.key('with_depth')}=true but the scenes of {urls} have no depth ({summary.where}): set it to "
                "false or null"
            )

    def data_spec(self) -> DataSpec:
        return DataSpec(
            kind="multi_view",
            image_hw=self.image_hw,
            num_views=self.num_views,
            num_context_views=self.num_context_views,
            num_classes=self.num_classes,
            with_depth=bool(self.with_depth),
            with_masks=bool(self.with_masks),
            has_cameras=True,
            key_prefix=self.key_prefix,
        )

    def _decoder(self, train: bool) -> MultiViewDecoder:
        return MultiViewDecoder(
            self.num_views,
            self.num_context_views,
            self.image_hw,
            bool(self.with_depth),
            bool(self.with_masks),
            self.max_zoom if train else 1.0,
        )

    def _collate_fn(self) -> Collate:
        return Collate(("images", "K", "c2w", "depth", "mask"), {"num_context": self.num_context_views})
