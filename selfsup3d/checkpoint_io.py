"""Checkpoint files that survive being killed mid-write, and a clear message for one that did not.

:class:`AtomicCheckpointIO` is the CLI's default checkpoint plugin: a checkpoint is written to a temporary file
in the same folder, flushed to disk and then renamed over the target (``os.replace``, atomic on POSIX), so a
process killed while writing leaves the previous ``last.ckpt`` whole, never a truncated one. A file that still
cannot be read (damaged on disk, copied in half) fails with :class:`~selfsup3d.errors.CheckpointCorruptError`,
whose message names the file and the newest other checkpoint beside it that reads.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from selfsup3d.errors import CheckpointCorruptError


def _local(path: Any) -> Path | None:
    text = str(path)
    scheme = urlparse(text).scheme
    if scheme in ("", "file") or len(scheme) == 1:  # one letter: a Windows drive
        return Path(urlparse(text).path if scheme == "file" else text)
    return None


def checkpoint_readable(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a whole torch checkpoint: a zip archive whose members all pass their CRC check
    (reads the file once; unpickles nothing)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def previous_good_checkpoint(path: str | os.PathLike[str]) -> Path | None:
    """The newest other ``*.ckpt`` in ``path``'s folder that reads, or ``None``."""
    target = Path(path)
    others = [p for p in target.parent.glob("*.ckpt") if p.resolve() != target.resolve() and p.is_file()]
    for candidate in sorted(others, key=lambda p: p.stat().st_mtime, reverse=True):
        if checkpoint_readable(candidate):
            return candidate
    return None


def corrupt_checkpoint_message(path: str | os.PathLike[str], problem: str) -> str:
    """One line: the file that cannot be read, why, and what to resume from instead."""
    good = previous_good_checkpoint(path)
    advice = (
        f"the previous good checkpoint is {good}: resume with --ckpt_path {good}"
        if good is not None
        else f"no other checkpoint in {Path(path).parent} reads"
    )
    return f"checkpoint {path} cannot be read ({problem}); {advice}"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint plugin, with atomic local writes and a one-line error for unreadable files."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        target = _local(path)
        if target is None or storage_options is not None:  # remote storage: Lightning's own (fsspec) writing
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # the rename itself on disk (POSIX; not possible everywhere)
            folder = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        check_checkpoint(path)
        kwargs = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(path, weights_only=weights_only, **kwargs)


def check_checkpoint(path: Any) -> None:
    """Raise :class:`~selfsup3d.errors.CheckpointCorruptError` when the local file ``path`` exists but is not a
    whole checkpoint (remote and missing files are left to the loader)."""
    local = _local(path)
    if local is not None and local.is_file() and not checkpoint_readable(local):
        raise CheckpointCorruptError(corrupt_checkpoint_message(local, "truncated or damaged: not a whole archive"))


def install_atomic_io(strategy: Any) -> None:
    """Make :class:`AtomicCheckpointIO` the strategy's checkpoint plugin unless one was configured."""
    from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

    current = getattr(strategy, "_checkpoint_io", None)
    if current is None:
        strategy.checkpoint_io = AtomicCheckpointIO()
    elif isinstance(current, _WrappingCheckpointIO) and current.checkpoint_io is None:
        current.checkpoint_io = AtomicCheckpointIO()
