"""Clips of frames in capture order as unposed scenes: what ``convert video`` and ``convert frames`` share.

A source (:mod:`~selfsup3d.datamodules.prepare.video`, :mod:`~selfsup3d.datamodules.prepare.sequences`) feeds
the frames of one input, already resampled to the target rate and resized and centre-cropped to the clip size,
into a :class:`ClipCutter`, which cuts them into clips of ``clip_frames`` consecutive frames and encodes each
kept clip as one unposed multi-view scene (no ``cameras.json``; views ``000.jpg``, ... in capture order, so the
view-overlap curriculum of :class:`~selfsup3d.datamodules.MultiViewShards` picks windows of neighbouring frames):

* **shot changes** split clips: a frame whose small grey thumbnail differs from the previous frame's by more than
  ``shot_threshold`` (mean absolute difference, 0-255) starts a new clip; the frames before it that do not fill
  a clip are dropped (counted as ``frames before a shot change``);
* **still clips** (every frame within ``still_threshold`` of the first) and **near-duplicate clips** (within
  ``duplicate_threshold`` of an earlier kept clip of the same input, frame by frame) are dropped and counted;
* consecutive clips do not overlap; ``max_clips`` keeps the first clips of an input (and its source stops
  decoding there).

Encoding is deterministic (Pillow's JPEG/WebP encoders), so a converted input gives the same bytes every time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from selfsup3d.datamodules.format import EncodedImage, Scene, encode_rgb, encode_scene, make_key
from selfsup3d.datamodules.prepare.writer import Unit
from selfsup3d.errors import require

THUMBNAIL = 32
"""Side of the grey thumbnails the shot, still and duplicate tests compare."""


@dataclass(frozen=True)
class ClipOptions:
    """How frames become clips (see the module docstring).

    Args:
        clip_frames: frames (views) per clip.
        size: ``(width, height)`` of the stored views (frames are resized to cover it and centre-cropped).
        max_clips: keep at most this many clips per input (the first ones); ``None``: all.
        image_format: ``jpg`` or ``webp`` (or ``png``).
        quality: JPEG/WebP quality.
        shot_threshold: a larger thumbnail difference between consecutive frames is a shot change (0: none).
        still_threshold: a clip whose frames all stay within this of its first frame is still (0: keep all).
        duplicate_threshold: a clip within this of an earlier kept clip of the same input is a near-duplicate
            (0: keep all).
    """

    clip_frames: int = 24
    size: tuple[int, int] = (256, 256)
    max_clips: int | None = None
    image_format: str = "jpg"
    quality: int = 90
    shot_threshold: float = 40.0
    still_threshold: float = 1.5
    duplicate_threshold: float = 2.0

    def __post_init__(self) -> None:
        require(self.clip_frames >= 2, "clip_frames", ">= 2", self.clip_frames, ValueError)
        require(min(self.size) >= 8, "size", "at least 8 pixels a side", list(self.size), ValueError)
        require(self.max_clips is None or self.max_clips >= 1, "max_clips", ">= 1", self.max_clips, ValueError)
        require(self.image_format in ("jpg", "webp", "png"), "image_format", "jpg, webp or png", self.image_format,
                ValueError)  # fmt: skip
        require(1 <= self.quality <= 100, "quality", "in 1..100", self.quality, ValueError)
        for name in ("shot_threshold", "still_threshold", "duplicate_threshold"):
            require(getattr(self, name) >= 0, name, ">= 0", getattr(self, name), ValueError)

    def as_dict(self) -> dict[str, Any]:
        """The options as plain data (what a resumed conversion must repeat)."""
        return {**asdict(self), "size": list(self.size)}


def unique_keys(names: list[str]) -> list[str]:
    """A sample-key prefix per input name (:func:`~selfsup3d.datamodules.format.make_key`), made unique with a
    number where two names give one key (``a b.mp4`` and ``a-b.mp4``)."""
    keys, used = [], set()
    for name in names:
        key = base = make_key(name)
        n = 1
        while key in used:
            n += 1
            key = f"{base}-{n}"
        used.add(key)
        keys.append(key)
    return keys


def parse_size(text: str) -> tuple[int, int]:
    """``"256"`` -> ``(256, 256)``; ``"320x180"`` -> ``(320, 180)`` (width x height).

    Raises:
        ValueError: anything else.
    """
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values, default=0) < 1:
        raise ValueError(f"a size is N or WxH in pixels (e.g. 256 or 320x180), got {text!r}")
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def cover_size(src: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """The ``(width, height)`` that ``src`` is resized to so that it covers ``size`` keeping its aspect ratio."""
    scale = max(size[0] / src[0], size[1] / src[1])
    return max(size[0], round(src[0] * scale)), max(size[1], round(src[1] * scale))


def centre_crop(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The centre ``(width, height)`` window of an ``[H, W, 3]`` array that covers it."""
    h, w = rgb.shape[:2]
    x0, y0 = (w - size[0]) // 2, (h - size[1]) // 2
    return np.ascontiguousarray(rgb[y0 : y0 + size[1], x0 : x0 + size[0]])


