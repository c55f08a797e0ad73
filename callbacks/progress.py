"""The progress bar the selfsup3d CLI uses by default: Lightning's own (Rich when installed, else tqdm), fixed for
runs bounded by ``max_steps`` over streamed shards.

Lightning's bars, on such a run, say ``Epoch 3/-2`` (``max_epochs`` is -1 when ``max_steps`` bounds the run), and
show the logger's version through a float format (``v_num: 0.000``) or as the last four characters of a name
(``on_0`` for ``version_0``). Here the epoch reads ``Epoch 3`` (``Epoch 3/9`` when ``max_epochs`` is set) and the
version is shown whole. The bars' totals are the loaders' lengths: the shard datamodules give their loaders the
length of an epoch (``batches_per_epoch``, ``val_batches``), so the bars count ``3/500`` rather than the steps left.
When ``max_steps`` ends the run within an epoch, the total is the steps left at the epoch's start (Lightning's),
also when a run resumed mid-epoch (Lightning counted them from the resume: ``20/9`` where the uninterrupted run
shows ``20/20``), and the tqdm bar names the resumed epoch (Lightning's names none).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf


def epoch_description(trainer: Trainer, current_epoch: int) -> str:
    """``Epoch N``, or ``Epoch N/LAST`` when the run is bounded by a number of epochs."""
    max_epochs = trainer.max_epochs
    return f"Epoch {current_epoch}/{max_epochs - 1}" if max_epochs and max_epochs > 0 else f"Epoch {current_epoch}"


def logger_version(trainer: Trainer) -> str | None:
    """The run's version as a string (several loggers' versions joined by ``_``), or ``None`` without loggers."""
    versions = list(dict.fromkeys(str(logger.version) for logger in trainer.loggers if logger.version is not None))
    return "_".join(versions) if versions else None


class _StepBoundedBar:
    """Shows ``v_num`` as the whole version string and counts an epoch's total from its start (module docstring)."""

    _epoch_start_step: int | None = None

    def on_train_start(self, trainer: Trainer, *args: Any) -> None:
        self._epoch_start_step = None
        if trainer.fit_loop.restarted_mid_epoch:  # the epoch started before the resume: its steps so far
            steps = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.current
            self._epoch_start_step = trainer.global_step - steps.completed
        super().on_train_start(trainer, *args)  # type: ignore[misc]

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        self._epoch_start_step = trainer.global_step
        super().on_train_epoch_start(trainer, *args)  # type: ignore[misc]

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer  # type: ignore[attr-defined]
        start = self._epoch_start_step
        if start is None or trainer.max_epochs != -1 or not trainer.max_steps or trainer.max_steps < 0:
            return super().total_train_batches  # type: ignore[misc]
        return min(trainer.num_training_batches, trainer.max_steps - start)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        if "v_num" in items:
            version = logger_version(trainer)
            if version is None:
                items.pop("v_num")
            else:
                items["v_num"] = version
        return items


class RichProgress(_StepBoundedBar, RichProgressBar):
    """Lightning's Rich progress bar with selfsup3d's epoch text and version (see the module docstring)."""

    def _get_train_description(self, current_epoch: int) -> str:  # Lightning's hook for the epoch text
        text = epoch_description(self.trainer, current_epoch)
        width = len(self.validation_description)  # as Lightning pads it: no flicker against "Validation"
        return f"{text:{width}}" if width > len(text) else text


class TQDMProgress(_StepBoundedBar, TQDMProgressBar):
    """Lightning's tqdm progress bar with selfsup3d's epoch text and version (see the module docstring)."""

    def on_train_start(self, trainer: Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        if trainer.fit_loop.restarted_mid_epoch:  # no on_train_epoch_start for the resumed epoch
            bar = self.train_progress_bar
            bar.total = convert_inf(self.total_train_batches)
            bar.n = bar.initial = trainer.fit_loop.epoch_loop.batch_progress.current.completed
            bar.set_description(epoch_description(trainer, trainer.current_epoch))

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(epoch_description(trainer, trainer.current_epoch))


def default_progress_bar() -> ProgressBar:
    """:class:`RichProgress` when ``rich`` is installed (Lightning's own choice), else :class:`TQDMProgress`."""
    try:
        return RichProgress()
    except ModuleNotFoundError:
        return TQDMProgress()
