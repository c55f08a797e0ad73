"""What the shard datamodules share: arguments, set-up checks, loaders, skipped-sample counts, and the
crop/resize that keeps intrinsics consistent."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image

from selfsup3d.datamodules.pipeline import (
    BadSampleHandler,
    Decoder,
    SkipCounter,
    TrainStage,
    ValStage,
    expand_urls,
    make_loader,
    rank_and_world_size,
    train_pipeline,
    val_pipeline,
)
from selfsup3d.errors import ConfigError


# ============================================================================ geometry of crops
def image_hw(image_size: int | Sequence[int], arg: str = "data.image_size") -> tuple[int, int]:
    """``(height, width)`` from an int (square) or a ``[height, width]`` pair.

    Raises:
        ConfigError: not positive, or not one or two integers.
    """
    if isinstance(image_size, int):
        hw = (image_size, image_size)
    else:
        values = list(image_size)
        if len(values) != 2:
            raise ConfigError(f"{arg} must be an integer or [height, width], got {image_size!r}")
        hw = (int(values[0]), int(values[1]))
    if min(hw) < 1:
        raise ConfigError(f"{arg} must be positive, got {image_size!r}")
    return hw


def crop_box(
    src_wh: tuple[int, int], out_hw: tuple[int, int], zoom: float = 1.0, rng: random.Random | None = None
) -> tuple[float, float, float, float]:
    """The source window ``(x0, y0, x1, y1)`` (continuous pixel coordinates, corners at integers) that is
    resized to ``out_hw``: the window has the output's aspect ratio, covers the image's short side divided
    by ``zoom`` and sits at a random position (``rng``) or in the centre (``rng=None``)."""
    src_w, src_h = src_wh
    out_h, out_w = out_hw
    scale = max(out_w / src_w, out_h / src_h) * max(zoom, 1.0)
    box_w, box_h = out_w / scale, out_h / scale
    if rng is None:
        x0, y0 = (src_w - box_w) / 2, (src_h - box_h) / 2
    else:
        x0, y0 = rng.uniform(0, src_w - box_w), rng.uniform(0, src_h - box_h)
    return x0, y0, x0 + box_w, y0 + box_h


def random_resized_box(
    src_wh: tuple[int, int],
    out_hw: tuple[int, int],
    rng: random.Random,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[float, float, float, float]:
    """A random window for a random-resized crop: area fraction in ``scale`` and aspect ratio (w/h) in
    ``ratio`` times the output's; falls back to the centre window of :func:`crop_box` after 10 tries."""
    src_w, src_h = src_wh
    out_h, out_w = out_hw
    area = src_w * src_h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]))) * out_w / out_h
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if 0 < w <= src_w and 0 < h <= src_h:
            x0, y0 = rng.uniform(0, src_w - w), rng.uniform(0, src_h - h)
            return x0, y0, x0 + w, y0 + h
    return crop_box(src_wh, out_hw)


def crop_intrinsics(K: np.ndarray, box: tuple[float, float, float, float], out_hw: tuple[int, int]) -> np.ndarray:
    """Intrinsics of the window ``box`` resized to ``out_hw`` (pixel centres at +0.5, so exact)."""
    x0, y0, x1, y1 = box
    sx, sy = out_hw[1] / (x1 - x0), out_hw[0] / (y1 - y0)
    K = np.array(K, dtype=np.float64)
    out = K.copy()
    out[0, 0], out[0, 1], out[0, 2] = K[0, 0] * sx, K[0, 1] * sx, (K[0, 2] - x0) * sx
    out[1, 1], out[1, 2] = K[1, 1] * sy, (K[1, 2] - y0) * sy
    return out


def _is_identity(image: Image.Image, box: tuple[float, float, float, float], out_hw: tuple[int, int]) -> bool:
    return image.size == (out_hw[1], out_hw[0]) and box == (0.0, 0.0, float(out_hw[1]), float(out_hw[0]))


def resize_window(
    image: Image.Image, box: tuple[float, float, float, float], out_hw: tuple[int, int], nearest: bool = False
) -> Image.Image:
    """Resize the window ``box`` of ``image`` to ``out_hw``: antialiased bilinear for pictures, nearest for
    depth and masks (no blending across edges or with "no depth")."""
    if _is_identity(image, box, out_hw):
        return image
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return image.resize((out_hw[1], out_hw[0]), resample=resample, box=box)


