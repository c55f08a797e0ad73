"""WebDataset plumbing shared by the datamodules: URLs, shard opening, equal epochs on every rank, bad samples.

Training reads **resampled** shards (:class:`~selfsup3d.datamodules.resumable.ResampledUrls`, seeded per rank,
worker and epoch) and the loader counts ``batches_per_epoch`` batches
(:class:`~selfsup3d.datamodules.resumable.ResumableLoader`), so every rank runs the same number of steps
whatever the number and size of the shards: DDP never waits on a rank that ran dry. The stream is a function
of the seed, rank, worker, epoch and batches given, so a resumed run continues it exactly.

Validation is deterministic: every rank reads every validation shard in order (workers split the shards)
and keeps the samples whose index modulo the world size is its rank, then pads with its last sample up to
the largest share, so all ranks see the same number of batches (with several ranks, at most
``world_size - 1`` samples per worker are repeated, plus one per bad sample skipped on that rank).

A sample that is bad (corrupt image, missing field, too few views, malformed ``cameras.json``) raises
:class:`~selfsup3d.datamodules.format.SampleError` in the decoder; :class:`BadSampleHandler` warns with the
shard and key and counts it (``strict=False``), or re-raises it (``strict=True``). The counts live in
shared memory so the main process sees what the workers skipped; :class:`SkippedSamplesLogger` logs them.
"""

from __future__ import annotations

import functools
import glob
import os
import random
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol
from urllib.parse import urlparse

import braceexpand
import torch
import webdataset as wds
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from selfsup3d.datamodules.format import SampleError, sample_where
from selfsup3d.datamodules.resumable import ResampledUrls, StreamEpoch, loader_settings, stream_seed
from selfsup3d.errors import ConfigError

MAX_CONSECUTIVE_BAD = 200
"""A worker that meets this many bad samples in a row stops with an error (the data or the settings are
wrong, e.g. ``with_depth=True`` on shards without depth), instead of resampling forever."""
WARN_FIRST = 20
"""Each worker warns about its first bad samples one by one, then about every 100th."""

_GOPEN_SCHEMES = {"", "file", "pipe", "http", "https", "sftp", "ftps", "scp", "gs", "ais", "htgs", "hf"}


class BadSampleWarning(UserWarning):
    """A sample was skipped; the message names the shard, the key and the field."""


# ============================================================================ URLs
def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def expand_urls(urls: str | Sequence[str], arg_name: str) -> list[str]:
    """Expand brace patterns (``train-{000000..000009}.tar``) and local globs (``shards/*.tar``) and check
    that every local shard exists and is a tar file; ``pipe:`` and remote URLs are checked when read.

    Raises:
        ConfigError: nothing given, a pattern that matches nothing, a missing file or a file that is not a
            tar archive; the message names ``arg_name`` and the offending pattern or file.
    """
    if isinstance(urls, str):
        urls = [urls]
    if not urls:
        raise ConfigError(f"{arg_name} is empty: give shard URLs, e.g. 'shards/train-{{000000..000009}}.tar'")
    out: list[str] = []
    for pattern in urls:
        expanded = list(braceexpand.braceexpand(pattern))
        for url in expanded:
            if not _is_local(url):
                out.append(url)
                continue
            path = _local_path(url)
            if glob.has_magic(path):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise ConfigError(f"{arg_name}: the pattern {pattern!r} matches no file")
                out.extend(matches)
                continue
            if not os.path.exists(path):
                hint = f" (expanded from {pattern!r}, which names {len(expanded)} files)" if len(expanded) > 1 else ""
                raise ConfigError(f"{arg_name}: shard {path!r} does not exist{hint}")
            out.append(url)
    for url in out:
        if _is_local(url):
            path = _local_path(url)
            if os.path.isdir(path):
                raise ConfigError(f"{arg_name}: {path!r} is a folder; name the shards, e.g. '{path}/train-*.tar'")
            if not tarfile.is_tarfile(path):
                raise ConfigError(f"{arg_name}: {path!r} is not a tar archive")
    return out


