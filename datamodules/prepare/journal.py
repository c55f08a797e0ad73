"""Conversions that resume after an interruption and split across machines (``--part i/n``), for any converter.

A converter lists its inputs as **jobs** in a fixed order (sorted paths), each with an id (a relative path), and
turns each job into a :class:`~selfsup3d.datamodules.prepare.writer.Unit` in a worker: zero or more records (a
video gives one per clip), what it skipped and dropped. :func:`convert_journaled` runs the jobs behind a
progress bar and writes the records in job order into shards of a fixed number of samples, so the shards are a
pure function of the job list and the options (converters encode deterministically):

* **Parts.** :class:`Part` ``i`` of ``n`` (1-based, ``--part 3/8``; a SLURM array ``--array=1-8`` passes
  ``--part ${SLURM_ARRAY_TASK_ID}/8``) takes every ``n``-th job of the sorted list from the ``i``-th and writes
  its own shards, ``SPLIT-part3of8-000000.tar``, ..., beside the others' (``SPLIT-*.tar`` names them all), its
  own journal and its own entry in ``info.json``. The parts together hold every input once.
* **Resume.** A shard is written as ``NAME.tar.partial`` and renamed to ``NAME.tar`` when it is full; then the
  journal ``OUT/PREFIX.journal.json`` records where the record stream stands: the next job, how many of its
  records are already in shards, and what the jobs before it skipped and dropped. A re-run with the same inputs
  and options continues from there (the partial shard is discarded, the job in progress converted again and its
  records already in shards dropped), so it ends with the same shards, byte for byte, as a run never
  interrupted. A re-run on finished output changes nothing and prints the summary again; a re-run with other
  options or other inputs is refused (``overwrite`` starts over).

A new converter uses it as :mod:`~selfsup3d.datamodules.prepare.video` does::

    jobs = [Job(relative_path, args) for ...]                 # sorted, ids unique
    return convert_journaled("video", jobs, _video_unit, out, split, part, options, samples_per_shard,
                             workers=workers, overwrite=overwrite, progress=progress)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds

from selfsup3d.datamodules.format import check_key, shard_pattern
from selfsup3d.datamodules.prepare.writer import ConvertReport, Unit, converter_options, pool_map, update_info

JOURNAL_VERSION = 1
_PART_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Part:
    """Part ``index`` (1-based) of ``count`` of a conversion: every ``count``-th job from the ``index``-th."""

    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> Part:
        """``"3/8"`` -> part 3 of 8; ``None`` or ``""`` -> the whole conversion.

        Raises:
            ValueError: not ``i/n`` with ``1 <= i <= n``.
        """
        if not text:
            return cls()
        match = _PART_RE.match(text)
        if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
            raise ValueError(f"--part must be i/n with 1 <= i <= n (e.g. 3/8 for the third of 8 parts), got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    def select(self, jobs: Sequence[Job]) -> list[Job]:
        """This part's jobs (all of them for a whole conversion)."""
        return list(jobs[self.index - 1 :: self.count])

    def prefix(self, split: str) -> str:
        """Shard name prefix: ``split`` for a whole conversion, ``split-part3of8`` for a part."""
        return split if self.count == 1 else f"{split}-part{self.index}of{self.count}"


@dataclass(frozen=True)
class Job:
    """One input of a conversion: ``id`` (unique, stable: a path relative to the source) and what the worker
    function gets (``args``, picklable)."""

    id: str
    args: Any


@dataclass
class _Position:
    """Where the record stream stands after the last finished shard."""

    job: int = 0  # index (in this part's jobs) of the job whose records go on next
    records: int = 0  # records of that job already in shards
    shards: int = 0  # finished shards
    written: int = 0
    views: int = 0


class _Journal:
    """``OUT/PREFIX.journal.json``: the inputs and options of a conversion and its position, rewritten atomically."""

    def __init__(self, out: Path, prefix: str, kind: str, inputs: list[str], options: Mapping[str, Any]) -> None:
        self.path = out / f"{prefix}.journal.json"
        self.kind, self.prefix = kind, prefix
        self.inputs = hashlib.sha256("\n".join(inputs).encode()).hexdigest()
        self.num_inputs = len(inputs)
        self.options = json.loads(json.dumps(dict(options), default=str))  # as it reads back

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # a journal cut by a crash while it was written: os.replace makes that unlikely
            return None

    def mismatch(self, saved: Mapping[str, Any]) -> str | None:
        """What differs between this conversion and the journal's (``None`` when they are the same)."""
        if saved.get("version") != JOURNAL_VERSION or saved.get("kind") != self.kind:
            return f"it was written by another converter or version ({saved.get('kind')}, v{saved.get('version')})"
        if saved.get("options") != self.options:
            old, new = saved.get("options", {}), self.options
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            return "other options: " + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        if saved.get("inputs") != self.inputs:
            return f"other inputs ({saved.get('num_inputs')} then, {self.num_inputs} now, or other files)"
        return None

    def write(self, position: _Position, report: ConvertReport, complete: bool) -> None:
        state = {
            "version": JOURNAL_VERSION,
            "kind": self.kind,
            "prefix": self.prefix,
            "options": self.options,
            "inputs": self.inputs,
            "num_inputs": self.num_inputs,
            "position": vars(position),
            "skipped": report.skipped,
            "notes": report.notes,
            "dropped": report.dropped,
            "complete": complete,
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.path)


