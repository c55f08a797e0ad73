"""Videos into unposed multi-view scenes, clips of frames in capture order: ``selfsup3d data convert video``.

Decoding is PyAV's (FFmpeg in its wheel: ``pip install 'selfsup3d[video]'``; torchvision no longer decodes
video). Each video is read once, in order: frames are resampled to ``fps`` by their timestamps (the first frame
at or after every ``1/fps`` step; a video slower than ``fps`` keeps all its frames, never a frame twice),
resized by FFmpeg's scaler to cover the clip size and centre-cropped, and cut into clips
(:mod:`~selfsup3d.datamodules.prepare.clips`: shot changes, still and near-duplicate clips). Videos that cannot
be opened (unsupported, damaged, an MP4 cut before its index) or hold no video stream are listed as skipped; a
video whose decoding fails part-way keeps the clips read before the failure (cut short, noted); one that ends
well before the duration its header gives is noted as truncated. Nothing stops the conversion.

``SRC`` is a video file, a folder (searched recursively for :data:`VIDEO_SUFFIXES`; other files are listed as
skipped) or a text file listing videos, one a line (relative to the list's folder; ``#`` comments). Shards are
written resumably and by parts (:mod:`~selfsup3d.datamodules.prepare.journal`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from selfsup3d.datamodules.prepare.clips import ClipCutter, ClipOptions, centre_crop, cover_size, unique_keys
from selfsup3d.datamodules.prepare.frames import capture_order_key
from selfsup3d.datamodules.prepare.journal import Job, Part, convert_journaled
from selfsup3d.datamodules.prepare.writer import ConvertReport, Unit
from selfsup3d.errors import require

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".flv", ".wmv",
                  ".ogv", ".3gp"}  # fmt: skip
"""File types a folder is searched for."""
LIST_SUFFIXES = {".txt", ".lst", ".list"}
"""A ``SRC`` file of these types is a list of videos."""


def _import_av() -> Any:
    try:
        import av
    except ImportError:
        raise ImportError(
            "convert video decodes with PyAV, which is not installed: pip install 'selfsup3d[video]' (or av)"
        ) from None
    av.logging.set_level(None)  # FFmpeg's own messages: the report says what went wrong, per file
    return av


def scaled_frame(frame: Any, size: tuple[int, int]) -> np.ndarray:
    """A decoded PyAV frame resized (FFmpeg's area scaler) to cover ``size`` and centre-cropped: ``[H, W, 3]``."""
    width, height = cover_size((frame.width, frame.height), size)
    rgb = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA").to_ndarray()
    return centre_crop(rgb, size)


def sampled_frames(container: Any, stream: Any, fps: float | None) -> Any:
    """The decoded frames of ``stream`` kept at ``fps`` (all of them for ``None``): ``(index, time, frame)``, where
    ``index`` counts the decoded frames and ``time`` is in seconds (``None`` when the frame has no timestamp)."""
    step = None if fps is None else 1.0 / fps
    due: float | None = None
    for index, frame in enumerate(container.decode(stream)):
        time = frame.time
        if step is not None and time is not None:
            if due is not None and time < due - 1e-6:
                continue
            due = (time if due is None else due) + step
            while due <= time + 1e-6:  # after a gap in the timestamps: no burst of frames
                due += step
        yield index, time, frame


def _video_unit(args: tuple[str, str, str, float | None, dict[str, Any]]) -> Unit:
    """One video into clips (a worker's job)."""
    path, name, key, fps, options = args
    opts = ClipOptions(**{**options, "size": tuple(options["size"])})
    unit = Unit()
    av = _import_av()
    try:
        container = av.open(path)
    except Exception as err:
        unit.skipped.append((name, f"unreadable video ({_describe(err)})"))
        return unit
    with container:
        if not container.streams.video:
            unit.skipped.append((name, "no video stream"))
            return unit
        stream = container.streams.video[0]
        stream.thread_count = 1  # one core per worker: the workers are the parallelism
        rate = float(stream.average_rate) if stream.average_rate else None
        meta = {"fps": round(min(fps, rate) if fps and rate else (fps or rate or 0.0), 4)}
        cutter = ClipCutter(name, "video", opts, unit, meta, key)
        time, read = None, 0
        try:
            for index, time, frame in sampled_frames(container, stream, fps):
                cutter.add(scaled_frame(frame, opts.size), index, time)
                read += 1
                if cutter.full:
                    break
        except Exception as err:  # a damaged or truncated stream: keep what was read before it
            where = f"{time:.2f} s" if time is not None else f"frame {read}"
            if read == 0:
                unit.skipped.append((name, f"unreadable video: no frame decodes ({_describe(err)})"))
                return unit
            unit.notes.append((name, f"cut short at {where}: decoding failed ({_describe(err)})"))
        cutter.close()
        duration = _duration(container, stream)
        if not cutter.full and duration and time is not None and time < duration - max(1.0, 0.1 * duration):
            unit.notes.append((name, f"truncated: frames end at {time:.2f} s of the {duration:.2f} s its header gives"))
        if read == 0:
            unit.skipped.append((name, "no frames"))
        elif not unit.records:
            unit.notes.append((name, cutter.why_none(f"{read} frame(s) at the target rate")))
    return unit


def _duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _describe(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"


def list_videos(src: Path) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """``(path, id)`` of the videos of ``src`` (a file, a folder or a list file) in sorted order, and the files
    left out with the reason.

    Raises:
        FileNotFoundError: ``src`` does not exist, or a folder holds no video.
    """
    if src.is_dir():
        found = sorted(
            (p for p in src.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(src).parts)),
            key=lambda p: capture_order_key(str(p.relative_to(src))),
        )
        videos = [(p, str(p.relative_to(src))) for p in found if p.suffix.lower() in VIDEO_SUFFIXES]
        others = [(str(p.relative_to(src)), f"{p.suffix.lower() or 'no extension'} file is not a video type")
                  for p in found if p.suffix.lower() not in VIDEO_SUFFIXES]  # fmt: skip
        if not videos:
            raise FileNotFoundError(f"{src} holds no videos ({', '.join(sorted(VIDEO_SUFFIXES))})")
        return videos, others
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist")
    if src.suffix.lower() in LIST_SUFFIXES:
        lines = [line.strip() for line in src.read_text().splitlines()]
        entries = [line for line in lines if line and not line.startswith("#")]
        if not entries:
            raise FileNotFoundError(f"{src} lists no videos")
        videos, missing = [], []
        for entry in entries:
            path = Path(entry) if Path(entry).is_absolute() else src.parent / entry
            (videos if path.is_file() else missing).append((path, entry))
        return videos, [(entry, "listed but not found") for _, entry in missing]
    return [(src, src.name)], []


def convert_video(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    split: str = "train",
    fps: float | None = 10.0,
    clips: ClipOptions | None = None,
    scenes_per_shard: int = 64,
    part: Part | str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ConvertReport:
    """Convert videos into unposed multi-view scenes (clips of frames in capture order), resumably and by parts.

    Args:
        src: a video file, a folder of videos (recursive) or a text file listing them.
        out: output folder.
        split: shard name prefix.
        fps: target frame rate (``None``: every frame).
        clips: clip length, size, format and the shot, still and duplicate tests
            (:class:`~selfsup3d.datamodules.prepare.clips.ClipOptions`; its defaults when ``None``).
        scenes_per_shard: clips per tar shard.
        part: ``"i/n"`` or a :class:`~selfsup3d.datamodules.prepare.journal.Part`: convert only this part.
        workers: processes (all cores when ``None``).
        overwrite: discard this part's earlier output and start over (otherwise an interrupted run resumes).
        progress: show a progress bar.
    """
    require(fps is None or fps > 0, "fps", "> 0", fps, ValueError)
    _import_av()
    options = clips or ClipOptions()
    videos, others = list_videos(Path(src))
    names = [name for _, name in videos]
    if len(set(names)) != len(names):
        raise ValueError(f"{src} lists a video twice: {sorted({n for n in names if names.count(n) > 1})[:5]}")
    keys = unique_keys(names)
    jobs = [Job(name, (str(path), name, key, fps, options.as_dict())) for (path, name), key in zip(videos, keys)]
    part = part if isinstance(part, Part) else Part.parse(part)
    return convert_journaled(
        "video",
        jobs,
        _video_unit,
        out,
        split,
        part,
        {**options.as_dict(), "fps": fps},
        scenes_per_shard,
        workers=workers,
        overwrite=overwrite,
        progress=progress,
        skipped=others if part.index == 1 else (),  # listed once, by the first part
    )
