"""``MultiViewShards``: multi-view scenes (images, cameras, optional depth and masks) from WebDataset shards."""

from __future__ import annotations

import random
from typing import Any, Literal

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

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
from selfsup3d.datamodules.eval_index import EvalIndex, read_eval_index
from selfsup3d.datamodules.format import CAMERAS_FIELD, SampleError, decode_rgb, parse_scene, sample_where
from selfsup3d.datamodules.spec import DataSpec
from selfsup3d.errors import ConfigError, require


def eval_view_order(num_available: int, num_views: int, num_context: int) -> list[int]:
    """Deterministic view choice for validation: ``num_views`` views evenly spread over the scene's
    ``num_available``, reordered so the first ``num_context`` (evenly spaced among them) are the context."""
    chosen = [(j * num_available) // num_views for j in range(num_views)]
    context_pos = [(k * num_views) // num_context for k in range(num_context)]
    targets = [p for p in range(num_views) if p not in context_pos]
    return [chosen[p] for p in context_pos + targets]


CANONICAL_CHOICES = ("random", "middle")


class StreamClock:
    """The training step a decoded sample will be trained at, from where it is in its stream (deterministic, so
    a resumed or repeated run draws the same windows): a worker's ``i``-th sample of an epoch goes into its
    ``i // batch_size``-th batch, which the loader gives as batch ``(i // batch_size) * workers + worker``
    of the epoch (DataLoader takes the workers' batches in turn). The training stage sets the position
    (:attr:`position`) before every decode."""

    def __init__(self, batch_size: int, batches_per_epoch: int) -> None:
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.position = (0, 0, 0, 1)  # epoch, samples decoded in it by this worker, worker, workers

    def step(self) -> int:
        epoch, decoded, worker, workers = self.position
        return epoch * self.batches_per_epoch + (decoded // self.batch_size) * workers + worker


def window_width(start: int, end: int, steps: int, step: int) -> int:
    """Width of the view window at ``step``: ``start`` growing linearly to ``end`` over ``steps`` steps, in whole
    views (rounded down), ``end`` from then on (at once when ``steps`` is 0)."""
    if steps <= 0 or step >= steps:
        return end
    return start + ((end - start) * max(step, 0)) // steps


def gap_range(start: tuple[int, int], end: tuple[int, int], steps: int, step: int) -> tuple[int, int]:
    """The frame-gap range at ``step``: each bound moves linearly from ``start`` to ``end`` over ``steps`` steps
    (whole frames, rounded down; ``end`` from then on, at once when ``steps`` is 0)."""
    return window_width(start[0], end[0], steps, step), window_width(start[1], end[1], steps, step)


def put_canonical_first(context: list[int], canonical: str) -> list[int]:
    """Order the context views (scene indices, in trajectory order) so that the model's canonical reference
    (the first view) is the one in the middle of them (``middle``, as RayZer's middle frame) or leave them."""
    if canonical != "middle" or len(context) < 2:
        return list(context)
    ordered = sorted(context)
    mid = ordered[(len(ordered) - 1) // 2]
    return [mid] + [v for v in ordered if v != mid]


def window_view_order(
    num_available: int,
    num_views: int,
    num_context: int,
    width: int,
    rng: random.Random | None,
    canonical: str = "random",
) -> list[int]:
    """Views of one sample from a window of ``width`` consecutive views of the scene (its capture order),
    context first.

    In training (``rng`` given) the window starts anywhere, ``num_views`` views are drawn from it and
    ``num_context`` of them are the context, at random; in validation (``rng=None``) the window is centred in
    the scene, its views evenly spread, the context evenly spaced among them (:func:`eval_view_order`).
    With ``canonical="middle"`` the first view is the context view in the middle of the context views
    (:func:`put_canonical_first`), otherwise the context is in random order (training) or evenly spaced order
    (validation). The targets follow in trajectory order."""
    width = max(num_views, min(width, num_available))
    if rng is None:
        start = (num_available - width) // 2
        order = [start + v for v in eval_view_order(width, num_views, num_context)]
        context, targets = order[:num_context], order[num_context:]
        if canonical == "middle":
            context = put_canonical_first(context, canonical)
        return context + targets
    start = rng.randrange(num_available - width + 1)
    return _split_chosen(sorted(rng.sample(range(start, start + width), num_views)), num_context, rng, canonical)


def _split_chosen(chosen: list[int], num_context: int, rng: random.Random, canonical: str) -> list[int]:
    """Training: ``num_context`` of the ``chosen`` views (in trajectory order) at random as the context, first
    (ordered by ``canonical``, else shuffled), then the targets in trajectory order."""
    context = sorted(rng.sample(chosen, num_context))
    targets = [v for v in chosen if v not in context]
    if canonical == "middle":
        context = put_canonical_first(context, canonical)
    else:
        rng.shuffle(context)
    return context + targets


def gap_view_order(
    num_available: int,
    num_views: int,
    num_context: int,
    gap: tuple[int, int],
    rng: random.Random | None,
    canonical: str = "random",
) -> list[int]:
    """Views of one sample whose first and last are ``g`` frames apart, ``g`` drawn uniformly from the range
    ``gap`` (RayZer's frame-gap curriculum; clipped to the scene: at least ``num_views - 1``, at most
    ``num_available - 1``), context first.

    In training (``rng`` given) the span starts anywhere, its first and last frames are taken, the other
    ``num_views - 2`` views are drawn inside it, and the context is chosen among them as in
    :func:`window_view_order`; in validation (``rng=None``) the span is the largest gap, centred, its views evenly
    spread (:func:`window_view_order` with width ``gap[1] + 1``)."""
    if rng is None:
        return window_view_order(num_available, num_views, num_context, gap[1] + 1, None, canonical)
    low = max(num_views - 1, min(gap[0], num_available - 1))
    g = rng.randint(low, max(low, min(gap[1], num_available - 1)))
    start = rng.randrange(num_available - g)
    inside = sorted(rng.sample(range(start + 1, start + g), num_views - 2))
    return _split_chosen([start, *inside, start + g], num_context, rng, canonical)


BATCH_FIELDS = ("images", "K", "c2w", "depth", "mask")
"""The per-view arrays of a decoded scene that a multi-view batch stacks (see ``Collate``)."""


class MultiViewDecoder:
    """Raw scene -> numpy ``images`` uint8 ``[V, 3, H, W]``, ``K`` and ``c2w`` (with ``with_cameras``), optional
    ``depth``/``mask``, label, key.

    Args:
        num_views: views per sample.
        num_context: context views (validation order, see :func:`eval_view_order`).
        out_hw: delivered ``(height, width)``.
        with_depth: decode ``NNN.depth.png`` (metres; a scene without depth is a bad sample).
        with_masks: decode ``NNN.mask.png``.
        max_zoom: training crops zoom in by a random factor in ``[1, max_zoom]`` at a random position.
        view_window: ``(start, end)`` widths of the window of consecutive views the views come from
            (:func:`window_view_order`); ``None``: any views of the scene.
        window_steps: steps over which the width grows from ``start`` to ``end`` (:func:`window_width`).
        clock: the training step of the sample being decoded (:class:`StreamClock`; validation uses the final
            width).
        canonical: ``random`` or ``middle``: which context view comes first (the model's reference).
        with_cameras: decode ``cameras.json`` into ``K`` and ``c2w`` (a scene without it is a bad sample); else
            none is delivered, so posed and unposed scenes mix.
        frame_gap: ``((start_low, start_high), (end_low, end_high))``: the gap between the first and last view is
            drawn from a range moving from the start range to the end range (:func:`gap_view_order`).
        gap_steps: steps over which the gap range moves (:func:`gap_range`).
        eval_views: validation only: ``{key: context + target views}`` of an evaluation index; other scenes are
            left out (not counted as bad).
    """

    def __init__(
        self,
        num_views: int,
        num_context: int,
        out_hw: tuple[int, int],
        with_depth: bool,
        with_masks: bool,
        max_zoom: float = 1.0,
        view_window: tuple[int, int] | None = None,
        window_steps: int = 0,
        clock: StreamClock | None = None,
        canonical: str = "random",
        with_cameras: bool = True,
        frame_gap: tuple[tuple[int, int], tuple[int, int]] | None = None,
        gap_steps: int = 0,
        eval_views: dict[str, list[int]] | None = None,
    ) -> None:
        self.num_views, self.num_context, self.out_hw = num_views, num_context, out_hw
        self.frame_gap, self.gap_steps, self.eval_views = frame_gap, gap_steps, eval_views
        self.with_cameras = with_cameras
        self.with_depth, self.with_masks, self.max_zoom = with_depth, with_masks, max_zoom
        self.view_window, self.window_steps, self.clock, self.canonical = view_window, window_steps, clock, canonical

    def view_order(self, n: int, rng: random.Random | None) -> list[int]:
        """The scene's views (indices into its ``n`` views) in the sample's order, context first."""
        if self.frame_gap is not None:
            step = self.clock.step() if self.clock is not None and rng is not None else self.gap_steps
            gap = gap_range(*self.frame_gap, self.gap_steps, step)
            return gap_view_order(n, self.num_views, self.num_context, gap, rng, self.canonical)
        if self.view_window is not None:
            if rng is None:
                width = self.view_window[1]
            else:
                step = self.clock.step() if self.clock is not None else 0
                width = window_width(*self.view_window, self.window_steps, step)
            return window_view_order(n, self.num_views, self.num_context, width, rng, self.canonical)
        if rng is None:
            order = eval_view_order(n, self.num_views, self.num_context)
        else:
            order = rng.sample(range(n), self.num_views)
        context = put_canonical_first(order[: self.num_context], self.canonical)
        return context + order[self.num_context :]

    def count(self, raw: dict[str, Any]) -> int:
        """1, or 0 for a scene an evaluation index leaves out."""
        return 0 if self.eval_views is not None and sample_where(raw)[1] not in self.eval_views else 1

    def __call__(self, raw: dict[str, Any], rng: random.Random | None) -> list[dict[str, Any]]:
        url, key = sample_where(raw)
        if self.eval_views is not None and key not in self.eval_views:
            return []
        if self.with_cameras and CAMERAS_FIELD not in raw:
            raise SampleError(url, key, CAMERAS_FIELD, "missing: the scene is unposed, the datamodule delivers cameras")
        scene = parse_scene(raw)
        n = scene.num_views
        if n < self.num_views:
            raise SampleError(url, key, None, f"too few views: the scene has {n}, data.num_views is {self.num_views}")
        depth_scale = require_depth_scale(raw, scene.depth_scale) if self.with_depth else None
        if self.eval_views is not None:
            order = self.eval_views[key]  # type: ignore[index]
            if max(order) >= n:
                raise SampleError(url, key, None, f"the evaluation index names view {max(order)}, the scene has {n}")
        else:
            order = self.view_order(n, rng)
        views, Ks = [], []
        for view in order:
            zoom = 1.0 if rng is None else rng.uniform(1.0, self.max_zoom)
            box = crop_box(scene.size, self.out_hw, zoom, rng)
            fields = ViewFields.of(raw, view)
            image = decode_rgb(raw, fields.image, scene.size)
            views.append(read_view(raw, fields, image, box, self.out_hw, depth_scale, self.with_masks))
            if self.with_cameras:
                Ks.append(crop_intrinsics(scene.cameras.K[view], box, self.out_hw))  # type: ignore[union-attr]
        sample = {name: np.stack([v[name] for v in views]) for name in views[0]}
        sample["images"] = sample.pop("image")
        if self.with_cameras:
            sample.update(K=np.stack(Ks).astype(np.float32), c2w=scene.cameras.c2w[order].astype(np.float32))  # type: ignore[union-attr]
        sample.update(label=int(scene.meta["label"]), key=key)
        return [sample]


class MultiViewShards(ShardDataModule):
    """Multi-view scenes from WebDataset shards in the selfsup3d format (``docs/shard-format.md``).

    A batch is a dict (tensors on the training device; images travel as uint8 and become float in
    ``on_after_batch_transfer``):

    - ``images``: float32 ``[B, V, 3, H, W]`` in ``[0, 1]``.
    - ``K``: float32 ``[B, V, 3, 3]`` pixel intrinsics of the delivered (cropped/resized) images; the image's
      top-left corner is ``(0, 0)``, the centre of pixel ``(row i, column j)`` is ``(j + 0.5, i + 0.5)``
      (with ``with_cameras``: by default when every scene carries ``cameras.json``; unposed scenes, e.g. from
      video, have none).
    - ``c2w``: float32 ``[B, V, 4, 4]`` camera-to-world, OpenCV axes (x right, y down, z forward), in the
      shard's world units (with ``with_cameras``).
    - ``depth``: float32 ``[B, V, 1, H, W]`` metric z-depth, 0 = unknown (with ``with_depth``; by default when
      the shards have depth).
    - ``mask``: float32 ``[B, V, 1, H, W]`` in ``{0, 1}`` (with ``with_masks``).
    - ``num_context``: int; views ``[:num_context]`` are the context set, the rest the targets.
    - ``label``: int64 ``[B]``, -1 when unknown.
    - ``key``: list of ``B`` scene keys.

    In training the ``V`` views are a random subset of the scene's views in random order (so the context
    set is random); in validation they are evenly spread over the scene's views, the context evenly spaced
    among them (:func:`eval_view_order`). With ``view_window`` (the view-overlap curriculum RayZer trains
    with) the views come from a window of consecutive views in the scene's capture order (an orbit or a
    video: ``selfsup3d data render --trajectory orbit``, converted COLMAP/Blender scenes keep their order),
    whose width grows over training; validation uses a centred window of the final width.

    Training streams resampled shards and every rank gets ``batches_per_epoch`` batches per epoch; validation is one
    deterministic pass with equal batch counts on all ranks (or ``val_batches`` batches). Bad samples are
    skipped with a warning naming shard and key and counted in :attr:`skipped` (``strict=True`` raises instead);
    see ``SkippedSamplesLogger``.

    Args:
        train_urls: training shards (see :class:`~selfsup3d.datamodules.base.ShardDataModule` for the forms).
        val_urls: validation shards; ``null`` for no validation.
        num_views: views per scene in a sample (scenes with fewer are skipped as bad).
        num_context_views: context views; default ``num_views // 2``; needs ``1 <= it < num_views``.
        max_zoom: training crops zoom in by a random factor in ``[1, max_zoom]`` at a random position
            (1 = no zoom; validation always uses 1 and centre crops).
        view_window: ``[start, end]``: the views of a training sample come from a window of this many
            consecutive views of the scene, ``start`` at step 0 growing to ``end`` (both ``>= num_views``);
            ``null``: any views of the scene (no curriculum).
        window_steps: training steps over which the window grows from ``start`` to ``end`` (0: ``end`` at once).
        canonical_view: which context view comes first, the model's canonical reference: ``random`` or
            ``middle`` (the context view in the middle of the context views in capture order, as RayZer's
            middle frame).
        with_cameras: deliver ``K`` and ``c2w``: ``true`` (scenes without ``cameras.json`` are bad samples; refused
            at set-up when the shards' inventory finds none), ``false`` (never: posed and unposed scenes mix), or
            ``null`` (deliver them when every scene of the shards carries them, as their inventory and first
            sample show).
        frame_gap: ``[[start_low, start_high], [end_low, end_high]]``: RayZer's frame-gap curriculum for long
            sequences, instead of ``view_window``: the first and last view of a training sample are ``g`` frames
            apart, ``g`` uniform in a range whose bounds move linearly from the start range to the end range over
            ``frame_gap_steps`` (RayZer on RE10K: ``[[96, 128], [128, 192]]``); gaps are clipped to the scene
            (at least ``num_views - 1``). Validation uses a centred span of the largest gap. ``null``: none.
        frame_gap_steps: training steps over which the gap range moves (0: the end range at once).
        eval_index: a JSON evaluation index (pixelSplat's and LVSM's ``{scene: {"context": [...], "target":
            [...]} | null}``, :mod:`~selfsup3d.datamodules.eval_index`): validation scores exactly those scenes and
            views, context first, and says at set-up how many entries it found in the validation shards (scenes
            missing from them are counted in :attr:`eval_index_missing`). ``num_views`` and
            ``num_context_views`` must match its counts.
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
        view_window: tuple[int, int] | None = None,
        window_steps: int = 0,
        canonical_view: Literal["random", "middle"] = "random",
        with_cameras: bool | None = None,
        frame_gap: tuple[tuple[int, int], tuple[int, int]] | None = None,
        frame_gap_steps: int = 0,
        eval_index: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(train_urls, val_urls, **kwargs)
        require(num_views >= 2, self.key("num_views"), ">= 2 (context and target views)", num_views)
        num_context = num_views // 2 if num_context_views is None else num_context_views
        if not 1 <= num_context < num_views:
            raise ConfigError(
                f"{self.key('num_context_views')} must satisfy 1 <= {self.key('num_context_views')} < "
                f"{self.key('num_views')}, got num_context_views={num_context_views}, num_views={num_views}"
            )
        require(max_zoom >= 1, self.key("max_zoom"), ">= 1", max_zoom)
        if view_window is not None:
            start, end = (int(w) for w in view_window)
            if not num_views <= start <= end:
                raise ConfigError(
                    f"{self.key('view_window')} must be [start, end] with {self.key('num_views')} <= start <= end, "
                    f"got {list(view_window)} with num_views={num_views}"
                )
            view_window = (start, end)
        require(window_steps >= 0, self.key("window_steps"), ">= 0", window_steps)
        if frame_gap is not None:
            if view_window is not None:
                raise ConfigError(f"give {self.key('view_window')} or {self.key('frame_gap')}, not both")
            frame_gap = self._check_gap(frame_gap, num_views)
        require(frame_gap_steps >= 0, self.key("frame_gap_steps"), ">= 0", frame_gap_steps)
        if canonical_view not in CANONICAL_CHOICES:
            raise ConfigError(
                f"{self.key('canonical_view')} must be one of {CANONICAL_CHOICES}, got {canonical_view!r}"
            )
        self.num_views = num_views
        self.num_context_views = num_context
        self.max_zoom = max_zoom
        self.view_window = view_window
        self.window_steps = window_steps
        self.canonical_view = canonical_view
        self.with_cameras = with_cameras
        self.frame_gap, self.frame_gap_steps = frame_gap, frame_gap_steps
        self.eval_index = eval_index
        self._eval: EvalIndex | None = None
        self.eval_index_missing: int | None = None
        """Scenes of ``eval_index`` that the validation shards lack (after set-up; ``None``: not known)."""
        self._posed: dict[str, tuple[bool, str]] = {}  # split -> (every scene has cameras, what the shards hold)

    def _check_gap(self, frame_gap: Any, num_views: int) -> tuple[tuple[int, int], tuple[int, int]]:
        try:
            (a, b), (c, d) = ((int(x) for x in pair) for pair in frame_gap)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{self.key('frame_gap')} must be [[start_low, start_high], [end_low, end_high]], got {frame_gap!r}"
            ) from None
        if not (num_views - 1 <= a <= b and num_views - 1 <= c <= d):
            raise ConfigError(
                f"{self.key('frame_gap')} ranges must satisfy {self.key('num_views')} - 1 <= low <= high, got "
                f"{[[a, b], [c, d]]} with num_views={num_views}"
            )
        return (a, b), (c, d)

    def _read_eval_index(self) -> None:
        """Read ``eval_index``, check its view counts against ``num_views``, say what the validation shards hold."""
        index = read_eval_index(self.eval_index, self.key("eval_index"))  # type: ignore[arg-type]
        if (index.num_views, index.num_context) != (self.num_views, self.num_context_views):
            raise ConfigError(
                f"{self.key('eval_index')} scores {index.num_context} context + {index.num_target} target views per "
                f"scene: set {self.key('num_views')}={index.num_views} and {self.key('num_context_views')}="
                f"{index.num_context} (got {self.num_views} and {self.num_context_views})"
            )
        inventory = self.inventories.get("val")
        known = inventory is not None and not inventory.unknown
        line, self.eval_index_missing = index.report(inventory.keys if known else None)  # type: ignore[union-attr]
        rank_zero_info(line)
        self._eval = index

    def _check_summary(self, summary: ShardSummary, split: str) -> None:
        urls = self.key(f"{split}_urls")
        if not summary.multiview:
            raise ConfigError(
                f"{urls} holds single-view samples ({summary.where}): MultiViewShards reads multi-view scenes; "
                "use selfsup3d.datamodules.SingleViewShards for images"
            )
        if self.view_window is not None and summary.num_views < self.view_window[1]:
            raise ConfigError(
                f"{self.key('view_window')} ends at {self.view_window[1]} views but the scenes of {urls} have "
                f"{summary.num_views} ({summary.where}): render or convert more views per scene, or narrow it"
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
        if self.with_masks and not summary.has_masks:
            raise ConfigError(
                f"{self.key('with_masks')}=true but the scenes of {urls} have no masks ({summary.where}): set it to "
                "false or null"
            )
        inventory = self.inventories.get(split)
        if inventory is not None and not inventory.unknown and inventory.scenes:
            posed = inventory.with_cameras == inventory.scenes
            self._posed[split] = (posed, inventory.cameras_note())
        else:  # shards that are not local: their first sample tells
            note = "the first scene has cameras" if summary.has_cameras else f"no cameras.json in {summary.where}"
            self._posed[split] = (summary.has_cameras, note)

    def setup(self, stage: str | None = None) -> None:
        """The base's set-up, then ``with_cameras: null`` resolved (cameras when every scene of every split carries
        them); ``with_cameras: true`` on shards with unposed scenes is refused, naming them."""
        super().setup(stage)
        if (
            self.eval_index is not None
            and self._eval is None
            and self.val_urls is not None
            and "val" in self.inventories
        ):
            self._read_eval_index()
        unposed = {split: note for split, (posed, note) in self._posed.items() if not posed}
        if self.with_cameras is None:
            self.with_cameras = bool(self._posed) and not unposed
        elif self.with_cameras and unposed:
            split, note = next(iter(unposed.items()))
            raise ConfigError(
                f"{self.key('with_cameras')}=true but the scenes of {self.key(f'{split}_urls')} do not all carry "
                f"cameras.json ({note}): set it to null or false, or use posed scenes"
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
            has_cameras=bool(self.with_cameras),
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
            self.view_window,
            self.window_steps,
            StreamClock(self.batch_size, self.batches_per_epoch) if train else None,
            self.canonical_view,
            bool(self.with_cameras),
            self.frame_gap,
            self.frame_gap_steps,
            self._eval.views if self._eval is not None and not train else None,
        )

    def window_width(self, step: int) -> int | None:
        """The view window's width at ``step`` (``None`` without a window)."""
        return None if self.view_window is None else window_width(*self.view_window, self.window_steps, step)

    def _collate_fn(self) -> Collate:
        return Collate(BATCH_FIELDS, {"num_context": self.num_context_views})
