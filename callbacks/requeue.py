"""SLURM pre-emption at a step boundary: :class:`StepBoundaryRequeue`.

With ``SLURMEnvironment(auto_requeue=True)`` Lightning saves ``hpc_ckpt_N.ckpt`` and requeues the job from its
SIGUSR1 handler, i.e. at whatever point of a step the signal arrives: in the middle of the optimiser's update
of the parameter groups, say, whose half-updated weights then go into the checkpoint. This callback (on by
default in the CLI; inert without SLURM's auto-requeue) catches the signal instead and runs Lightning's handler
at the end of the training step in progress, on every rank at the same step (the ranks agree through one
boolean reduction per step, only in multi-process runs), so the checkpoint holds a finished step and the
requeued run continues exactly.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.environments import SLURMEnvironment


class StepBoundaryRequeue(Callback):
    """Defers Lightning's SLURM requeue (save ``hpc_ckpt_N.ckpt`` + ``scontrol requeue``) to the end of the step."""

    def __init__(self) -> None:
        self._signal: int | None = None
        self._lightning: Any = None
        self._pending = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        env = trainer._accelerator_connector.cluster_environment
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None):
            return
        if threading.current_thread() is not threading.main_thread():
            return
        self._signal = int(env.requeue_signal)
        self._lightning = signal.getsignal(self._signal)  # Lightning's handler, registered at the fit's start
        if callable(self._lightning):
            signal.signal(self._signal, self._defer)

    def _defer(self, signum: int, frame: Any) -> None:
        self._pending = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self._signal is None:
            return
        pending = self._pending
        if trainer.world_size > 1:
            pending = bool(trainer.strategy.reduce_boolean_decision(pending, all=False))
        if pending and callable(self._lightning):
            self._pending = False
            self._lightning(self._signal, None)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._signal is not None and callable(self._lightning):
            signal.signal(self._signal, self._lightning)
        self._signal = None