def _shards_of(out: Path, prefix: str) -> list[Path]:
    return sorted(out.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))


def _remove_output(out: Path, prefix: str, keep_shards: int = 0) -> None:
    """Remove the shards of ``prefix`` from number ``keep_shards`` on and every partial one."""
    for path in _shards_of(out, prefix)[keep_shards:]:
        path.unlink()
    for path in out.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar.partial"):
        path.unlink()


class _ShardStream:
    """Writes records into ``PREFIX-NNNNNN.tar.partial`` and renames each shard once it holds ``per_shard``
    records or ``max_bytes`` bytes, calling ``on_shard`` after the rename (the journal is written there)."""

    def __init__(self, out: Path, prefix: str, first: int, per_shard: int, max_bytes: float) -> None:
        self.out, self.prefix, self.index = out, prefix, first
        self.per_shard, self.max_bytes = per_shard, max_bytes
        self._stream: Any = None
        self._writer: wds.TarWriter | None = None
        self._count = 0

    def _path(self, index: int) -> Path:
        return self.out / f"{self.prefix}-{index:06d}.tar"

    def write(self, record: Mapping[str, Any]) -> bool:
        """Write one record; ``True`` when that finished a shard."""
        if self._writer is None:
            self._stream = open(self._path(self.index).with_suffix(".tar.partial"), "wb")  # noqa: SIM115
            # a fixed integer mtime: identical records give identical bytes (see format.ShardSink)
            self._writer = wds.TarWriter(self._stream, mtime=0)
            self._count = 0
        self._writer.write(dict(record))
        self._count += 1
        if self._count >= self.per_shard or self._stream.tell() >= self.max_bytes:
            self.finish()
            return True
        return False

    def finish(self) -> None:
        """Close and rename the shard being written (nothing when none is open)."""
        if self._writer is None:
            return
        self._writer.close()  # closes the stream too
        partial = self._path(self.index).with_suffix(".tar.partial")
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, self._path(self.index))
        self._writer = None
        self.index += 1