def _open_url(url: str) -> Any:
    """A binary stream for a shard URL: webdataset's ``gopen`` for local, ``pipe:`` and curl-able URLs,
    fsspec for the rest (``s3://``, ``gcs://``, ``memory://``, ...)."""
    scheme = urlparse(url).scheme
    if scheme in _GOPEN_SCHEMES or len(scheme) == 1:  # one letter: a Windows drive
        return wds.gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def open_shards(data: Iterable[dict[str, Any]], handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """Pipeline stage: ``{"url"}`` -> ``{"url", "stream"}``; errors go to ``handler``."""
    for source in data:
        url = source["url"]
        try:
            yield {**source, "stream": _open_url(url)}
        except Exception as err:
            err.args = (*err.args, url)
            if not handler(err):
                break


def _seekable_members(source: dict[str, Any], handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """Members of a seekable (local) shard, read with tarfile's random-access mode: a third cheaper per
    member than the streaming mode webdataset uses for any stream (``bench/loader.py``). Same output and
    the same skipping of ``__meta__`` members and non-files as webdataset's expander."""
    url = source["url"]
    try:
        tar = tarfile.open(fileobj=source["stream"], mode="r:*")  # noqa: SIM115 (closed by the with below)
    except Exception as err:
        err.args = (*err.args, url)
        handler(err)
        return
    with tar:
        try:
            for member in tar:
                name = member.name
                if not member.isreg() or (name.startswith("__") and name.endswith("__") and "/" not in name):
                    continue
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                yield {"fname": name, "data": data, "__url__": url}
        except Exception as err:  # a truncated or damaged shard: skip its rest
            err.args = (*err.args, url)
            handler(err)


def expand_tars(data: Iterable[dict[str, Any]], handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """Pipeline stage: opened shards -> tar members, with an end-of-shard marker after every shard, also one
    that broke off (webdataset's expander only marks shards it read to the end, so the partial last sample
    of a truncated shard would be merged with the next shard's first sample). Local files are read in
    random-access mode, other streams (``pipe:``, remote) by webdataset's streaming expander."""
    for source in data:
        stream = source.get("stream")
        try:
            if stream is not None and _is_local(source["url"]) and stream.seekable():
                yield from _seekable_members(source, handler)
            else:
                yield from tar_file_expander([source], handler=handler)
        finally:
            if stream is not None:
                stream.close()
        yield {}


def first_sample(urls: Sequence[str]) -> dict[str, Any] | None:
    """The first complete sample (raw fields) of the first shard of ``urls``, or ``None`` when it has none.
    Errors (an unreadable shard) are raised."""

    def reraise(err: Exception) -> bool:
        raise err

    samples = group_by_keys(expand_tars(open_shards([{"url": urls[0]}], reraise), reraise), handler=reraise)
    try:
        return next(iter(samples), None)
    finally:
        samples.close()


# ============================================================================ bad samples
class SkipCounter:
    """Numbers of skipped and of read samples, shared between the main process and DataLoader workers.

    One slot per worker in shared-memory tensors, so workers never race on a slot."""

    SLOTS = 256

    def __init__(self) -> None:
        self.slots = torch.zeros(self.SLOTS, dtype=torch.int64).share_memory_()
        self.read_slots = torch.zeros(self.SLOTS, dtype=torch.int64).share_memory_()

    @staticmethod
    def _slot() -> int:
        info = torch.utils.data.get_worker_info()
        return 0 if info is None else 1 + info.id % (SkipCounter.SLOTS - 1)

    def add(self, n: int = 1) -> int:
        """Count ``n`` skips for the calling worker; returns this worker's total."""
        slot = self._slot()
        self.slots[slot] += n
        return int(self.slots[slot])

    def add_read(self, n: int = 1) -> None:
        """Count ``n`` samples read (decoded) by the calling worker."""
        self.read_slots[self._slot()] += n

    @property
    def total(self) -> int:
        """Samples skipped so far."""
        return int(self.slots.sum())

    @property
    def read(self) -> int:
        """Samples read so far (a sample that gives several views as images counts once)."""
        return int(self.read_slots.sum())


def _describe(err: Exception) -> str:
    """A tar-level error (webdataset appends the stream and the URL to ``args``) as ``shard URL: problem``."""
    args = list(getattr(err, "args", ()))
    problem = str(args[0]) if args else str(err)
    urls = [a for a in args[1:] if isinstance(a, str)]
    where = f"shard {urls[-1]}: " if urls else ""
    return f"{where}{type(err).__name__}: {problem}"


class BadSampleHandler:
    """WebDataset-style exception handler: warn + count + continue, or raise when ``strict``."""

    def __init__(self, counter: SkipCounter, strict: bool, split: str) -> None:
        self.counter, self.strict, self.split = counter, strict, split

    def __call__(self, err: Exception) -> bool:
        if self.strict:
            raise err
        seen = self.counter.add()
        if seen <= WARN_FIRST or seen % 100 == 0:
            message = str(err) if isinstance(err, SampleError) else _describe(err)
            suffix = "" if seen <= WARN_FIRST else f" ({seen} skipped by this worker so far)"
            warnings.warn(f"skipped a bad {self.split} sample: {message}{suffix}", BadSampleWarning, stacklevel=2)
        return True


# ============================================================================ decoding stages
class Decoder(Protocol):
    """Turns one raw WebDataset sample into zero or more decoded samples (a scene may give several views).

    A decoder with a true ``expands`` attribute gets its output shuffled again in training."""

    def __call__(self, raw: dict[str, Any], rng: random.Random | None) -> list[dict[str, Any]]:
        """Decode ``raw``; ``rng`` is ``None`` in validation (deterministic choices). Raises SampleError."""
        ...

    def count(self, raw: dict[str, Any]) -> int:
        """How many samples ``raw`` gives in validation, without decoding images (cheap)."""
        ...


def _worker_id() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _decode_or_skip(
    decoder: Decoder, raw: dict[str, Any], rng: random.Random | None, handler: BadSampleHandler
) -> list[dict[str, Any]] | None:
    try:
        items = decoder(raw, rng)
        handler.counter.add_read()
        return items
    except SampleError as err:
        handler(err)
    except Exception as err:  # anything else a corrupt sample can trigger, named like a SampleError
        url, key = sample_where(raw)
        handler(SampleError(url, key, None, f"{type(err).__name__}: {err}"))
    return None


class _GuardedDecode:
    """Raise once ``MAX_CONSECUTIVE_BAD`` samples in a row were bad."""

    def __init__(self, split: str) -> None:
        self.split, self.bad = split, 0

    def update(self, ok: bool, raw: dict[str, Any]) -> None:
        self.bad = 0 if ok else self.bad + 1
        if self.bad >= MAX_CONSECUTIVE_BAD:
            url, key = sample_where(raw)
            raise RuntimeError(
                f"{self.bad} {self.split} samples in a row were bad (the last: shard {url}, sample {key}); the "
                "shards do not match the datamodule's settings (e.g. with_depth=True on shards without depth, "
                "num_views larger than the scenes) or are damaged; see the warnings above"
            )


class TrainStage:
    """Training: shuffle raw samples (cheap: bytes), decode them with a random generator seeded by
    ``(seed, rank, worker, epoch)`` (the epoch the loader set in ``epoch``), and, for decoders that expand a
    sample into several (views of a scene as single-view samples), shuffle the decoded samples too."""

    def __init__(
        self,
        decoder: Decoder,
        handler: BadSampleHandler,
        seed: int,
        rank: int,
        shuffle_buffer: int,
        epoch: StreamEpoch | None = None,
    ) -> None:
        self.decoder, self.handler = decoder, handler
        self.seed, self.rank, self.shuffle_buffer = seed, rank, shuffle_buffer
        self.epoch = epoch or StreamEpoch()

    def _decoded(self, src: Iterable[dict[str, Any]], rng: random.Random, epoch: int) -> Iterator[dict[str, Any]]:
        guard = _GuardedDecode("training")
        clock = getattr(self.decoder, "clock", None)  # a decoder that follows a schedule in steps
        worker, workers = _worker_id()
        decoded = 0
        for raw in src:
            if clock is not None:
                clock.position = (epoch, decoded, worker, workers)
            items = _decode_or_skip(self.decoder, raw, rng, self.handler)
            decoded += len(items or ())
            guard.update(bool(items), raw)
            yield from items or ()

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        worker, _ = _worker_id()
        epoch = self.epoch.get()
        rngs = [random.Random(stream_seed("samples", self.seed, self.rank, worker, epoch, i)) for i in range(3)]
        if self.shuffle_buffer > 1:
            src = wds.shuffle(self.shuffle_buffer, initial=max(1, self.shuffle_buffer // 4), rng=rngs[0])(src)
        stream = self._decoded(src, rngs[1], epoch)
        if self.shuffle_buffer > 1 and getattr(self.decoder, "expands", False):
            stream = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 64), rng=rngs[2])(stream)
        yield from stream


class ValStage:
    """Validation: deterministic decoding of this rank's share, padded to the largest share (see module doc)."""

    def __init__(self, decoder: Decoder, handler: BadSampleHandler, rank: int, world_size: int) -> None:
        self.decoder, self.handler = decoder, handler
        self.rank, self.world_size = rank, world_size

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        shares = [0] * self.world_size
        yielded = 0
        last: dict[str, Any] | None = None
        spare: dict[str, Any] | None = None  # a raw sample to pad from when this rank has nothing good
        guard = _GuardedDecode("validation")
        for index, raw in enumerate(src):
            owner = index % self.world_size
            try:
                count = self.decoder.count(raw)
            except Exception:
                count = 1
            if count == 0:
                continue  # a sample the decoder leaves out (not in an evaluation index): no share, not bad
            shares[owner] += count
            if owner != self.rank:
                spare = spare or raw
                continue
            items = _decode_or_skip(self.decoder, raw, None, self.handler)
            guard.update(bool(items), raw)
            for item in items or ():
                yield item
                yielded += 1
                last = item
        if self.world_size == 1:
            return  # nothing to equalise
        target = max(shares)
        if last is None and target > 0 and spare is not None:
            items = _decode_or_skip(self.decoder, spare, None, self.handler)
            last = items[-1] if items else None
        while last is not None and yielded < target:
            yield last
            yielded += 1


def train_pipeline(
    urls: list[str],
    stage: TrainStage,
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
    batch_size: int,
    handler: BadSampleHandler,
    seed: int,
    rank: int,
) -> wds.DataPipeline:
    """Resampled shards -> samples -> ``stage`` -> full batches (infinite; the loader sets ``stage.epoch``)."""
    return wds.DataPipeline(
        ResampledUrls(urls, seed, rank, stage.epoch),
        functools.partial(open_shards, handler=handler),
        functools.partial(expand_tars, handler=handler),
        functools.partial(group_by_keys, handler=handler),
        stage,
        wds.batched(batch_size, collation_fn=collate, partial=False),
    )


def val_pipeline(
    urls: list[str],
    stage: ValStage,
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
    batch_size: int,
    handler: BadSampleHandler,
) -> wds.DataPipeline:
    """Every shard in order, split over workers (not ranks: :class:`ValStage` splits samples) -> batches."""
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        functools.partial(open_shards, handler=handler),
        functools.partial(expand_tars, handler=handler),
        functools.partial(group_by_keys, handler=handler),
        stage,
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )


def make_loader(
    pipeline: wds.DataPipeline, num_workers: int, pin_memory: bool, epoch_batches: int | None
) -> wds.WebLoader:
    """A WebLoader over a batching validation pipeline; ``epoch_batches`` batches per epoch when given (per rank);
    training uses :class:`~selfsup3d.datamodules.resumable.ResumableLoader`.

    An epoch of ``epoch_batches`` is also the loader's ``len()``: exact, since ``with_epoch`` cycles the stream,
    and what Lightning counts with (progress bars, validation at the epoch's end). A full validation pass has
    no length: its size depends on the shards' contents."""
    loader = wds.WebLoader(pipeline, **loader_settings(num_workers, pin_memory))
    return loader.with_epoch(epoch_batches).with_length(epoch_batches, silent=True) if epoch_batches else loader


def shutdown_workers(loader: Any) -> None:
    """Stop the persistent workers of a DataLoader (or of the DataLoader inside a WebLoader), if it has any
    running: at the end of a fit, so no idle worker outlives it (and delays the interpreter's exit)."""
    inner = loader.pipeline[0] if isinstance(loader, wds.WebLoader) else getattr(loader, "loader", loader)
    iterator = getattr(inner, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    if hasattr(inner, "_iterator"):
        inner._iterator = None


def rank_and_world_size(trainer: Trainer | None) -> tuple[int, int]:
    """This process's rank and the world size (trainer first, then torch.distributed, else 0 and 1)."""
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ============================================================================ logging
class SkippedSamplesLogger(Callback):
    """Says how much data a run read: logs the datamodule's counts of read and skipped samples
    (``data/read_train``, ``data/skipped_train`` at the end of every training epoch, ``data/read_val``,
    ``data/skipped_val`` per validation pass; summed over ranks) and prints one line per validation pass
    (``validation: 64 samples evaluated, 0 skipped as bad``; a pass of ``val_batches`` that repeats samples says so)
    and at the end of fitting. Works with any
    LightningModule and any datamodule with ``skipped`` and ``read`` dicts (the shard datamodules)."""

    def __init__(self) -> None:
        self._val_start: tuple[int, int] = (0, 0)

    @staticmethod
    def _counts(trainer: Trainer, split: str) -> tuple[int, int] | None:
        datamodule = trainer.datamodule
        skipped, read = getattr(datamodule, "skipped", None), getattr(datamodule, "read", None)
        if not isinstance(skipped, dict) or split not in skipped:
            return None
        return int(read.get(split, 0)) if isinstance(read, dict) else 0, int(skipped[split])

    @staticmethod
    def _summed(trainer: Trainer, pl_module: LightningModule, counts: tuple[int, int]) -> tuple[int, int]:
        total = trainer.strategy.reduce(torch.tensor(counts, device=pl_module.device), reduce_op="sum")
        return int(total[0]), int(total[1])

    def _log(self, pl_module: LightningModule, split: str, read: int, skipped: int) -> None:
        pl_module.log(f"data/read_{split}", float(read), sync_dist=True, reduce_fx="sum")
        pl_module.log(f"data/skipped_{split}", float(skipped), sync_dist=True, reduce_fx="sum")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        counts = self._counts(trainer, "train")
        if counts is not None:
            self._log(pl_module, "train", *counts)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        counts = self._counts(trainer, "val")
        if counts is None:
            return
        # this pass's share: the counts since the end of the previous pass (loaders read ahead of the hooks)
        start, self._val_start = self._val_start, counts
        if trainer.sanity_checking:
            return
        read, skipped = counts[0] - start[0], counts[1] - start[1]
        self._log(pl_module, "val", read, skipped)
        read, skipped = self._summed(trainer, pl_module, (read, skipped))
        distinct = getattr(trainer.datamodule, "distinct", {}).get("val")
        repeats = (
            f" (the {distinct} validation samples, some evaluated more than once: val_batches repeats them)"
            if distinct is not None and read > distinct
            else ""
        )
        rank_zero_info(f"validation: {read} samples evaluated{repeats}, {skipped} skipped as bad")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        counts = self._counts(trainer, "train")
        if counts is not None:
            read, skipped = self._summed(trainer, pl_module, counts)
            rank_zero_info(f"training read {read} samples, {skipped} skipped as bad")
