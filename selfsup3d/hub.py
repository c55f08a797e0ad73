"""Pretrained weights from the Hugging Face hub: downloaded when the hub answers, read from the local cache when
it cannot be reached, and otherwise a :class:`~selfsup3d.errors.WeightsUnavailableError` that says what to do,
within seconds.

Without network, ``huggingface_hub`` retries every request with back-off (about 25 s per file, and timm and
transformers each try several files), then reports that "an error happened while trying to locate the file on
the Hub". So before a download, :func:`fetch_pretrained` asks once, with a short timeout, whether the hub can be
reached (or sees that offline mode, ``HF_HUB_OFFLINE=1``, is on); if it cannot, the load runs on the local cache
only, and a cache miss becomes the error with the caller's advice (a local ``checkpoint_path``, a model folder).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from huggingface_hub import constants, get_session

from selfsup3d.errors import WeightsUnavailableError, shorten

T = TypeVar("T")

PROBE_TIMEOUT_S = 5.0
"""How long :func:`hub_unreachable` waits for the hub to answer."""


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face hub cannot be reached now, or ``None`` when it answers.

    Offline mode counts as unreachable; otherwise one ``HEAD`` request goes to the hub's endpoint through
    ``huggingface_hub``'s own HTTP client (its proxy settings included), without retries."""
    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as err:  # DNS failure, refused or timed-out connection, proxy error, ...
        detail = shorten(str(err), 160) or type(err).__name__  # (the request's error quoted, not the advice)
        return f"{constants.ENDPOINT} cannot be reached ({detail})"
    return None


@contextmanager
def cache_only() -> Iterator[None]:
    """Inside the block, Hugging Face downloads (through timm or transformers) read the local cache only:
    ``huggingface_hub``'s offline mode, switched on for the block and restored after it."""
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def fetch_pretrained(load: Callable[[], T], what: str, advice: str, timeout: float = PROBE_TIMEOUT_S) -> T:
    """Run ``load`` (which downloads ``what`` from the hub) when the hub answers; when it cannot be reached, run
    it on the local cache only and turn a miss into a :class:`WeightsUnavailableError`.

    Args:
        load: builds the model; it may download through ``huggingface_hub``.
        what: names the weights in the error, e.g. ``"pretrained weights timm/vit_base_patch14_dinov2.lvd142m"``.
        advice: what to do instead, e.g. where to put a local copy.
        timeout: seconds :func:`hub_unreachable` waits for the hub.

    Returns:
        What ``load`` returns. Errors of ``load`` while the hub answers (a wrong id, a gated model) propagate.
    """
    reason = hub_unreachable(timeout)
    if reason is None:
        return load()
    try:
        with cache_only():
            return load()
    except (OSError, ValueError, RuntimeError) as err:
        raise WeightsUnavailableError(f"{what} are not in the local Hugging Face cache and {reason}. {advice}") from err
