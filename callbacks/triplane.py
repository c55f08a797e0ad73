"""Pictures of the 3D-Prior objective in TensorBoard: input, rendered colour, rendered depth, target depth."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from selfsup3d.callbacks.base import ObjectiveCallback
from selfsup3d.callbacks.images import colorize, image_grid, tensorboard
from selfsup3d.objectives.base import PretrainObjective
from selfsup3d.objectives.triplane import TriplaneReconstruction


def triplane_picture(outputs: Mapping[str, Any], num_images: int, near: float, far: float) -> Tensor:
    """One ``[3, H, W]`` picture from a validation step's outputs (``num_images`` spread over the batch):
    rows of inputs, rendered colours,
    rendered depths and target depths (both depths on the same ``[near, far]`` colour scale, unknown target
    pixels black), and the rendered opacity when there is one."""
    total = outputs["image"].shape[0]
    n = min(num_images, total)
    idx = torch.linspace(0, total - 1, n).round().long()  # spread over the batch (views of several scenes)
    rows = [outputs["image"][idx], outputs["render_rgb"][idx]]
    rows.append(colorize(outputs["render_depth"][idx], vmin=near, vmax=far))
    labels = ["input", "rendered colour", "rendered depth"]
    if outputs.get("target_depth") is not None:
        valid = outputs.get("depth_valid")
        invalid = ~valid[idx].bool() if valid is not None else None
        rows.append(colorize(outputs["target_depth"][idx], vmin=near, vmax=far, invalid=invalid))
        labels.append("target depth")
    if outputs.get("render_opacity") is not None:
        rows.append(outputs["render_opacity"][idx])
        labels.append("opacity")
    return image_grid([r.detach().float().cpu() for r in rows], labels=labels)


class TriplaneImages(ObjectiveCallback):
    """Log a picture of the first validation batch to TensorBoard as ``val/triplane``.

    Rows: input, rendered colour, rendered depth, target depth (same colour scale over ``[near, far]``),
    rendered opacity.

    Args:
        num_images: images (columns) per picture.
        every_n_epochs: log every this many validation epochs.
    """

    objective = TriplaneReconstruction
    first_batch_only = True
    global_zero_only = True

    def __init__(self, num_images: int = 4, every_n_epochs: int = 1) -> None:
        self.num_images = num_images
        self.every_n_epochs = max(1, every_n_epochs)
        self._epochs = 0
        self.last_picture: Tensor | None = None

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epochs += 0 if trainer.sanity_checking else 1

    def validating(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Every ``every_n_epochs``-th validation."""
        return super().validating(trainer, pl_module) and not (self._epochs - 1) % self.every_n_epochs

    def on_validation_component(
        self, trainer: Trainer, pl_module: PretrainObjective, name: str, component: Any, outputs: Any, batch: Any
    ) -> None:
        if "render_rgb" not in outputs:
            return
        with torch.no_grad():
            self.last_picture = triplane_picture(outputs, self.num_images, component.near, component.far)
        writer = tensorboard(trainer)
        if writer is not None:
            tag = f"val/{name}/triplane" if name else "val/triplane"
            writer.add_image(tag, self.last_picture, global_step=trainer.global_step)
