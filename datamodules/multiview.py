"""``MultiViewShards``: multi-view scenes (images, cameras, optional depth and masks) from WebDataset shards."""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from selfsup3d.datamodules.base import (
    Collate,
    ShardDataModule,
    ShardSummary,
    crop_box,
    crop_intrinsics,
    read_depth,
    read_mask,
    require_depth_scale,
    resize_window,
)
from selfsup3d.datamodules.format import (
    DEPTH_SUFFIX,
    MASK_SUFFIX,
    SampleError,
    check_views,
    decode_rgb,
    image_field,
    parse_cameras,
    parse_meta,
    sample_where,
    view_field,
)
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
        depth_scale = require_depth_scale(raw, cameras.depth_scale) if self.with_depth else 0.0
        meta = parse_meta(raw)
        if rng is None:
            order = eval_view_order(n, self.num_views, self.num_context)
        else:
            order = rng.sample(range(n), self.num_views)
        size = (cameras.width, cameras.height)
        h, w = self.out_hw
        images = np.empty((self.num_views, 3, h, w), dtype=np.uint8)
        Ks = np.empty((self.num_views, 3, 3), dtype=np.float32)
        depth = np.zeros((self.num_views, 1, h, w), dtype=np.float32) if self.with_depth else None
        mask = np.zeros((self.num_views, 1, h, w), dtype=np.uint8) if self.with_masks else None
        for slot, view in enumerate(order):
            zoom = 1.0 if rng is None else rng.uniform(1.0, self.max_zoom)
            box = crop_box(size, self.out_hw, zoom, rng)
            image = resize_window(decode_rgb(raw, image_field(raw, view), size), box, self.out_hw)
            images[slot] = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
            Ks[slot] = crop_intrinsics(cameras.K[view], box, self.out_hw)
            if depth is not None:
                depth[slot, 0] = read_depth(raw, view_field(view, DEPTH_SUFFIX), size, box, self.out_hw, depth_scale)
            if mask is not None:
                mask[slot, 0] = read_mask(raw, view_field(view, MASK_SUFFIX), size, box, self.out_hw)
        sample = {
            "images": images,
            "K": Ks,
            "c2w": cameras.c2w[order].astype(np.float32),
            "label": int(meta["label"]),
            "key": key,
        }
        if depth is not None:
            sample["depth"] = depth
        if mask is not None:
            sample["mask"] = mask
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
        train_urls: training shards: brace patterns (``dir/train-{000000..000009}.tar``), local globs,
            ``pipe:`` commands or fsspec URLs; a list joins several.
        val_urls: validation shards, same forms; ``null`` for no validation.
        batch_size: scenes per batch (per device).
        num_workers: DataLoader workers per device.
        image_size: delivered size, an int (square) or ``[height, width]``; views are resized to cover it and
            cropped (centre in validation), intrinsics follow.
        num_views: views per scene in a sample (scenes with fewer are skipped as bad).
        num_context_views: context views; default ``num_views // 2``; needs ``1 <= it < num_views``.
        with_depth: deliver ``depth``: ``true`` (shards must have depth), ``false``, or ``null`` (deliver it when
            the shards have it, as their first sample shows).
        with_masks: deliver ``mask``: ``true`` (shards must have masks), ``false`` or ``null`` (when they have).
        max_zoom: training crops zoom in by a random factor in ``[1, max_zoom]`` at a random position
            (1 = no zoom; validation always uses 1 and centre crops).
        color_jitter: photometric jitter in training, the same for all views of a scene.
        jitter_strength: brightness, contrast and saturation jitter (hue gets a quarter of it).
        shuffle_buffer: samples in the shuffle buffer of each worker (0 = no shuffling).
        batches_per_epoch: training batches per epoch on every rank.
        val_batches: validation batches per rank; ``null`` = one full deterministic pass.
        strict: raise on the first bad sample instead of skipping it.
        seed: seed of shard resampling, view choice and crops (per rank and worker); ``null`` takes torch's
            initial seed (set by ``seed_everything``).
        pin_memory: pin host memory when CUDA is available.
    """

    def __init__(
        self,
        train_urls: str | list[str],
        val_urls: str | list[str] | None = None,
        batch_size: int = 8,
        num_workers: int = 4,
        image_size: int | tuple[int, int] = 64,
        num_views: int = 4,
        num_context_views: int | None = None,
        with_depth: bool | None = None,
        with_masks: bool | None = False,
        max_zoom: float = 1.0,
        color_jitter: bool = False,
        jitter_strength: float = 0.2,
        shuffle_buffer: int = 256,
        batches_per_epoch: int = 500,
        val_batches: int | None = None,
        strict: bool = False,
        seed: int | None = None,
        pin_memory: bool = True,
    ) -> None:
        super().__init__(
            train_urls=train_urls,
            val_urls=val_urls,
            batch_size=batch_size,
            num_workers=num_workers,
            image_size=image_size,
            with_depth=with_depth,
            with_masks=with_masks,
            color_jitter=color_jitter,
            jitter_strength=jitter_strength,
            shuffle_buffer=shuffle_buffer,
            batches_per_epoch=batches_per_epoch,
            val_batches=val_batches,
            strict=strict,
            seed=seed,
            pin_memory=pin_memory,
        )
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
