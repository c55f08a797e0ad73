"""Checkpoint and weight files that survive being killed mid-write, and a clear message for one that did not.

:func:`atomic_path` writes a file to a temporary file in the same folder, flushes it to disk and then renames it
over the target (``os.replace``, atomic on POSIX), so a process killed while writing leaves the previous file
whole, never a truncated one. The new file has the permissions any new file gets (``0o666`` less the umask, so
teammates read it where the umask allows; an existing target's mode is kept), not the ``0o600`` of
``tempfile.mkstemp`` (nor that of safetensors' own writer). :class:`AtomicCheckpointIO`, the CLI's default
checkpoint plugin, writes every checkpoint so; :func:`save_safetensors` every exported ``.safetensors`` file.
A file that still cannot be read (damaged on disk, copied in half) fails with
:class:`~selfsup3d.errors.CheckpointCorruptError`, whose message names the file and the newest other checkpoint
beside it that reads.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors.torch import save_file

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


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A new, empty temporary file beside ``target`` to write to; when the block ends it is flushed to disk and
    renamed over ``target`` (removed if the block fails). Created as ``open()`` creates files (``0o666`` less the
    umask); an existing ``target``'s mode is kept."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o666 less the umask, as the system created it
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # a writer may have replaced the file with one of its own mode (safetensors writes 0o600)
        os.chmod(tmp, stat.S_IMODE(target.stat().st_mode) if target.exists() else mode)
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


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], out: str | os.PathLike[str], metadata: dict[str, str]
) -> Path:
    """Write ``tensors`` (made contiguous, on the CPU) and ``metadata`` to the ``.safetensors`` file ``out``,
    atomically and with a new file's permissions (:func:`atomic_path`)."""
    with atomic_path(out) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(out)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint plugin, with atomic local writes and a one-line error for unreadable files."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        target = _local(path)
        if target is None or storage_options is not None:  # remote storage: Lightning's own (fsspec) writing
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_path(target) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)

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