def thumbnail(rgb: np.ndarray) -> np.ndarray:
    """A ``THUMBNAIL``-pixel grey float32 thumbnail (box filter) of an ``[H, W, 3]`` uint8 frame."""
    grey = Image.fromarray(rgb).convert("L").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX)
    return np.asarray(grey, dtype=np.float32)


class ClipCutter:
    """Cuts the frames of one input into clips and encodes the kept ones into ``unit.records``.

    Args:
        name: the input's id (a relative path), in keys and messages.
        source: ``meta.json`` ``source`` (``video``, ``frames``).
        options: the clip options.
        unit: the input's result, which gets the records, the views and the dropped counts.
        meta: more ``meta.json`` content for every clip (e.g. the frame rate).
        key: the clips' key prefix (``make_key(name)`` by default); clip ``i`` is ``KEY_000i``.
    """

    def __init__(
        self,
        name: str,
        source: str,
        options: ClipOptions,
        unit: Unit,
        meta: Mapping[str, Any] | None = None,
        key: str | None = None,
    ) -> None:
        self.name, self.source, self.opts, self.unit = name, source, options, unit
        self.meta = dict(meta or {})
        self.key = key or make_key(name)
        self._frames: list[tuple[bytes, np.ndarray, int, float | None]] = []  # encoded, thumbnail, index, time
        self._previous: np.ndarray | None = None
        self._kept: list[np.ndarray] = []  # thumbnails [F, T, T] of the kept clips
        self.clips = 0  # clips cut (kept or dropped)

    @property
    def full(self) -> bool:
        """``max_clips`` clips are kept: the source can stop."""
        return self.opts.max_clips is not None and len(self._kept) >= self.opts.max_clips

    def add(self, rgb: np.ndarray, index: int, time: float | None = None) -> None:
        """The next frame: ``[H, W, 3]`` uint8 at the clip size, its index in the input and time in seconds."""
        thumb = thumbnail(rgb)
        shot = self._previous is not None and self.opts.shot_threshold > 0
        if shot and float(np.abs(thumb - self._previous).mean()) > self.opts.shot_threshold:
            self.break_clip("frames before a shot change")
        self._previous = thumb
        data = encode_rgb(rgb, self.opts.image_format, self.opts.quality)
        self._frames.append((data, thumb, index, time))
        if len(self._frames) == self.opts.clip_frames:
            self._finish_clip()

    def break_clip(self, reason: str) -> None:
        """Drop the frames of the clip being filled (counted under ``reason``); the next frame starts a clip."""
        if self._frames:
            self.unit.drop(reason, len(self._frames))
        self._frames = []
        self._previous = None

    def close(self) -> None:
        """The input ended: frames that do not fill a clip are dropped (counted)."""
        if self._frames:
            self.unit.drop("frames after the last whole clip", len(self._frames))
        self._frames = []

    def why_none(self, frames: str) -> str:
        """Why an input gave no clip (``frames``: how many frames it had), for the report's notes."""
        if self.clips:
            return f"no clip kept: all {self.clips} still or near-duplicates ({frames})"
        return f"no clip: {frames}, a clip needs {self.opts.clip_frames} without a shot change"

    def _finish_clip(self) -> None:
        frames, self._frames = self._frames, []
        self.clips += 1
        thumbs = np.stack([f[1] for f in frames])
        if self.opts.still_threshold > 0 and float(np.abs(thumbs - thumbs[0]).mean(axis=(1, 2)).max()) < (
            self.opts.still_threshold
        ):
            self.unit.drop("still clip")
            return
        if self.opts.duplicate_threshold > 0 and any(
            float(np.abs(thumbs - kept).mean()) < self.opts.duplicate_threshold for kept in self._kept
        ):
            self.unit.drop("near-duplicate clip")
            return
        clip = len(self._kept)
        self._kept.append(thumbs)
        key = f"{self.key}_{clip:04d}"
        ext = self.opts.image_format
        times = [f[3] for f in frames]
        meta = {
            "source": self.source,
            "scene_id": key,
            "label": -1,
            "input": self.name,
            "clip": clip,
            "frames": [f[2] for f in frames],
            **({"times": [round(t, 4) for t in times]} if all(t is not None for t in times) else {}),  # type: ignore[arg-type]
            **self.meta,
        }
        scene = Scene(key, [EncodedImage(f[0], ext) for f in frames], meta=meta)
        self.unit.records.append(encode_scene(scene))
        self.unit.views += len(frames)
