"""RayZer's pose probe at every validation: a small MLP trained on the frozen camera tokens of a probe split
(training objects) predicts relative poses of the validation scenes (held-out objects).

The probe's labels are the probe split's true cameras; the model never sees them (the callback runs after
the validation pass, under ``no_grad``, and trains only its own head). Logs ``val/probe_r10``,
``val/probe_t03``, ``val/probe_rot_err``, ``val/probe_trans_err`` and the same with ``_chance`` (the best
constant answer), under ``val/<name>/`` for a masked-view component of a multi-task run; see
:mod:`selfsup3d.eval.camera_token_probe` for the protocol.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from selfsup3d.callbacks.base import ObjectiveCallback
from selfsup3d.datamodules.combined import CombinedShards
from selfsup3d.datamodules.multiview import MultiViewShards
from selfsup3d.errors import ConfigError, require
from selfsup3d.eval.camera_token_probe import fit_camera_probe
from selfsup3d.objectives.base import PretrainObjective
from selfsup3d.objectives.masked_view import MaskedViewPrediction


class CameraTokenProbe(ObjectiveCallback):
    """Trains RayZer's pose probe on the camera tokens of ``probe_urls`` and reports it on the validation scenes.

    The probe split's samples take the validation view choice of the run's datamodule (its image size, view
    count, context split and view window), so probe and held-out pairs are drawn alike.

    Args:
        probe_urls: shards of the probe split (training objects, e.g. ``data/orbit/train-*.tar``); ``null``: the
            training shards of the objective (those of the run's datamodule, or of the source the masked-view
            objective reads in a multi-task run), so the probe follows the data the run trains on.
        num_scenes: probe-split scenes to read (the first ones, deterministic).
        batch_size: scenes per forward pass when reading the probe split.
        steps: training steps of the probe's MLP.
        hidden: the MLP's hidden width.
        every_n_validations: run at every n-th validation (the probe takes seconds on a CPU).
    """

    def __init__(
        self,
        probe_urls: str | list[str] | None = None,
        num_scenes: int = 256,
        batch_size: int = 16,
        steps: int = 600,
        hidden: int = 256,
        every_n_validations: int = 1,
    ) -> None:
        super().__init__()
        counts = {"num_scenes": num_scenes, "batch_size": batch_size, "steps": steps}
        for name, value in {**counts, "every_n_validations": every_n_validations}.items():
            require(value >= 1, f"CameraTokenProbe: {name}", ">= 1", value, ValueError)
        self.probe_urls = probe_urls
        self.num_scenes = num_scenes
        self.batch_size = batch_size
        self.steps = steps
        self.hidden = hidden
        self.every_n_validations = every_n_validations
        self._held_out: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self._validations = 0

    objective = MaskedViewPrediction

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._held_out = {}

    def on_validation_component(
        self, trainer: Trainer, pl_module: PretrainObjective, name: str, component: Any, outputs: Any, batch: Any
    ) -> None:
        tokens, c2w = outputs.get("camera_tokens"), outputs.get("gt_c2w")
        if isinstance(tokens, Tensor) and isinstance(c2w, Tensor):
            self._held_out.setdefault(name, []).append((tokens.float().cpu(), c2w.float().cpu()))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.validating(trainer, pl_module) or not self._held_out:
            return
        assert isinstance(pl_module, PretrainObjective)
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations:
            return
        components = dict(pl_module.components())
        for name, pairs in self._held_out.items():
            component = components[name]
            assert isinstance(component, MaskedViewPrediction)
            train_tokens, train_c2w = self.probe_tokens(trainer, pl_module, component, name)
            test_tokens = torch.cat([t for t, _ in pairs])
            test_c2w = torch.cat([c for _, c in pairs])
            result = fit_camera_probe(
                train_tokens, train_c2w, test_tokens, test_c2w, steps=self.steps, hidden=self.hidden
            )
            prefix = f"val/{name}/probe_" if name else "val/probe_"
            for key, value in result.as_dict(prefix).items():
                pl_module.log(key, value, on_epoch=True, rank_zero_only=True)
        self._held_out = {}

    @staticmethod
    def training_source(trainer: Trainer, pl_module: PretrainObjective, name: str) -> MultiViewShards | None:
        """The multi-view datamodule the component ``name`` trains on: the run's, or the source it reads in a
        multi-task run (``None`` when it is none of these)."""
        datamodule = trainer.datamodule
        if isinstance(datamodule, CombinedShards):
            source_of = getattr(pl_module, "source_of", None)
            routed = source_of(name) if callable(source_of) else None
            datamodule = datamodule.sources.get(routed) if routed else None
        return datamodule if isinstance(datamodule, MultiViewShards) else None

    @torch.no_grad()
    def probe_tokens(
        self, trainer: Trainer, pl_module: PretrainObjective, component: MaskedViewPrediction, name: str = ""
    ) -> tuple[Tensor, Tensor]:
        """Camera tokens ``[N, V, D]`` and true cameras ``[N, V, 4, 4]`` of the probe split's first scenes."""
        source = self.training_source(trainer, pl_module, name)
        urls = self.probe_urls if self.probe_urls is not None else source.train_urls if source is not None else None
        if urls is None:
            raise ConfigError(
                "CameraTokenProbe: the run's training data is not multi-view shards: set its probe_urls to shards "
                "of scenes with cameras"
            )
        kwargs: dict[str, Any] = {}
        if source is not None:
            kwargs = dict(
                image_size=source.image_hw,
                num_views=source.num_views,
                num_context_views=source.num_context_views,
                view_window=source.view_window,
                canonical_view=source.canonical_view,
            )
        data = MultiViewShards(
            urls,
            urls,
            batch_size=self.batch_size,
            num_workers=0,
            with_depth=False,
            val_batches=math.ceil(self.num_scenes / self.batch_size),
            **kwargs,
        )
        data.inventory_name = "camera-token probe training"  # announced as what it is, not as validation data
        data.setup("validate")
        tokens, cameras = [], []
        was_training = pl_module.training
        pl_module.eval()
        try:
            for batch in data.val_dataloader():
                batch = data.prepare_batch(batch, train=False)
                images = batch["images"].to(pl_module.device)
                pred = component(images, int(batch["num_context"]), pl_module.encoder)
                tokens.append(pred["camera_tokens"].float().cpu())
                cameras.append(batch["c2w"].float())
        finally:
            pl_module.train(was_training)
        return torch.cat(tokens)[: self.num_scenes], torch.cat(cameras)[: self.num_scenes]
