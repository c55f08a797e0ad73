"""Folders of ordered frames into unposed multi-view scenes: ``selfsup3d data convert frames``.

``SRC`` is one sequence (a folder of images) or a folder of sequences (each sub-folder that holds images, at
any depth). A sequence's images are its frames in natural order (``frame_2`` before ``frame_10``,
:func:`~selfsup3d.datamodules.prepare.frames.capture_order_key`); ``stride`` keeps every ``stride``-th (the
frame-rate resampling of a sequence without timestamps: ``source_fps / fps``). Frames are resized to cover the
clip size and centre-cropped (Pillow), then cut into clips as videos are
(:mod:`~selfsup3d.datamodules.prepare.clips`: shot changes, still and near-duplicate clips). An unreadable image
is listed as skipped and ends the clip being filled (the frames on either side of it are not neighbours).
Shards are written resumably and by parts (:mod:`~selfsup3d.datamodules.prepare.journal`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from selfsup3d.datamodules.prepare.clips import ClipCutter, ClipOptions, unique_keys
from selfsup3d.datamodules.prepare.frames import IMAGE_SUFFIXES, capture_order_key
from selfsup3d.datamodules.prepare.journal import Job, Part, convert_journaled
from selfsup3d.datamodules.prepare.writer import ConvertReport, Unit
from selfsup3d.errors import require


def _images(folder: Path) -> list[Path]:
    """The images directly in ``folder``, in capture order (hidden files left out)."""
    found = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted((p for p in found if not p.name.startswith(".")), key=lambda p: capture_order_key(p.name))


def list_sequences(src: Path) -> list[tuple[Path, str]]:
    """``(folder, id)`` of the sequences of ``src``: itself when it holds images, else every folder below it
    that does, sorted (natural order of the relative paths).

    Raises:
        FileNotFoundError: ``src`` is not a folder or holds no images.
    """
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder")
    if _images(src):
        return [(src, src.resolve().name)]
    folders = [
        p
        for p in src.rglob("*")
        if p.is_dir() and not any(x.startswith(".") for x in p.relative_to(src).parts) and _images(p)
    ]
    if not folders:
        raise FileNotFoundError(f"{src} holds no frames ({', '.join(sorted(IMAGE_SUFFIXES))}) in it or below it")
    folders.sort(key=lambda p: capture_order_key(str(p.relative_to(src))))
    return [(p, str(p.relative_to(src))) for p in folders]


def _sequence_unit(args: tuple[str, str, str, int, float | None, dict[str, Any]]) -> Unit:
    """One sequence into clips (a worker's job)."""
    folder, name, key, stride, fps, options = args
    opts = ClipOptions(**{**options, "size": tuple(options["size"])})
    unit = Unit()
    meta = {"fps": fps} if fps else {}
    cutter = ClipCutter(name, "frames", opts, unit, meta, key)
    frames = _images(Path(folder))[::stride]
    for i, path in enumerate(frames):
        try:
            with Image.open(path) as image:
                image.draft("RGB", opts.size)  # JPEG: decode at a reduced scale when that still covers the size
                rgb = np.asarray(ImageOps.fit(image.convert("RGB"), opts.size, Image.Resampling.BILINEAR))
        except Exception as err:
            unit.skipped.append((f"{name}/{path.name}", f"unreadable image ({type(err).__name__}: {err})"))
            cutter.break_clip("frames beside an unreadable one")
            continue
        cutter.add(rgb, i * stride, i / fps if fps else None)
        if cutter.full:
            break
    cutter.close()
    if not unit.records:
        unit.notes.append((name, cutter.why_none(f"{len(frames)} frame(s) after the stride")))
    return unit


def convert_frames(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    split: str = "train",
    stride: int = 1,
    fps: float | None = None,
    clips: ClipOptions | None = None,
    scenes_per_shard: int = 64,
    part: Part | str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ConvertReport:
    """Convert folders of ordered frames into unposed multi-view scenes (clips), resumably and by parts.

    Args:
        src: a folder of frames or a folder of such folders.
        out: output folder.
        split: shard name prefix.
        stride: keep every ``stride``-th frame.
        fps: the frame rate of the kept frames, when known (recorded in ``meta.json`` with frame times).
        clips: clip length, size, format and the shot, still and duplicate tests
            (:class:`~selfsup3d.datamodules.prepare.clips.ClipOptions`; its defaults when ``None``).
        scenes_per_shard: clips per tar shard.
        part: ``"i/n"`` or a :class:`~selfsup3d.datamodules.prepare.journal.Part`: convert only this part.
        workers: processes (all cores when ``None``).
        overwrite: discard this part's earlier output and start over (otherwise an interrupted run resumes).
        progress: show a progress bar.
    """
    require(stride >= 1, "stride", ">= 1", stride, ValueError)
    require(fps is None or fps > 0, "fps", "> 0", fps, ValueError)
    options = clips or ClipOptions()
    sequences = list_sequences(Path(src))
    keys = unique_keys([name for _, name in sequences])
    jobs = [
        Job(name, (str(folder), name, key, stride, fps, options.as_dict()))
        for (folder, name), key in zip(sequences, keys)
    ]
    return convert_journaled(
        "frames",
        jobs,
        _sequence_unit,
        out,
        split,
        part if isinstance(part, Part) else Part.parse(part),
        {**options.as_dict(), "stride": stride, "fps": fps},
        scenes_per_shard,
        workers=workers,
        overwrite=overwrite,
        progress=progress,
    )
