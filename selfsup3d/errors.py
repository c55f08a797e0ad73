"""Exceptions that carry a message meant for the user, not a stack trace, and the YAML keys they name.

The CLI reports each of them in one line (see ``selfsup3d.cli``); the message says what is wrong and, where
there is one, what to do.

A configuration error names the key as the user writes it: ``model.init_args.dim`` for an objective fitted
alone, ``model.init_args.objectives.masked_view.init_args.dim`` for the same objective inside a multi-task
run, ``data.init_args.sources.scenes.init_args.num_views`` for a source of a combined datamodule. Modules
ask :func:`config_key` for the full name of one of their arguments; whoever builds a nested module sets the
prefix around its construction with :func:`config_prefix`, and the module keeps the prefix it was built
under (:func:`current_prefix`) for checks that run later (at set-up).

Range checks have one shape, written once: ``require(lr > 0, self.key("lr"), "> 0", lr)`` raises
``model.init_args.lr must be > 0, got 0`` (:func:`require`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_PREFIXES: dict[str, ContextVar[str]] = {
    "model": ContextVar("selfsup3d_model_key_prefix", default="model.init_args"),
    "data": ContextVar("selfsup3d_data_key_prefix", default="data.init_args"),
}


class ConfigError(ValueError):
    """A configuration that cannot work (bad sizes, impossible combinations).

    The CLI turns it into a usage error naming the offending keys, like jsonargparse's own errors."""


class CheckpointMismatchError(ValueError):
    """Weights that do not fit the model they are loaded into; the message names the keys or the architecture
    fields that differ."""


class WeightsFileError(ValueError):
    """A file given as weights (``checkpoint_path``, ``init_encoder_from``, a teacher) that holds none that can be
    read safely: not a state dict, checkpoint or ``.safetensors`` file, or one with pickled Python objects."""


class WeightsUnavailableError(OSError):
    """Pretrained weights that cannot be fetched (no network, offline mode, not in the local cache); the message
    says how to get them onto the machine and where to point the configuration."""


class CheckpointCorruptError(OSError):
    """A checkpoint file that cannot be read (truncated by a killed write, damaged on disk); the message names
    the file and the newest other checkpoint beside it that reads."""


class NonFiniteLossError(RuntimeError):
    """Training produced only non-finite losses for too many steps in a row; the message says how many and
    what usually causes it."""


def require(ok: bool, key: str, rule: str, value: object, error: type[Exception] = ConfigError) -> None:
    """Raise ``error("<key> must be <rule>, got <value>")`` unless ``ok``: the one shape of a range check.

    Args:
        ok: the condition the value must meet.
        key: what is checked, as the user sets it: the YAML key (``self.key("lr")``, ``spec.key(...)``,
            :func:`config_key`), a command-line option, or an argument's name in a library function.
        rule: what the value must be, as the message says it (``"> 0"``, ``"in (0, 1]"``, ``">= 1 or null"``).
        value: the value given (a string is shown quoted).
        error: the exception class (:class:`ConfigError` for configuration, ``ValueError`` in library code).
    """
    if not ok:
        raise error(
            f"{key} must be {rule}, got {value!r}" if isinstance(value, str) else f"{key} must be {rule}, got {value}"
        )


def shorten(text: str, limit: int) -> str:
    """``text`` on one line, cut to ``limit`` characters (ending in ``...``): for a value or another library's
    error quoted inside a message, never for the message itself (its advice would be cut)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def current_prefix(section: str = "model") -> str:
    """The key prefix that modules of ``section`` (``model`` or ``data``) built now are configured under."""
    return _PREFIXES[section].get()


def config_key(name: str, section: str = "model", prefix: str | None = None) -> str:
    """The full YAML key of argument ``name``: ``prefix`` (default: the current one of ``section``) + name."""
    return f"{prefix if prefix is not None else current_prefix(section)}.{name}"


@contextmanager
def config_prefix(prefix: str, section: str = "model") -> Iterator[None]:
    """Modules of ``section`` built inside this block name their keys under ``prefix``."""
    token = _PREFIXES[section].set(prefix)
    try:
        yield
    finally:
        _PREFIXES[section].reset(token)
