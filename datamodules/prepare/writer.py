"""Writing converted samples into shards: the converters' common driver (``docs/shard-format.md``).

A converter (one module per source format: :mod:`~selfsup3d.datamodules.prepare.blender`,
:mod:`~selfsup3d.datamodules.prepare.colmap`, :mod:`~selfsup3d.datamodules.prepare.images`) turns each scene or
image of its source into a :class:`Unit` in a worker process (an encoded record, or what was skipped and why);
:func:`pool_map` runs the workers behind a progress bar, :func:`write_units` writes the records with a
:class:`~selfsup3d.datamodules.format.ShardSink`, lists every skipped item in the :class:`ConvertReport` and
records the split in the output's ``info.json``. A new source is one module with its ``convert_<source>``
function on these pieces (and :mod:`~selfsup3d.datamodules.prepare.frames` for image files).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from selfsup3d.datamodules.format import ShardSink
from selfsup3d.errors import require


# ============================================================================ reporting
@dataclass
class ConvertReport:
    """What a conversion wrote and skipped (``skipped``: ``(what, why)``; ``notes``: ``(what, note)``)."""

    kind: str
    out: str
    split: str
    written: int = 0
    views: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""
    shards: int = 0
    class_names: list[str] | None = None

    def summary(self, limit: int = 20) -> str:
        """Human-readable summary: written samples and shards, skipped items with reasons, notes."""
        unit = "samples" if self.kind == "images" else "scenes"
        lines = [f"wrote {self.written} {unit}" + (f" ({self.views} views)" if self.kind != "images" else "")]
        lines[0] += f" to {self.shards} shard(s): {self.url}" if self.shards else " (no shards written)"
        if self.class_names is not None:
            lines.append(
                f"{len(self.class_names)} classes: {', '.join(self.class_names[:10])}"
                + (", ..." if len(self.class_names) > 10 else "")
            )
        for title, items in (("skipped", self.skipped), ("notes", self.notes)):
            if not items:
                continue
            lines.append(f"{title}: {len(items)}")
            for what, why in items[:limit]:
                lines.append(f"  {what}: {why}")
            if len(items) > limit:
                counts = Counter(_reason_kind(why) for _, why in items[limit:])
                lines.append(
                    f"  ... and {len(items) - limit} more: " + "; ".join(f"{n} x {r}" for r, n in counts.items())
                )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "written": self.written,
            "views": self.views,
            "shards": self.shards,
            "url": self.url,
            "skipped": len(self.skipped),
            "class_names": self.class_names,
        }


def _reason_kind(why: str) -> str:
    return why.split(":")[0].split("(")[0].strip()


@dataclass
class Unit:
    """One scene or image's result from a worker: a ShardWriter record (or None) plus what was skipped."""

    record: dict[str, Any] | None
    views: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)


# ============================================================================ driver
def pool_map(
    fn: Callable[[Any], Unit], jobs: Sequence[Any], workers: int | None, desc: str, progress: bool
) -> Iterable[Unit]:
    workers = len(os.sched_getaffinity(0)) if workers is None else max(1, workers)
    bar = tqdm(total=len(jobs), desc=desc, unit="item", disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                yield fn(job)
                bar.update()
        else:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(workers) as pool:
                for unit in pool.imap(fn, jobs, chunksize=1):
                    yield unit
                    bar.update()
    finally:
        bar.close()


def write_units(units: Iterable[Unit], report: ConvertReport, sink: ShardSink) -> ConvertReport:
    with sink:
        for unit in units:
            report.skipped.extend(unit.skipped)
            report.notes.extend(unit.notes)
            if unit.record is not None:
                sink.write(unit.record)
                report.written += 1
                report.views += unit.views
    report.shards = len(sink.shards)
    report.url = sink.url if report.shards else ""
    _update_info(Path(report.out), report)
    return report


def _update_info(out: Path, report: ConvertReport) -> None:
    path = out / "info.json"
    try:
        info = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        info = {}
    info.setdefault("format", "selfsup3d shards, see docs/shard-format.md")
    info.setdefault("splits", {})[report.split] = report.as_dict()
    path.write_text(json.dumps(info, indent=2))


def scene_dirs(src: Path, is_scene: Callable[[Path], bool], what: str) -> list[Path]:
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder")
    if is_scene(src):
        return [src]
    scenes = sorted(p for p in src.iterdir() if p.is_dir() and is_scene(p))
    if not scenes:
        raise FileNotFoundError(f"{src} holds no {what}, neither itself nor in its sub-folders")
    return scenes


def converter_options(
    max_size: int | None, max_views: int | None, min_views: int, background: Sequence[int], image_format: str
) -> dict[str, Any]:
    require(
        len(background) == 3 and all(0 <= int(c) <= 255 for c in background),
        "background",
        "three values in 0..255",
        list(background),
        ValueError,
    )
    require(max_size is None or max_size >= 8, "max_size", ">= 8", max_size, ValueError)
    return {
        "max_size": max_size,
        "max_views": max_views,
        "min_views": max(1, min_views),
        "background": tuple(int(c) for c in background),
        "image_format": image_format,
    }
