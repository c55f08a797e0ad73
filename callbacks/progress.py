"""The progress bar the selfsup3d CLI uses by default: Lightning's own (Rich when installed, else tqdm), fixed for
runs bounded by ``max_steps`` over streamed shards.

Lightning's bars, on such a run, say ``Epoch 3/-2`` (``max_epochs`` is -1 when ``max_steps`` bounds the run), and
show the logger's version through a float format (``v_num: 0.000``) or as the last four characters of a name
(``on_0`` for ``version_0``). Here the epoch reads ``Epoch 3`` (``Epoch 3/9`` when ``max_epochs`` is set) and the
version is shown whole. The bars' totals are the loaders' lengths: the shard datamodules give their loaders the
length of an epoch (``batches_per_epoch``, ``val_batches``), so the bars count ``3/500`` rather than the steps left.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar


def epoch_description(trainer: Trainer, current_epoch: int) -> str:
    """``Epoch N``, or ``Epoch N/LAST`` when the run is bounded by a number of epochs."""
    max_epochs = trainer.max_epochs
    return f"Epoch {current_epoch}/{max_epochs - 1}" if max_epochs and max_epochs > 0 else f"Epoch {current_epoch}"


def logger_version(trainer: Trainer) -> str | None:
    """The run's version as a string (several loggers' versions joined by ``_``), or ``None`` without loggers."""
    versions = list(dict.fromkeys(str(logger.version) for logger in trainer.loggers if logger.version is not None))
    return "_".join(versions) if versions else None


class _VersionAsIs:
    """Shows ``v_num`` as the whole version string."""

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        if "v_num" in items:
            version = logger_version(trainer)
            if version is None:
                items.pop("v_num")
            else:
                items["v_num"] = version
        return items


class RichProgress(_VersionAsIs, RichProgressBar):
    """Lightning's Rich progress bar with selfsup3d's epoch text and version (see the module docstring)."""

    def _get_train_description(self, current_epoch: int) -> str:  # Lightning's hook for the epoch text
        text = epoch_description(self.trainer, current_epoch)
        width = len(self.validation_description)  # as Lightning pads it: no flicker against "Validation"
        return f"{text:{width}}" if width > len(text) else text


class TQDMProgress(_VersionAsIs, TQDMProgressBar):
    """Lightning's tqdm progress bar with selfsup3d's epoch text and version (see the module docstring)."""

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(epoch_description(trainer, trainer.current_epoch))


def default_progress_bar() -> ProgressBar:
    """:class:`RichProgress` when ``rich`` is installed (Lightning's own choice), else :class:`TQDMProgress`."""
    try:
        return RichProgress()
    except ModuleNotFoundError:
        return TQDMProgress()
