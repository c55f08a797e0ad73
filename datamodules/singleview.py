"""``SingleViewShards``: images with depth, masks and class labels, from single-view shards or from the views
of multi-view shards (e.g. the embedded renders)."""

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
    random_resized_box,
    read_view,
    require_depth_scale,
)
from selfsup3d.datamodules.format import (
    decode_rgb,
    decode_upright_rgb,
    is_multiview,
    make_key,
    parse_meta,
    parse_scene,
    sample_where,
    single_depth_scale,
    view_indices,
)
from selfsup3d.datamodules.spec import DataSpec
from selfsup3d.errors import ConfigError, require


class SingleViewDecoder:
    """Raw sample -> one numpy sample per image: ``image`` uint8 ``[3, H, W]``, optional ``depth`` float32
    ``[1, H, W]`` and ``mask`` uint8 ``[1, H, W]``, ``label``, ``key``. A multi-view scene gives one sample per
    view (keys ``SCENE_v003``), or ``views_per_scene`` random views in training.

    Args:
        out_hw: delivered ``(height, width)``.
        with_depth: decode depth (a sample without it is bad).
        with_masks: decode masks (a sample without one is bad).
        random_crop: training crops are random-resized crops (else: the centre crop used in validation).
        crop_scale: area fraction range of random-resized crops.
        crop_ratio: aspect-ratio range (relative to the output's) of random-resized crops.
        hflip: flip half the training samples horizontally.
        views_per_scene: views taken from a multi-view scene per pass in training (``None`` = all).
    """

    expands = True

    def __init__(
        self,
        out_hw: tuple[int, int],
        with_depth: bool,
        with_masks: bool,
        random_crop: bool = True,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        views_per_scene: int | None = None,
    ) -> None:
        self.out_hw, self.with_depth, self.with_masks = out_hw, with_depth, with_masks
        self.random_crop, self.crop_scale, self.crop_ratio = random_crop, crop_scale, crop_ratio
        self.hflip, self.views_per_scene = hflip, views_per_scene

    def count(self, raw: dict[str, Any]) -> int:
        return len(view_indices(raw)) if is_multiview(raw) else 1

    def __call__(self, raw: dict[str, Any], rng: random.Random | None) -> list[dict[str, Any]]:
        url, key = sample_where(raw)
        if is_multiview(raw):
            scene = parse_scene(raw)
            scale = require_depth_scale(raw, scene.depth_scale) if self.with_depth else None
            views = list(range(scene.num_views))
            if rng is not None and self.views_per_scene is not None and self.views_per_scene < len(views):
                views = rng.sample(views, self.views_per_scene)
            size = scene.size
            label = int(scene.meta["label"])
            return [
                self._item(raw, ViewFields.of(raw, v), scale, size, label, make_key(key, f"v{v:03d}"), rng)
                for v in views
            ]
        meta = parse_meta(raw, required=False)
        scale = single_depth_scale(raw, meta) if self.with_depth else None
        return [self._item(raw, ViewFields.of(raw), scale, None, int(meta["label"]), key, rng)]

    def _item(
        self,
        raw: dict[str, Any],
        fields: ViewFields,
        depth_scale: float | None,
        size: tuple[int, int] | None,
        label: int,
        key: str,
        rng: random.Random | None,
    ) -> dict[str, Any]:
        # a single-view image is turned upright by its EXIF orientation (its depth and mask with it); a view of a
        # scene (size: its camera's) is read as stored, which its camera describes
        image, how = decode_upright_rgb(raw, fields.image) if size is None else (decode_rgb(raw, fields.image, size), 1)
        if rng is not None and self.random_crop:
            box = random_resized_box(image.size, self.out_hw, rng, self.crop_scale, self.crop_ratio)
        else:
            box = crop_box(image.size, self.out_hw)
        flip = rng is not None and self.hflip and rng.random() < 0.5
        arrays = read_view(raw, fields, image, box, self.out_hw, depth_scale, self.with_masks, how)
        item: dict[str, Any] = {
            name: np.ascontiguousarray(array[..., ::-1] if flip else array) for name, array in arrays.items()
        }
        item.update(label=label, key=key)
        return item


