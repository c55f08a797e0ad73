"""The learning rate of every optimiser parameter group in TensorBoard, when the run has a logger."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor


class LearningRates(LearningRateMonitor):
    """Lightning's ``LearningRateMonitor`` (``lr-AdamW/<group name>`` per step by default), silent instead of
    failing in runs without a logger. The CLI adds it to every fit (``--lr_monitor.*``)."""

    def __init__(
        self, logging_interval: str | None = "step", log_momentum: bool = False, log_weight_decay: bool = False
    ):
        super().__init__(
            logging_interval=logging_interval, log_momentum=log_momentum, log_weight_decay=log_weight_decay
        )  # type: ignore[arg-type]

    def on_train_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)
