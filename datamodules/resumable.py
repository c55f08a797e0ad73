"""Training streams that resume where they were: :class:`ResumableLoader` and the epoch its workers read.

A training stream is a pure function of ``(seed, rank, worker, epoch)`` and of how many batches it has given:
the shard sampler (:class:`ResampledUrls`), the shuffle buffers and the decoders' random choices are seeded
from the first four, and every loader iteration (one epoch of ``batches_per_epoch`` batches) starts the
streams of its epoch afresh. The loader's state is therefore two numbers, the epoch and the batches given in
it, which Lightning stores in the checkpoint (``loops.fit_loop.state_dict.combined_loader``: the fit loop keeps
the state of every training loader that has ``state_dict``/``load_state_dict``).

On resume the loader starts the saved epoch's streams and drops the batches the interrupted run had already
trained on (its workers read and decode them again: up to one epoch of batches, without training), so the
resumed run sees exactly the batches the uninterrupted run would have. The state also records the settings
the stream depends on (seed, batch size, workers, world size); when they differ on resume, the stream cannot
be the same and :class:`ResumeMismatchWarning` says so, and the run carries on from the saved epoch.

Only rank 0 writes the checkpoint; every rank gives the same number of batches per epoch, so rank 0's
``(epoch, batches)`` is every rank's, and each rank rebuilds its own stream from its rank.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


def loader_settings(num_workers: int, pin_memory: bool) -> dict[str, Any]:
    """DataLoader arguments of every shard loader: batches come batched from the pipeline, workers persist,
    host memory is pinned only when there is a GPU to copy to."""
    return {
        "batch_size": None,
        "num_workers": num_workers,
        "pin_memory": pin_memory and torch.cuda.is_available(),
        "persistent_workers": num_workers > 0,
        "prefetch_factor": 4 if num_workers > 0 else None,
    }


class ResumeMismatchWarning(UserWarning):
    """A resumed training stream cannot be the interrupted one (a setting it depends on changed)."""


def _worker() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id


def stream_seed(*parts: Any) -> int:
    """A 31-bit seed from ``parts`` (ints and strings; the same in every process, unlike ``hash`` of a str)."""
    rng = random.Random(repr(parts))  # str seeds are hashed with SHA-512 by random.Random: stable
    return rng.getrandbits(31)


class StreamEpoch:
    """The epoch of a training stream, shared between the loader (which sets it before every iteration) and its
    DataLoader workers (which read it when they start the epoch's streams). Shared memory: set in the main
    process before the workers are told to start, so they see the new value."""

    def __init__(self) -> None:
        self.value = torch.zeros((), dtype=torch.int64).share_memory_()

    def get(self) -> int:
        return int(self.value)

    def set(self, epoch: int) -> None:
        self.value.fill_(epoch)


class ResampledUrls(IterableDataset):
    """Pipeline source: shard URLs drawn with replacement forever, seeded by ``(seed, rank, worker, epoch)``."""

    def __init__(self, urls: Sequence[str], seed: int, rank: int, epoch: StreamEpoch) -> None:
        super().__init__()
        self.urls, self.seed, self.rank, self.epoch = list(urls), seed, rank, epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rng = random.Random(stream_seed("shards", self.seed, self.rank, _worker(), self.epoch.get()))
        while True:
            yield {"url": rng.choice(self.urls)}


class ResumableLoader:
    """A DataLoader over an endless training pipeline, ``batches_per_epoch`` batches per iteration, that
    Lightning can save and restore (``state_dict`` / ``load_state_dict``; see the module docstring).

    Args:
        pipeline: the endless, batching training pipeline (built over a :class:`StreamEpoch`).
        epoch: the pipeline's epoch, set here before every iteration.
        batches_per_epoch: batches per iteration (also ``len()``).
        num_workers: DataLoader workers (persistent when > 0).
        pin_memory: pin host memory (when CUDA is available).
        settings: what the stream depends on besides the epoch (seed, batch size, rank's world size, ...);
            saved in the state and compared on resume.
        batches_done: on resume, how many batches of the epoch the trainer counts as trained on (Lightning's
            restored progress), read when the resumed epoch starts; ``None`` (or returning ``None``): the
            batches the loader had given. They differ when a run was saved mid-step (a crash, Ctrl-C, a signal
            handler): the batch it had fetched but not finished is trained on again, as the trainer redoes it.
    """

    def __init__(
        self,
        pipeline: Any,
        epoch: StreamEpoch,
        batches_per_epoch: int,
        num_workers: int,
        pin_memory: bool,
        settings: dict[str, Any],
        batches_done: Callable[[], int | None] | None = None,
    ) -> None:
        self.batches_done = batches_done
        self.loader = DataLoader(pipeline, **loader_settings(num_workers, pin_memory))
        self.epoch_slot = epoch
        self.batches_per_epoch = batches_per_epoch
        self.settings = {**settings, "num_workers": num_workers, "batches_per_epoch": batches_per_epoch}
        self.epoch = -1  # the epoch of the iteration in progress (-1: none yet)
        self.given = 0  # batches given in it
        self._resume_at: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def _iterator(self) -> Any:
        """The DataLoader's (persistent) worker iterator: Lightning shuts its workers down at the end of a fit
        through this attribute (``CombinedLoader.reset``), as it does for a plain DataLoader."""
        return self.loader._iterator

    @_iterator.setter
    def _iterator(self, value: Any) -> None:
        self.loader._iterator = value

    @property
    def position(self) -> tuple[int, int]:
        """``(epoch, index)`` of the batch given last (``index`` counts from 0 within the epoch)."""
        return self.epoch, self.given - 1

    def __iter__(self) -> Iterator[Any]:
        if self._resume_at is not None:
            epoch, skip = self._resume_at
            self._resume_at = None
            done = self.batches_done() if self.batches_done is not None else None
            if done is not None and skip > 0:
                skip = min(int(done), self.batches_per_epoch)
        else:
            epoch, skip = self.epoch + 1, 0
        self.epoch, self.given = epoch, skip
        self.epoch_slot.set(epoch)
        batches = islice(iter(self.loader), self.batches_per_epoch)
        for _ in islice(batches, skip):  # the interrupted run trained on these
            pass
        for batch in batches:
            self.given += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self.given, "settings": dict(self.settings)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, given = int(state["epoch"]), int(state["batches"])
        saved = state.get("settings", {})
        changed = {k: (saved[k], v) for k, v in self.settings.items() if k in saved and saved[k] != v}
        if changed:
            what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            warnings.warn(
                f"resuming a training stream with other settings ({what}): the data after the resume differ from "
                "what the interrupted run would have seen (it continues from the saved epoch, with no batch of it "
                "repeated on purpose)",
                ResumeMismatchWarning,
                stacklevel=2,
            )
        if epoch < 0:
            self._resume_at = None
        elif given >= self.batches_per_epoch:
            self._resume_at = (epoch + 1, 0)
        else:
            self._resume_at = (epoch, given)
        self.epoch = epoch
