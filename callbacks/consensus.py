"""The feature-consensus objective in TensorBoard: feature pictures, key points, 2D->3D retrieval.

* :class:`ConsensusPictures`: for the first validation batch, per scene, the views, then the first three
  principal components of ``F2D``, ``F3D`` and the teacher's features, one PCA basis shared by all three and
  all views (colours are comparable), then the views with their visible 3D key points drawn.
* :class:`SceneRetrieval`: during validation, every scene is summarised twice from its views: view 0's 2D key
  points (the query) against the 3D key points of its other views (the database: 2D->3D retrieval, top-1 and
  top-5 over the validation scenes of the rank), and two disjoint halves of its other views against each other
  (duplicate-scene detection: ROC AUC of same-scene pairs against all others). Logged as
  ``val/<name>/retrieval_top1``, ``retrieval_top5``, ``retrieval_chance``, ``duplicate_auc``.

Both read the objective's validation outputs (:meth:`FeatureConsensus.step`), alone or in a multi-task run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from selfsup3d.callbacks.base import ObjectiveCallback
from selfsup3d.callbacks.images import feature_pca, image_grid, tensorboard
from selfsup3d.metrics.keypoint_retrieval import RetrievalProtocol, SetSimilarity
from selfsup3d.objectives.base import PretrainObjective
from selfsup3d.objectives.consensus import FeatureConsensus
from selfsup3d.objectives.multitask import MultiTask


def draw_points(images: Tensor, uv: Tensor, seen: Tensor, scale: float, radius: int = 1) -> Tensor:
    """``images [V, 3, H, W]`` with a red square at each seen point ``uv [V, N, 2]`` (in cells of ``scale`` pixels)."""
    out = images.detach().float().cpu().clone()
    h, w = out.shape[-2:]
    for view in range(out.shape[0]):
        for (u, v), ok in zip(uv[view].cpu().tolist(), seen[view].cpu().tolist()):
            if not ok:
                continue
            col, row = int(u * scale), int(v * scale)
            r0, r1, c0, c1 = (
                max(0, row - radius),
                min(h, row + radius + 1),
                max(0, col - radius),
                min(w, col + radius + 1),
            )
            out[view, :, r0:r1, c0:c1] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    return out


def consensus_picture(out: Mapping[str, Any], scene: int, max_views: int, min_size: int = 64) -> Tensor:
    """The picture of one scene of a validation step's outputs (see the module docstring)."""
    images = out["images"][scene, :max_views].float()
    v, _, h, w = images.shape
    f2d, f3d = (
        out["f2d"].unflatten(0, out["images"].shape[:2])[scene, :v],
        out["f3d"].unflatten(0, out["images"].shape[:2])[scene, :v],
    )
    maps = [f2d, f3d]
    if isinstance(out.get("teacher_f2d"), Tensor):
        maps.append(out["teacher_f2d"].unflatten(0, out["images"].shape[:2])[scene, :v])
    pca = feature_pca(torch.cat(maps), size=(h, w))
    rows = [images, *pca.split(v)]
    if isinstance(out.get("kp_uv"), Tensor):
        rows.append(draw_points(images, out["kp_uv"][scene, :v], out["kp_seen"][scene, :v], w / f2d.shape[-1]))
    factor = max(1, -(-min_size // min(h, w)))
    if factor > 1:
        rows = [F.interpolate(r.float().cpu(), scale_factor=factor, mode="nearest") for r in rows]
    return image_grid(rows)


class ConsensusPictures(ObjectiveCallback):
    """Feature PCA and key points of the first validation batch, to TensorBoard as ``<name>/features_<i>``.

    Args:
        max_scenes: scenes to show.
        max_views: views per scene.
    """

    objective = FeatureConsensus
    first_batch_only = True
    global_zero_only = True

    def __init__(self, max_scenes: int = 2, max_views: int = 4) -> None:
        self.max_scenes, self.max_views = max_scenes, max_views
        self.last_pictures: list[Tensor] = []

    def on_validation_component(
        self, trainer: Trainer, pl_module: PretrainObjective, name: str, component: Any, outputs: Any, batch: Any
    ) -> None:
        if "f2d" not in outputs:
            return
        scenes = range(min(self.max_scenes, outputs["images"].shape[0]))
        self.last_pictures = [consensus_picture(outputs, i, self.max_views) for i in scenes]
        writer = tensorboard(trainer)
        if writer is not None:
            for i, picture in enumerate(self.last_pictures):
                writer.add_image(f"{name or 'consensus'}/features_{i}", picture, trainer.global_step)


class SceneRetrieval(ObjectiveCallback):
    """2D->3D scene retrieval and duplicate detection on the validation scenes of each rank (see the module
    docstring and :class:`~selfsup3d.metrics.keypoint_retrieval.RetrievalProtocol`; ``selfsup3d retrieve`` computes the
    same over a whole held-out set).

    Args:
        mode: how a key-point set is compared with another
            (:func:`~selfsup3d.metrics.keypoint_retrieval.set_similarity`).
    """

    objective = FeatureConsensus

    def __init__(self, mode: SetSimilarity = "best_match") -> None:
        self.mode = mode
        self.protocols: dict[str, RetrievalProtocol] = {}
        self.last_metrics: dict[str, dict[str, float]] = {}

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.protocols = {}

    def on_validation_component(
        self, trainer: Trainer, pl_module: PretrainObjective, name: str, component: Any, outputs: Any, batch: Any
    ) -> None:
        scenes = _scene_batch(batch, pl_module, name)
        if scenes is None or component.keypoints2d is None or scenes["images"].shape[1] < 3:
            return
        self.protocols.setdefault(name, RetrievalProtocol(self.mode)).add(component, scenes, pl_module.encoder)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.validating(trainer, pl_module):
            return
        for name, protocol in self.protocols.items():
            self.last_metrics[name] = metrics = protocol.compute()
            for metric, value in metrics.items():
                pl_module.log(f"val/{name}/{metric}" if name else f"val/{metric}", value, sync_dist=True)


def _scene_batch(batch: Any, module: PretrainObjective, name: str) -> Mapping[str, Any] | None:
    """The multi-view batch component ``name`` read (its source's, in a multi-task run)."""
    if not isinstance(batch, Mapping):
        return None
    if name and isinstance(module, MultiTask) and module.source_of(name) in batch:
        batch = batch[module.source_of(name)]
    return batch if isinstance(batch.get("images"), Tensor) else None
