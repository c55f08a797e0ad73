"""Writing converted samples into shards: the converters' common driver (``docs/shard-format.md``).

A converter (one module per source format: :mod:`~selfsup3d.datamodules.prepare.blender`,
:mod:`~selfsup3d.datamodules.prepare.colmap`, :mod:`~selfsup3d.datamodules.prepare.images`) turns each scene or
image of its source into a :class:`Unit` in a worker process (an encoded record, or what was skipped and why);
:func:`pool_map` runs the workers behind a progress bar, :func:`write_units` writes the records with a
:class:`~selfsup3d.datamodules.format.ShardSink`, lists every skipped item in the :class:`ConvertReport` and
records the split in the output's ``info.json``. A new source is one module with its ``convert_<source>``
function on these pieces (and :mod:`~selfsup3d.datamodules.prepare.frames` for image files); one that must
resume after an interruption and split across machines writes through
:func:`~selfsup3d.datamodules.prepare.journal.convert_journaled` instead of :func:`write_units`.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    dropped: dict[str, int] = field(default_factory=dict)
    """What was left out on purpose, counted by reason (``still clip``: 3); see :attr:`Unit.dropped`."""

    def summary(self, limit: int = 20) -> str:
        """Human-readable summary: written samples and shards, skipped items with reasons, notes."""
        unit = "samples" if self.kind == "images" else "scenes"
        lines = [f"wrote {self.written} {unit}" + (f" ({self.views} views)" if self.kind != "images" else "")]
        lines[0] += f" to {self.shards} shard(s): {self.url}" if self.shards else " (no shards written)"
        if self.dropped:
            lines.append("dropped: " + ", ".join(f"{n} x {reason}" for reason, n in sorted(self.dropped.items())))
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
            "dropped": dict(self.dropped),
            "class_names": self.class_names,
        }

    def add(self, unit: Unit) -> None:
        """Count what ``unit`` skipped, noted and dropped (its records are counted as they are written)."""
        self.skipped.extend(unit.skipped)
        self.notes.extend(unit.notes)
        for reason, n in unit.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + n


def _reason_kind(why: str) -> str:
    return why.split(":")[0].split("(")[0].strip()


@dataclass
class Unit:
    """One input's result from a worker: its ShardWriter record (a scene or an image; ``None`` when skipped) or,
    for an input that gives several samples (a video's clips), its ``records``; the views they hold; what was
    skipped and noted; and ``dropped``: samples left out on purpose, counted by reason (``still clip``)."""

    record: dict[str, Any] | None = None
    views: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)

    def all_records(self) -> list[dict[str, Any]]:
        """``record`` (when set) and ``records``, in order."""
        return ([self.record] if self.record is not None else []) + self.records

    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` samples left out for ``reason``."""
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def absorb(self, other: Unit) -> None:
        """Add ``other``'s records (after this unit's), views, skipped items, notes and drops: an input that holds
        several scenes (a RE10K chunk, a CO3D category) gathers one unit per scene."""
        self.records.extend(other.all_records())
        self.views += other.views
        self.skipped.extend(other.skipped)
        self.notes.extend(other.notes)
        for reason, n in other.dropped.items():
            self.drop(reason, n)


# ============================================================================ driver
def pool_map(
    fn: Callable[[Any], Unit], jobs: Sequence[Any], workers: int | None, desc: str, progress: bool, done: int = 0
) -> Iterable[Unit]:
    """``fn`` over ``jobs`` in worker processes (all cores when ``workers`` is ``None``), results in job order,
    behind a progress bar (``done``: jobs finished before these, e.g. by an interrupted run)."""
    workers = len(os.sched_getaffinity(0)) if workers is None else max(1, workers)
    bar = tqdm(total=done + len(jobs), initial=done, desc=desc, unit="item", disable=not progress, dynamic_ncols=True)
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
            report.add(unit)
            for record in unit.all_records():
                sink.write(record)
                report.written += 1
            report.views += unit.views
    report.shards = len(sink.shards)
    report.url = sink.url if report.shards else ""
    update_info(Path(report.out), report)
    return report


def update_info(out: Path, report: ConvertReport) -> None:
    """Record the split in ``out/info.json``, under a lock file: parts of one conversion on several machines
    (:mod:`~selfsup3d.datamodules.prepare.journal`) may finish at once."""
    path = out / "info.json"
    with _locked(out / "info.json.lock"):
        try:
            info = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            info = {}
        info.setdefault("format", "selfsup3d shards, see docs/shard-format.md")
        info.setdefault("splits", {})[report.split] = report.as_dict()
        tmp = path.with_name(f"info.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, path)


@contextlib.contextmanager
def _locked(lock: Path, stale_s: float = 60.0) -> Iterator[None]:
    """Hold ``lock`` (created exclusively, which shared file systems honour); a lock older than ``stale_s``
    seconds was left by a killed process and is taken over."""
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                if time.time() - lock.stat().st_mtime > stale_s:
                    lock.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
    try:
        yield
    finally:
        os.close(fd)
        lock.unlink(missing_ok=True)


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
