"""The bases of the callbacks that read validation batches: the guard written once.

* :class:`ValidationCallback`: hands every real validation batch (not Lightning's sanity check) to
  :meth:`~ValidationCallback.on_validation`; :meth:`~ValidationCallback.validating` is the guard, also for the
  callback's epoch-end hooks.
* :class:`ObjectiveCallback`: the pictures and scorers of one kind of objective. It reads the validation outputs
  of every component of its :attr:`~ObjectiveCallback.objective` class, whether the objective is fitted alone (its
  outputs are the step's) or inside a multi-task run (under its name), and skips modules that are no selfsup3d
  objective, batches after the first for pictures, and ranks other than 0 for what only rank 0 writes; a subclass
  implements :meth:`~ObjectiveCallback.on_validation_component`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from lightning.pytorch import Callback, LightningModule, Trainer

from selfsup3d.objectives.base import PretrainObjective, component_outputs


class ValidationCallback(Callback):
    """A callback that reads the batches of real validations (see the module docstring)."""

    def validating(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Whether this is a real validation (not Lightning's sanity check) that this callback reads."""
        return not trainer.sanity_checking

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.validating(trainer, pl_module):
            self.on_validation(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_validation(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, loader: int
    ) -> None:
        """One batch of a real validation (``loader``: the index of its validation dataloader)."""


class ObjectiveCallback(ValidationCallback):
    """A callback that reads the validation outputs of the components of one objective class.

    Class attributes:
        objective: the objective class whose components' outputs :meth:`on_validation_component` receives.
        first_batch_only: only the first validation batch (pictures).
        global_zero_only: only on the global rank 0 (what writes to TensorBoard or prints).
    """

    objective: ClassVar[type[PretrainObjective]] = PretrainObjective
    first_batch_only: ClassVar[bool] = False
    global_zero_only: ClassVar[bool] = False

    def validating(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """A real validation of a selfsup3d objective, on a rank this callback runs on."""
        if not super().validating(trainer, pl_module) or not isinstance(pl_module, PretrainObjective):
            return False
        return trainer.is_global_zero or not self.global_zero_only

    def on_validation(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, loader: int
    ) -> None:
        if self.first_batch_only and batch_idx != 0:
            return
        assert isinstance(pl_module, PretrainObjective)
        for name, component, out in component_outputs(pl_module, outputs, self.objective):
            self.on_validation_component(trainer, pl_module, name, component, out, batch)

    def on_validation_component(
        self, trainer: Trainer, pl_module: PretrainObjective, name: str, component: Any, outputs: Any, batch: Any
    ) -> None:
        """One validation batch's outputs of the component ``name`` (``""`` for an objective fitted alone)."""