def convert_journaled(
    kind: str,
    jobs: Sequence[Job],
    fn: Callable[[Any], Unit],
    out: str | os.PathLike[str],
    split: str = "train",
    part: Part | None = None,
    options: Mapping[str, Any] | None = None,
    samples_per_shard: int = 16,
    max_shard_bytes: float = 1e9,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    skipped: Sequence[tuple[str, str]] = (),
) -> ConvertReport:
    """Run ``fn`` over this part's ``jobs`` and write their records into shards, resumably (module docstring).

    Args:
        kind: the converter's name (``video``), for the report, the journal and ``info.json``.
        jobs: every input of the conversion (all parts), in a fixed order, ids unique.
        fn: ``Job.args -> Unit``, run in worker processes (a picklable top-level function).
        out: output folder.
        split: shard name prefix (``train``); a part adds ``-part{i}of{n}``.
        part: which part this run converts (``None``: all).
        options: what determines the output besides the inputs (sizes, rates, formats): a resumed run must
            give the same.
        samples_per_shard: records per shard.
        max_shard_bytes: ... or start a new shard once one reaches this size.
        workers: processes (all cores when ``None``).
        overwrite: discard this part's earlier shards and journal and start over.
        progress: show a progress bar.
        skipped: inputs the converter left out before any job ran (``(what, why)``), listed in the report.

    Returns:
        The report of the whole part (also of what an interrupted earlier run wrote).

    Raises:
        FileExistsError: shards of this prefix without a journal, or a journal of other inputs or options,
            unless ``overwrite``.
    """
    part = part or Part()
    check_key(split)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    ids = [job.id for job in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{kind}: job ids must be unique")
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    prefix = part.prefix(split)
    mine = part.select(jobs)
    settings = dict(options or {}, samples_per_shard=samples_per_shard, max_shard_bytes=max_shard_bytes)
    journal = _Journal(out_path, prefix, kind, [job.id for job in mine], settings)
    report = ConvertReport(kind, str(out_path), prefix)
    report.skipped.extend(skipped)
    saved = None if overwrite else journal.read()
    if overwrite:
        _remove_output(out_path, prefix)
        journal.path.unlink(missing_ok=True)
    elif saved is None and (_shards_of(out_path, prefix) or list(out_path.glob(f"{prefix}-*.tar.partial"))):
        raise FileExistsError(
            f"{out_path} already holds '{prefix}' shards but no journal of them ({journal.path.name}); choose "
            "another folder or start over (--overwrite)"
        )
    elif saved is not None and (why := journal.mismatch(saved)):
        raise FileExistsError(
            f"{journal.path} is the journal of another conversion into {out_path} ({why}); resume it with the same "
            "inputs and options, choose another folder, or start over (--overwrite)"
        )
    position = _Position()
    if saved is not None:
        position = _Position(**saved["position"])
        report.skipped = [tuple(x) for x in saved["skipped"]]  # type: ignore[misc]
        report.notes = [tuple(x) for x in saved["notes"]]  # type: ignore[misc]
        report.dropped = dict(saved["dropped"])
        report.written, report.views = position.written, position.views
        if saved.get("complete"):
            return _finished(report, out_path, prefix, position, write_info=False)
        _remove_output(out_path, prefix, keep_shards=position.shards)
    stream = _ShardStream(out_path, prefix, position.shards, samples_per_shard, max_shard_bytes)
    first, drop = position.job, position.records
    units = pool_map(fn, [job.args for job in mine[first:]], workers, f"convert {kind}", progress, done=first)
    for j, unit in enumerate(units, start=first):
        for r, record in enumerate(unit.all_records()):
            if j == first and r < drop:
                continue  # already in a shard written before the interruption
            finished = stream.write(record)
            position.written += 1
            if finished:  # the journal points at the next record: job j's record r + 1
                position.job, position.records, position.shards = j, r + 1, stream.index
                report.written, report.views = position.written, position.views
                journal.write(position, report, complete=False)
        report.add(unit)
        position.views += unit.views
    stream.finish()
    position.job, position.records, position.shards = len(mine), 0, stream.index
    report.written, report.views = position.written, position.views
    journal.write(position, report, complete=True)
    return _finished(report, out_path, prefix, position, write_info=True)


def _finished(report: ConvertReport, out: Path, prefix: str, position: _Position, write_info: bool) -> ConvertReport:
    report.shards = position.shards
    report.url = shard_pattern(out, prefix, position.shards) if position.shards else ""
    if write_info:
        update_info(out, report)
    return report


@dataclass(frozen=True)
class SceneOptions:
    """What the converters of posed scenes (``convert re10k|lvsm|dl3dv|co3d``) write: at most ``max_size`` pixels
    on the longer side (intrinsics follow), at most ``max_views`` views per scene (evenly spread), scenes with
    fewer than ``min_views`` usable views skipped, re-encoded images as ``image_format`` (others copied),
    ``scenes_per_shard`` scenes per tar shard."""

    max_size: int | None = None
    max_views: int | None = None
    min_views: int = 2
    image_format: str = "jpg"
    scenes_per_shard: int = 16


@dataclass(frozen=True)
class RunOptions:
    """How a conversion runs: only ``part`` (``"i/n"`` or a :class:`Part`), in ``workers`` processes (all cores
    when ``None``), starting over with ``overwrite`` (otherwise an interrupted run resumes), with a progress bar."""

    part: Part | str | None = None
    workers: int | None = None
    overwrite: bool = False
    progress: bool = True


def convert_scenes(
    kind: str,
    inputs: Sequence[tuple[str, Any]],
    fn: Callable[[Any], Unit],
    out: str | os.PathLike[str],
    split: str,
    scenes: SceneOptions | None = None,
    run: RunOptions | None = None,
    extra: Mapping[str, Any] | None = None,
    skipped: Sequence[tuple[str, str]] = (),
) -> ConvertReport:
    """:func:`convert_journaled` for a converter of posed scenes: ``inputs`` are ``(id, args)`` in a fixed order;
    ``fn`` gets ``(args, options)``, the options a dict of ``scenes`` (see
    :func:`~selfsup3d.datamodules.prepare.writer.converter_options`) and ``extra`` (the converter's own, which a
    resumed run must repeat too); ``skipped`` is listed by the first part only."""
    scenes, run = scenes or SceneOptions(), run or RunOptions()
    opts = converter_options(scenes.max_size, scenes.max_views, scenes.min_views, (0, 0, 0), scenes.image_format)
    opts.update(extra or {})
    part = run.part if isinstance(run.part, Part) else Part.parse(run.part)
    jobs = [Job(name, (args, opts)) for name, args in inputs]
    return convert_journaled(kind, jobs, fn, out, split, part, opts, scenes.scenes_per_shard, workers=run.workers,
                             overwrite=run.overwrite, progress=run.progress,
                             skipped=skipped if part.index == 1 else ())  # fmt: skip