class SingleViewShards(ShardDataModule):
    """Single images with depth, masks and labels from WebDataset shards (``docs/shard-format.md``).

    Reads single-view samples (``KEY.jpg|png|webp``, ``KEY.depth.png``, ``KEY.mask.png``, ``KEY.cls``,
    ``KEY.meta.json``) and multi-view scenes, whose views become single-view samples (keys ``SCENE_v003``):
    so the embedded renders (``selfsup3d data render``) feed it directly.

    A batch is a dict (tensors on the training device; images travel as uint8):

    - ``image``: float32 ``[B, 3, H, W]`` in ``[0, 1]``.
    - ``depth``: float32 ``[B, 1, H, W]``, metric or relative (the shard's ``depth_kind``), 0 = unknown;
      with ``with_depth`` (by default when the shards have depth).
    - ``mask``: float32 ``[B, 1, H, W]`` in ``{0, 1}``; only with ``with_masks``.
    - ``label``: int64 ``[B]``, -1 when unknown.
    - ``key``: list of ``B`` keys.

    Training applies a random-resized crop and a horizontal flip, identical for image, depth and mask
    (depth and masks resampled with nearest neighbour); validation resizes and centre-crops. Epochs,
    ranks, validation and bad samples behave as in :class:`MultiViewShards`.

    Args:
        train_urls: training shards (see :class:`~selfsup3d.datamodules.base.ShardDataModule` for the forms).
        val_urls: validation shards; ``null`` for no validation.
        batch_size: images per batch (per device).
        random_resized_crop: random-resized crops in training (else the validation centre crop).
        crop_scale: area fraction range of the random-resized crops.
        crop_ratio: aspect-ratio range (relative to ``image_size``'s) of the random-resized crops.
        hflip: random horizontal flips in training.
        views_per_scene: random views taken from each multi-view scene per pass in training (``null`` = all).
        shuffle_buffer: samples in each worker's shuffle buffer (0 = no shuffling).
        **kwargs: the loader, size, depth/mask, jitter and epoch arguments of
            :class:`~selfsup3d.datamodules.base.ShardDataModule`.
    """

    def __init__(
        self,
        train_urls: str | list[str],
        val_urls: str | list[str] | None = None,
        batch_size: int = 32,
        random_resized_crop: bool = True,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        views_per_scene: int | None = None,
        shuffle_buffer: int = 1024,
        **kwargs: Any,
    ) -> None:
        super().__init__(train_urls, val_urls, batch_size=batch_size, shuffle_buffer=shuffle_buffer, **kwargs)
        require(0 < crop_scale[0] <= crop_scale[1] <= 1, self.key("crop_scale"), "[min, max], 0 < min <= max <= 1",
                list(crop_scale))  # fmt: skip
        require(
            0 < crop_ratio[0] <= crop_ratio[1], self.key("crop_ratio"), "[min, max], 0 < min <= max", list(crop_ratio)
        )
        require(
            views_per_scene is None or views_per_scene >= 1,
            self.key("views_per_scene"),
            ">= 1 or null",
            views_per_scene,
        )
        self.random_resized_crop = random_resized_crop
        self.crop_scale = tuple(crop_scale)
        self.crop_ratio = tuple(crop_ratio)
        self.hflip = hflip
        self.views_per_scene = views_per_scene

    def _check_summary(self, summary: ShardSummary, split: str) -> None:
        if self.with_depth and not summary.has_depth:
            raise ConfigError(
                f"{self.key('with_depth')}=true but the samples of {self.key(f'{split}_urls')} have no depth "
                f"({summary.where}): set it to false or null, or annotate them with `selfsup3d data pseudo-depth`"
            )

    def data_spec(self) -> DataSpec:
        return DataSpec(
            kind="single_view",
            image_hw=self.image_hw,
            num_classes=self.num_classes,
            with_depth=bool(self.with_depth),
            with_masks=bool(self.with_masks),
            key_prefix=self.key_prefix,
        )

    def _decoder(self, train: bool) -> SingleViewDecoder:
        return SingleViewDecoder(
            self.image_hw,
            bool(self.with_depth),
            bool(self.with_masks),
            random_crop=train and self.random_resized_crop,
            crop_scale=self.crop_scale,
            crop_ratio=self.crop_ratio,
            hflip=train and self.hflip,
            views_per_scene=self.views_per_scene,
        )

    def _collate_fn(self) -> Collate:
        return Collate(("image", "depth", "mask"))