# ============================================================================ the datamodule base
class ShardDataModule(LightningDataModule):
    """Base of :class:`MultiViewShards` and :class:`SingleViewShards` (see their docstrings for the batches).

    Subclasses implement ``_decoder(train)``, ``_collate_fn()`` and ``prepare_batch``."""

    def __init__(
        self,
        train_urls: str | list[str],
        val_urls: str | list[str] | None,
        batch_size: int,
        num_workers: int,
        image_size: int | tuple[int, int],
        shuffle_buffer: int,
        batches_per_epoch: int,
        val_batches: int | None,
        strict: bool,
        seed: int | None,
        pin_memory: bool,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("batches_per_epoch", batches_per_epoch, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"data.{name} must be an integer >= {low}, got {value!r}")
        if val_batches is not None and val_batches < 1:
            raise ConfigError(f"data.val_batches must be >= 1 or null (one full pass), got {val_batches}")
        self.train_urls = train_urls
        self.val_urls = val_urls
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_hw = image_hw(image_size)
        self.shuffle_buffer = shuffle_buffer
        self.batches_per_epoch = batches_per_epoch
        self.val_batches = val_batches
        self.strict = strict
        self.seed = seed
        self.pin_memory = pin_memory
        self._train_list: list[str] | None = None
        self._val_list: list[str] | None = None
        self._counters: dict[str, SkipCounter] = {}
        self._rank, self._world_size, self._seed = 0, 1, 0

    # ------------------------------------------------------------------ hooks for subclasses
    def _decoder(self, train: bool) -> Decoder:
        raise NotImplementedError

    def _collate_fn(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """A picklable collate function (workers get it, not the datamodule)."""
        raise NotImplementedError

    def prepare_batch(self, batch: dict[str, Any], train: bool) -> dict[str, Any]:
        """uint8 -> float and augmentation on the batch's device (Lightning calls it through
        ``on_after_batch_transfer``; call it yourself when iterating a loader outside a Trainer)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ Lightning
    def setup(self, stage: str | None = None) -> None:
        """Expand and check the shard URLs (a pattern that matches nothing or a file that is not a tar
        fails here, naming it), and learn this process's rank."""
        self._rank, self._world_size = rank_and_world_size(getattr(self, "trainer", None))
        self._seed = int(self.seed if self.seed is not None else torch.initial_seed() % (2**31))
        if stage in (None, "fit") and self._train_list is None:
            self._train_list = expand_urls(self.train_urls, "data.train_urls")
        if self.val_urls is not None and stage in (None, "fit", "validate") and self._val_list is None:
            self._val_list = expand_urls(self.val_urls, "data.val_urls")
        for split in ("train", "val"):
            self._counters.setdefault(split, SkipCounter())

    def _ensure_setup(self, stage: str) -> None:
        if not self._counters:
            self.setup(stage)

    def train_dataloader(self) -> Any:
        """Infinite resampled stream, ``batches_per_epoch`` full batches per epoch on every rank."""
        self._ensure_setup("fit")
        if self._train_list is None:
            self._train_list = expand_urls(self.train_urls, "data.train_urls")
        handler = BadSampleHandler(self._counters["train"], self.strict, "training")
        stage = TrainStage(self._decoder(train=True), handler, self._seed, self._rank, self.shuffle_buffer)
        pipeline = train_pipeline(
            self._train_list, stage, self._collate_fn(), self.batch_size, handler, self._seed, self._rank
        )
        return make_loader(pipeline, self.num_workers, self.pin_memory, self.batches_per_epoch)

    def val_dataloader(self) -> Any:
        """Deterministic pass over ``val_urls`` (the same number of batches on every rank), or
        ``val_batches`` batches (cycling) when set; an empty list without ``val_urls``."""
        self._ensure_setup("validate")
        if self.val_urls is None:
            return []
        if self._val_list is None:
            self._val_list = expand_urls(self.val_urls, "data.val_urls")
        handler = BadSampleHandler(self._counters["val"], self.strict, "validation")
        stage = ValStage(self._decoder(train=False), handler, self._rank, self._world_size)
        pipeline = val_pipeline(self._val_list, stage, self._collate_fn(), self.batch_size, handler)
        # more workers than shards would only idle
        workers = min(self.num_workers, len(self._val_list))
        return make_loader(pipeline, workers, self.pin_memory, self.val_batches)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        training = bool(trainer is not None and trainer.training)
        return self.prepare_batch(batch, train=training)

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped as bad so far in this process and its workers, per split (``train``, ``val``)."""
        return {split: counter.total for split, counter in self._counters.items()}
