"""Pictures of the 3D-Prior objective in TensorBoard: input, rendered colour, rendered depth, target depth."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from selfsup3d.callbacks.images import colorize, image_grid, tensorboard
from selfsup3d.objectives.base import PretrainObjective, component_outputs
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


class TriplaneImages(Callback):
    """Log a picture of the first validation batch to TensorBoard as ``val/triplane``.

    Rows: input, rendered colour, rendered depth, target depth (same colour scale over ``[near, far]``),
    rendered opacity.

    Args:
        num_images: images (columns) per picture.
        every_n_epochs: log every this many validation epochs.
    """

    def __init__(self, num_images: int = 4, every_n_epochs: int = 1) -> None:
        self.num_images = num_images
        self.every_n_epochs = max(1, every_n_epochs)
        self._epochs = 0
        self.last_picture: Tensor | None = None

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epochs += 0 if trainer.sanity_checking else 1

    @rank_zero_only
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or trainer.sanity_checking or (self._epochs - 1) % self.every_n_epochs:
            return
        if not isinstance(pl_module, PretrainObjective):
            return
        for name, objective, out in component_outputs(pl_module, outputs, TriplaneReconstruction):
            if "render_rgb" not in out:
                continue
            with torch.no_grad():
                self.last_picture = triplane_picture(out, self.num_images, objective.near, objective.far)
            writer = tensorboard(trainer)
            if writer is not None:
                tag = f"val/{name}/triplane" if name else "val/triplane"
                writer.add_image(tag, self.last_picture, global_step=trainer.global_step)
