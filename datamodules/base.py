"""What the shard datamodules share: arguments, set-up checks (a look at the first sample), loaders,
skipped-sample counts, depth and mask decoding, collation, batch preparation and photometric jitter, the
description of the batches (:class:`~selfsup3d.datamodules.spec.DataSpec`), and the crop/resize that keeps
intrinsics consistent."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kornia.augmentation import ColorJitter
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image

from selfsup3d.datamodules.format import (
    CAMERAS_FIELD,
    DEPTH_SUFFIX,
    MASK_SUFFIX,
    META_FIELD,
    SampleError,
    decode_depth,
    decode_mask,
    image_field,
    is_multiview,
    parse_meta,
    parse_scene,
    sample_where,
    turn,
    view_field,
)
from selfsup3d.datamodules.inventory import SplitInventory, check_training_data
from selfsup3d.datamodules.pipeline import (
    BadSampleHandler,
    Decoder,
    SkipCounter,
    TrainStage,
    ValStage,
    expand_urls,
    first_sample,
    make_loader,
    rank_and_world_size,
    shutdown_workers,
    train_pipeline,
    val_pipeline,
)
from selfsup3d.datamodules.resumable import ResumableLoader, StreamEpoch, stream_seed
from selfsup3d.datamodules.spec import DataSpec
from selfsup3d.errors import current_prefix, require


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
        require(len(values) == 2, arg, "an integer or [height, width]", image_size)
        hw = (int(values[0]), int(values[1]))
    require(min(hw) >= 1, arg, "positive", image_size)
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


# ============================================================================ depth, masks, collation
def _stored(size: tuple[int, int] | None, how: int) -> tuple[int, int] | None:
    """The stored ``(width, height)`` of an image shown at ``size`` after the EXIF orientation ``how``."""
    return size if size is None or how in (1, 2, 3, 4) else (size[1], size[0])


def read_depth(
    raw: Mapping[str, Any],
    name: str,
    src_wh: tuple[int, int] | None,
    box: tuple[float, float, float, float],
    out_hw: tuple[int, int],
    scale: float,
    how: int = 1,
) -> np.ndarray:
    """Field ``name`` (16-bit depth) of ``raw``, turned as the EXIF orientation ``how`` says (its image's): the
    window ``box`` resized to ``out_hw`` (nearest), in metres (``scale`` per unit), float32 ``[H, W]``, 0 =
    unknown."""
    depth = turn(decode_depth(raw, name, _stored(src_wh, how)), how)
    units = resize_window(depth, box, out_hw, nearest=True)
    return np.asarray(units, dtype=np.float32) * np.float32(scale)


def read_mask(
    raw: Mapping[str, Any],
    name: str,
    src_wh: tuple[int, int] | None,
    box: tuple[float, float, float, float],
    out_hw: tuple[int, int],
    how: int = 1,
) -> np.ndarray:
    """Field ``name`` (a mask) of ``raw``, turned as the EXIF orientation ``how`` says (its image's): the window
    ``box`` resized to ``out_hw`` (nearest), uint8 ``{0, 1}``."""
    mask = resize_window(turn(decode_mask(raw, name, _stored(src_wh, how)), how), box, out_hw, nearest=True)
    return (np.asarray(mask) > 0).astype(np.uint8)


@dataclass(frozen=True)
class ViewFields:
    """The field names of one view: its image, depth and mask (view ``NNN`` of a scene, or a single-view sample)."""

    image: str
    depth: str
    mask: str

    @classmethod
    def of(cls, raw: Mapping[str, Any], view: int | None = None) -> ViewFields:
        """The fields of view ``view`` of a multi-view scene, or of a single-view sample (``view=None``)."""
        if view is None:
            return cls(image_field(raw), DEPTH_SUFFIX, MASK_SUFFIX)
        return cls(image_field(raw, view), view_field(view, DEPTH_SUFFIX), view_field(view, MASK_SUFFIX))


def read_view(
    raw: Mapping[str, Any],
    fields: ViewFields,
    image: Image.Image,
    box: tuple[float, float, float, float],
    out_hw: tuple[int, int],
    depth_scale: float | None,
    with_masks: bool,
    how: int = 1,
) -> dict[str, np.ndarray]:
    """One view's arrays: the window ``box`` of its decoded ``image`` resized to ``out_hw`` (``image`` uint8
    ``[3, H, W]``), and the same window of its depth (``depth`` ``[1, H, W]`` in metres, when ``depth_scale``
    is given) and mask (``mask`` uint8 ``[1, H, W]``, with ``with_masks``), turned as the image was (its EXIF
    orientation ``how``)."""
    src = image.size
    out = {"image": np.asarray(resize_window(image, box, out_hw), dtype=np.uint8).transpose(2, 0, 1)}
    if depth_scale is not None:
        out["depth"] = read_depth(raw, fields.depth, src, box, out_hw, depth_scale, how)[None]
    if with_masks:
        out["mask"] = read_mask(raw, fields.mask, src, box, out_hw, how)[None]
    return out


def require_depth_scale(raw: Mapping[str, Any], scale: float | None, field: str | None = None) -> float:
    """The depth scale of a sample whose depth was asked for; a bad sample when it has none (``field``: where
    the scale lives, ``cameras.json`` or, for an unposed scene, ``meta.json``)."""
    if scale is None:
        field = field or (CAMERAS_FIELD if CAMERAS_FIELD in raw else META_FIELD)
        raise SampleError(*sample_where(raw), field, "depth requested (with_depth) but the scene has no depth_scale")
    return scale


class Collate:
    """Stack decoded samples into a batch: numpy ``fields`` (those present) as tensors, ``label`` as int64,
    ``key`` as a list, plus constant ``extras`` (e.g. ``num_context``). Picklable: workers get it."""

    def __init__(self, fields: tuple[str, ...], extras: Mapping[str, Any] | None = None) -> None:
        self.fields, self.extras = fields, dict(extras or {})

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        # numpy stacking: torch's uint8 copies are slow with several intra-op threads
        batch: dict[str, Any] = {
            name: torch.from_numpy(np.stack([s[name] for s in samples])) for name in self.fields if name in samples[0]
        }
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.int64)
        batch["key"] = [s["key"] for s in samples]
        batch.update(self.extras)
        return batch


# ============================================================================ the first sample
@dataclass(frozen=True)
class ShardSummary:
    """What the first sample of a split shows (read at set-up): its kind, views, size, depth, masks, cameras."""

    multiview: bool
    num_views: int
    width: int | None
    height: int | None
    has_depth: bool
    has_masks: bool
    where: str
    has_cameras: bool = False


def summarize_first_sample(urls: list[str]) -> ShardSummary | None:
    """Read the first sample of the first shard of ``urls`` (``None`` when it cannot be read: the stream's own
    bad-sample handling then reports it)."""
    try:
        raw = first_sample(urls)
    except Exception:
        return None
    if raw is None:
        return None
    url, key = sample_where(raw)
    where = f"shard {url}, sample {key}"
    try:
        if is_multiview(raw):
            scene = parse_scene(raw)
            return ShardSummary(
                True,
                scene.num_views,
                *scene.size,
                scene.depth_scale is not None and any(k.endswith(".depth.png") for k in raw),
                any(k.endswith(".mask.png") for k in raw),
                where,
                scene.cameras is not None,
            )
        meta = parse_meta(raw, required=False)
        image_field(raw)
        has_depth = "depth.png" in raw and meta.get("depth_scale") is not None
        return ShardSummary(False, 1, None, None, has_depth, "mask.png" in raw, where)
    except SampleError:
        return None


def class_names_near(urls: list[str]) -> list[str] | None:
    """The class names of ``info.json`` beside the first local shard (written by ``selfsup3d data``)."""
    for url in urls[:1]:
        path = Path(url.removeprefix("file:")).parent / "info.json"
        try:
            names = json.loads(path.read_text()).get("class_names")
        except (OSError, ValueError, AttributeError):
            return None
        return list(names) if isinstance(names, list) and names else None
    return None


# ============================================================================ the datamodule base
class ShardDataModule(LightningDataModule):
    """Base of :class:`MultiViewShards` and :class:`SingleViewShards` (see their docstrings for the batches).

    Subclasses implement ``_decoder(train)``, ``_collate_fn()``, ``_check_summary(summary)`` and
    ``data_spec()``; the base prepares batches (``images``/``image`` to float, masks to float, jitter).

    Args:
        train_urls: training shards: brace patterns (``dir/train-{000000..000009}.tar``), local globs,
            ``pipe:`` commands or fsspec URLs; a list joins several.
        val_urls: validation shards, same forms; ``null`` for no validation.
        batch_size: samples per batch (per device).
        num_workers: DataLoader workers per device.
        image_size: delivered size, an int (square) or ``[height, width]``.
        with_depth: deliver ``depth``: ``true`` (samples without depth are bad samples), ``false``, or ``null``
            (deliver it when the shards have it, as their first sample shows).
        with_masks: deliver ``mask``: ``true`` (samples without a mask are bad), ``false`` or ``null``.
        color_jitter: photometric jitter in training (kornia, on the device; one draw for all views of a scene).
        jitter_strength: brightness, contrast and saturation jitter (hue gets a quarter of it).
        shuffle_buffer: samples in each worker's shuffle buffer (0 = no shuffling).
        batches_per_epoch: training batches per epoch on every rank.
        val_batches: validation batches per rank; ``null`` = one full deterministic pass.
        strict: raise on the first bad sample instead of skipping it.
        seed: seed of shard resampling, view choice, crops and flips (per rank and worker); ``null`` takes
            torch's initial seed (set by ``seed_everything``).
        pin_memory: pin host memory when CUDA is available.
    """

    def __init__(
        self,
        train_urls: str | list[str],
        val_urls: str | list[str] | None = None,
        batch_size: int = 8,
        num_workers: int = 4,
        image_size: int | tuple[int, int] = 64,
        with_depth: bool | None = None,
        with_masks: bool | None = False,
        color_jitter: bool = False,
        jitter_strength: float = 0.2,
        shuffle_buffer: int = 256,
        batches_per_epoch: int = 500,
        val_batches: int | None = None,
        strict: bool = False,
        seed: int | None = None,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        self.key_prefix = current_prefix("data")
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("batches_per_epoch", batches_per_epoch, 1),
        ):
            require(isinstance(value, int) and value >= low, self.key(name), f"an integer >= {low}", value)
        require(
            val_batches is None or val_batches >= 1,
            self.key("val_batches"),
            ">= 1 or null (one full pass)",
            val_batches,
        )
        require(0 <= jitter_strength <= 1, self.key("jitter_strength"), "in [0, 1]", jitter_strength)
        self.train_urls = train_urls
        self.val_urls = val_urls
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_hw = image_hw(image_size, self.key("image_size"))
        self.with_depth, self.with_masks = with_depth, with_masks
        self.color_jitter = color_jitter
        self.jitter_strength = jitter_strength
        s = jitter_strength
        self._jitter = ColorJitter(s, s, s, s / 4, p=1.0) if color_jitter and s > 0 else None
        self.shuffle_buffer = shuffle_buffer
        self.batches_per_epoch = batches_per_epoch
        self.val_batches = val_batches
        self.strict = strict
        self.seed = seed
        self.pin_memory = pin_memory
        self.num_classes: int | None = None
        self._train_list: list[str] | None = None
        self._val_list: list[str] | None = None
        self._counters: dict[str, SkipCounter] = {}
        self.inventories: dict[str, SplitInventory] = {}
        """What each split's shards hold, taken at set-up (see :mod:`~selfsup3d.datamodules.inventory`)."""
        self._rank, self._world_size, self._seed = 0, 1, 0
        self._train_loader: ResumableLoader | None = None
        self._loaders: list[Any] = []  # every loader made, so teardown can stop their workers

    def key(self, name: str) -> str:
        """The YAML key of this datamodule's argument ``name``."""
        return f"{self.key_prefix}.{name}"

    # ------------------------------------------------------------------ hooks for subclasses
    def _decoder(self, train: bool) -> Decoder:
        raise NotImplementedError

    def _collate_fn(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """A picklable collate function (workers get it, not the datamodule)."""
        raise NotImplementedError

    def _check_summary(self, summary: ShardSummary, split: str) -> None:
        """Refuse shards that cannot give this datamodule's samples (kind, views), at set-up."""

    def data_spec(self) -> DataSpec:
        """What the batches are (see :class:`~selfsup3d.datamodules.spec.DataSpec`); after :meth:`setup`."""
        raise NotImplementedError

    def data_specs(self) -> dict[str, DataSpec]:
        """The datamodule's one source, named ``data``."""
        return {"data": self.data_spec()}

    # ------------------------------------------------------------------ Lightning
    def setup(self, stage: str | None = None) -> None:
        """Expand and check the shard URLs (a pattern that matches nothing or a file that is not a tar
        fails here, naming it), look at the first sample of each split (its kind, views, depth and masks:
        ``with_depth``/``with_masks`` left at ``null`` follow what the shards have), read the class names of
        ``info.json``, and learn this process's rank."""
        self._rank, self._world_size = rank_and_world_size(getattr(self, "trainer", None))
        self._seed = int(self.seed if self.seed is not None else torch.initial_seed() % (2**31))
        if stage in (None, "fit") and self._train_list is None:
            self._train_list = expand_urls(self.train_urls, self.key("train_urls"))
        if self.val_urls is not None and stage in (None, "fit", "validate") and self._val_list is None:
            self._val_list = expand_urls(self.val_urls, self.key("val_urls"))
        for split, urls in (("train", self._train_list), ("val", self._val_list)):
            self._counters.setdefault(split, SkipCounter())
            if urls and split not in self.inventories:
                self._take_inventory(split, urls)
            summary = summarize_first_sample(urls) if urls else None
            if summary is not None:
                self._check_summary(summary, split)
                if self.with_depth is None:
                    self.with_depth = summary.has_depth
                if self.with_masks is None:
                    self.with_masks = summary.has_masks
        if self.num_classes is None:
            names = class_names_near(self._train_list or self._val_list or [])
            self.num_classes = len(names) if names else None

    inventory_name: str | None = None
    """What the shards are announced as (``training data: ...``); ``None``: the split's use (training or
    validation). A reader of shards for another purpose (a probe's training scenes) names it."""

    def _take_inventory(self, split: str, urls: list[str]) -> None:
        """Say what the shards hold (one line); refuse a nearly broken training split (see ``inventory``)."""
        inventory = SplitInventory.of(urls, split)
        self.inventories[split] = inventory
        name = self.inventory_name or ("training" if split == "train" else "validation")
        if inventory.damaged:
            rank_zero_warn(inventory.summary(name))
        else:
            rank_zero_info(inventory.summary(name))
        if split == "train":
            check_training_data(inventory, self.batch_size, self.strict, self.key("train_urls"))

    def _ensure_setup(self, stage: str) -> None:
        if not self._counters:
            self.setup(stage)

    def train_dataloader(self) -> ResumableLoader:
        """Infinite resampled stream, ``batches_per_epoch`` full batches per epoch on every rank; resumable
        (its position is saved in checkpoints, see :mod:`~selfsup3d.datamodules.resumable`)."""
        self._ensure_setup("fit")
        if self._train_list is None:
            self._train_list = expand_urls(self.train_urls, self.key("train_urls"))
        handler = BadSampleHandler(self._counters["train"], self.strict, "training")
        epoch = StreamEpoch()
        stage = TrainStage(self._decoder(train=True), handler, self._seed, self._rank, self.shuffle_buffer, epoch)
        pipeline = train_pipeline(
            self._train_list, stage, self._collate_fn(), self.batch_size, handler, self._seed, self._rank
        )
        settings = {"seed": self._seed, "batch_size": self.batch_size, "world_size": self._world_size}
        self._train_loader = ResumableLoader(
            pipeline, epoch, self.batches_per_epoch, self.num_workers, self.pin_memory, settings, self._batches_done
        )
        self._loaders.append(self._train_loader)
        return self._train_loader

    def val_dataloader(self) -> Any:
        """Deterministic pass over ``val_urls`` (the same number of batches on every rank), or
        ``val_batches`` batches (cycling) when set; an empty list without ``val_urls``."""
        self._ensure_setup("validate")
        if self.val_urls is None:
            return []
        if self._val_list is None:
            self._val_list = expand_urls(self.val_urls, self.key("val_urls"))
        handler = BadSampleHandler(self._counters["val"], self.strict, "validation")
        stage = ValStage(self._decoder(train=False), handler, self._rank, self._world_size)
        pipeline = val_pipeline(self._val_list, stage, self._collate_fn(), self.batch_size, handler)
        # more workers than shards would only idle
        workers = min(self.num_workers, len(self._val_list))
        loader = make_loader(pipeline, workers, self.pin_memory, self.val_batches)
        self._loaders.append(loader)
        return loader

    def teardown(self, stage: str) -> None:
        """Stop the loaders' persistent workers (Lightning stops only plain DataLoaders' workers)."""
        for loader in self._loaders:
            shutdown_workers(loader)
        self._loaders.clear()

    def prepare_batch(self, batch: dict[str, Any], train: bool) -> dict[str, Any]:
        """uint8 images -> float32 in [0, 1], masks -> float32; in training, the photometric jitter (one draw
        per image, or per scene for all its views). Lightning calls it through ``on_after_batch_transfer`` on
        the batch's device; call it yourself when iterating a loader outside a Trainer."""
        name = "images" if "images" in batch else "image"
        images = batch[name]
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        if train and self._jitter is not None:
            seed = self._batch_seed()
            if seed is None:
                images = self._jitter_images(images)
            else:  # a function of the batch's place in the stream: a resumed run draws the same jitter
                cuda = [images.device.index or 0] if images.is_cuda else []
                with torch.random.fork_rng(devices=cuda, device_type="cuda" if cuda else "cpu"):
                    torch.random.default_generator.manual_seed(seed)
                    if cuda:
                        torch.cuda.manual_seed(seed)  # the current device only, the one fork_rng restores
                    images = self._jitter_images(images)
        batch[name] = images
        if "mask" in batch and batch["mask"].dtype != torch.float32:
            batch["mask"] = batch["mask"].float()
        return batch

    def _batches_done(self) -> int | None:
        """Batches of the current epoch the trainer counts as trained on (its restored progress on resume)."""
        trainer = getattr(self, "trainer", None)
        try:
            return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)  # type: ignore[union-attr]
        except (AttributeError, TypeError):
            return None

    def _batch_seed(self) -> int | None:
        """A seed for the batch the training loader gave last (its epoch and index), or ``None`` outside one."""
        loader = self._train_loader
        if loader is None or loader.epoch < 0 or loader.given < 1:
            return None
        return stream_seed("jitter", self._seed, self._rank, *loader.position)

    def _jitter_images(self, images: torch.Tensor) -> torch.Tensor:
        assert self._jitter is not None
        if images.ndim == 4:
            return self._jitter(images).clamp_(0.0, 1.0)
        # the views of a scene tiled side by side: one draw per scene
        b, v, c, h, w = images.shape
        tiled = images.permute(0, 2, 3, 1, 4).reshape(b, c, h, v * w)
        tiled = self._jitter(tiled).clamp_(0.0, 1.0)
        return tiled.reshape(b, c, h, v, w).permute(0, 3, 1, 2, 4).contiguous()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        training = bool(trainer is not None and trainer.training)
        return self.prepare_batch(batch, train=training)

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped as bad so far in this process and its workers, per split (``train``, ``val``)."""
        return {split: counter.total for split, counter in self._counters.items()}

    @property
    def read(self) -> dict[str, int]:
        """Samples read (decoded) so far in this process and its workers, per split."""
        return {split: counter.read for split, counter in self._counters.items()}

    @property
    def distinct(self) -> dict[str, int]:
        """Intact samples the shards of each split hold (their inventory; splits with shards that cannot be counted
        here, remote or piped, are left out): a pass that reads more (``val_batches`` cycles) reads some twice."""
        return {split: inv.samples for split, inv in self.inventories.items() if not inv.unknown}
