"""Pictures of masked-view prediction in TensorBoard: views, targets and renders, and the cameras.

At every validation, from the first validation batch (rank 0 only):

* ``masked_view/renders``: per scene, a row of context views (set A), a row of targets (set B), a row of
  the model's renders of them and, when the batch has true cameras, a row of the nearest-view baseline;
* ``masked_view/cameras_<i>``: a 3D plot of the true camera positions and viewing directions beside the
  predicted ones after similarity alignment (needs the batch's true cameras);
* ``masked_view/gaussians`` (explicit renderer): per scene, the context views, the depth of their Gaussians
  (near is bright), their opacity and colour, and, when the batch has depth, the data's depth.

After ``selfsup3d validate`` it also prints a short summary: the model's PSNR/SSIM beside the baselines and
the camera errors (on unposed scenes, e.g. converted video, the render figures and a line saying that the pose
figures need cameras); with :class:`OracleComparison` in the run, beside the oracle's figures on the same views.

Reads the tensors that :meth:`MaskedViewPrediction.evaluate` returns (``context``, ``target``, ``render``,
``pred_c2w``, ``gt_c2w``), for the objective fitted alone or for each masked-view component of a multi-task
run (tags ``<name>/renders``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch import LightningModule, Trainer  # noqa: E402
from lightning.pytorch.trainer.states import TrainerFn  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

from selfsup3d.callbacks.base import ObjectiveCallback  # noqa: E402
from selfsup3d.callbacks.images import image_grid, tensorboard  # noqa: E402
from selfsup3d.datamodules.views import batch_size  # noqa: E402
from selfsup3d.errors import ConfigError  # noqa: E402
from selfsup3d.metrics.nvs import nearest_view_baseline  # noqa: E402
from selfsup3d.objectives.base import PretrainObjective, load_objective  # noqa: E402
from selfsup3d.objectives.masked_view import MaskedViewPrediction  # noqa: E402


def camera_figure(pred_c2w: Tensor, gt_c2w: Tensor, num_context: int | None = None, title: str = "") -> Figure:
    """A 3D plot of true (circles) and predicted (crosses) camera centres with short viewing-direction
    strokes; context cameras are drawn in blue, targets in orange; a grey line joins each pair.

    Args:
        pred_c2w: ``[V, 4, 4]`` predicted cameras, aligned to the true ones.
        gt_c2w: ``[V, 4, 4]`` true cameras.
        num_context: the first ``num_context`` views are context views (colour); ``None``: one colour.
        title: the plot's title.
    """
    pred, gt = pred_c2w.detach().float().cpu(), gt_c2w.detach().float().cpu()
    fig = plt.figure(figsize=(4.5, 4.5), dpi=100)
    ax = fig.add_subplot(projection="3d")
    centres = gt[:, :3, 3]
    extent = float((centres - centres.mean(0)).norm(dim=-1).max().clamp(min=1e-6))
    stroke = 0.25 * extent
    v = gt.shape[0]
    colours = ["tab:blue" if num_context is None or i < num_context else "tab:orange" for i in range(v)]
    for i in range(v):
        for cams, marker in ((gt, "o"), (pred, "x")):
            c, z = cams[i, :3, 3], cams[i, :3, 2]
            ax.scatter(*c.tolist(), color=colours[i], marker=marker, s=30)
            end = c + stroke * z
            ax.plot(*[[float(c[k]), float(end[k])] for k in range(3)], color=colours[i], linewidth=1)
        ax.plot(*[[float(gt[i, k, 3]), float(pred[i, k, 3])] for k in range(3)], color="grey", linewidth=0.6)
    ax.scatter([], [], color="black", marker="o", label="true")
    ax.scatter([], [], color="black", marker="x", label="predicted (aligned)")
    ax.legend(loc="upper left", fontsize=7)
    mid = centres.mean(0)
    for setter, k in ((ax.set_xlim, 0), (ax.set_ylim, 1), (ax.set_zlim, 2)):
        setter(float(mid[k]) - 1.3 * extent, float(mid[k]) + 1.3 * extent)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


POSE_NEEDS_CAMERAS = "Pose figures need cameras"
"""How :func:`summary_text` starts the line it prints instead of the pose figures on unposed scenes."""


def summary_text(metrics: Mapping[str, float]) -> str:
    """The validation figures of masked-view prediction as a few lines of text.

    Args:
        metrics: logged values by name (``val/psnr``, ``val/psnr_mean_colour``, ``val/rot_err``, ...).
    """
    m = {k.removeprefix("val/"): v for k, v in metrics.items()}
    lines = [
        "Masked-view prediction on the validation scenes' novel views (set B rendered from set A):",
        "  PSNR dB   SSIM",
    ]
    rows = [
        ("model", ""),
        ("mean colour of the context views", "_mean_colour"),
        ("per-pixel mean of the context views", "_context_mean"),
        ("nearest context view by true camera", "_nearest"),
    ]
    if "oracle/psnr" in m:
        rows.insert(1, ("the oracle: the same model trained with the data's cameras (LVSM)", "oracle/"))
    for label, suffix in rows:
        if suffix == "oracle/" and "oracle/psnr" in m:
            line = f"  {m['oracle/psnr']:7.2f}  {m.get('oracle/ssim', float('nan')):5.3f}  {label}"
            lines.append(line + f" (model {m['psnr'] - m['oracle/psnr']:+.2f} dB)")
            continue
        if f"psnr{suffix}" in m:
            line = f"  {m[f'psnr{suffix}']:7.2f}  {m.get(f'ssim{suffix}', float('nan')):5.3f}  {label}"
            if suffix:
                line += f" (model {m['psnr'] - m[f'psnr{suffix}']:+.2f} dB)"
            lines.append(line)
    if "rot_err" in m:
        lines.append(
            f"Cameras vs the data's, after similarity alignment: rotation error {m['rot_err']:.1f} deg, "
            f"translation direction error {m['trans_err']:.1f} deg, AUC@5/15/30 "
            f"{m.get('auc5', float('nan')):.3f}/{m.get('auc15', float('nan')):.3f}/{m.get('auc30', float('nan')):.3f}"
        )
    if "rot_err_identity" in m:
        lines.append(f"  (cameras that never turn: rotation error {m['rot_err_identity']:.1f} deg)")
    if "rpa30" in m:
        lines.append(
            f"Relative pose accuracy (all view pairs, max of rotation and translation-direction error) RPA@5/15/30 "
            f"{m.get('rpa5', float('nan')):.3f}/{m.get('rpa15', float('nan')):.3f}/{m['rpa30']:.3f}"
        )
    if "psnr_still_cameras" in m:
        drop = m["psnr"] - m["psnr_still_cameras"]
        lines.append(
            f"With every camera at the canonical pose the render is {m['psnr_still_cameras']:.2f} dB "
            f"({-drop:+.2f} dB): the render {'rests on' if drop >= 1 else 'hardly uses'} the cameras"
        )
    if "depth_abs_rel" in m:
        lines.append(
            f"Depth of the context views' Gaussians vs the data's (median-scaled per scene): AbsRel "
            f"{m['depth_abs_rel']:.3f}, delta<1.25 {m.get('depth_delta1', float('nan')):.3f}; a constant depth: "
            f"AbsRel {m.get('depth_abs_rel_constant', float('nan')):.3f}, delta<1.25 "
            f"{m.get('depth_delta1_constant', float('nan')):.3f}"
        )
    if "probe_r10" in m:
        lines.append(
            f"RayZer pose probe on the camera tokens: R@10 {m['probe_r10']:.3f} (chance "
            f"{m.get('probe_r10_chance', float('nan')):.3f}), t@0.3 {m['probe_t03']:.3f} (chance "
            f"{m.get('probe_t03_chance', float('nan')):.3f})"
        )
    if "focal_err" in m:
        lines.append(f"Focal length: relative error {100 * m['focal_err']:.1f}% (predicted FOV {m['fov_deg']:.1f} deg)")
    if "rot_err" not in m and "focal_err" not in m:
        lines.append(
            f"{POSE_NEEDS_CAMERAS}: the validation scenes carry no cameras.json (unposed, e.g. converted video), so "
            "the predicted cameras, the nearest-view baseline, the pose probe and the focal length are not measured"
        )
    return "\n".join(lines)


class MaskedViewPictures(ObjectiveCallback):
    """Logs renders and camera plots of masked-view prediction to TensorBoard at every validation.

    Args:
        max_scenes: scenes of the first validation batch to show.
        max_views: at most this many views per row.
        summary: print the figures after ``validate`` (see :func:`summary_text`).
        min_size: views smaller than this many pixels are enlarged by a whole factor (nearest neighbour), so
            that CPU-sized renders (16x16) stay legible in TensorBoard.
    """

    objective = MaskedViewPrediction
    first_batch_only = True
    global_zero_only = True

    def __init__(self, max_scenes: int = 4, max_views: int = 8, summary: bool = True, min_size: int = 64) -> None:
        super().__init__()
        self.max_scenes = max_scenes
        self.max_views = max_views
        self.summary = summary
        self.min_size = min_size

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self.summary and trainer.state.fn == TrainerFn.VALIDATING and self.validating(trainer, pl_module)):
            return
        assert isinstance(pl_module, PretrainObjective)
        for name, component in pl_module.components():
            if isinstance(component, MaskedViewPrediction):
                prefix = f"val/{name}/" if name else "val/"
                logged = trainer.callback_metrics.items()
                metrics = {k.removeprefix(prefix): float(v) for k, v in logged if k.startswith(prefix)}
                if "psnr" in metrics:
                    print(summary_text(metrics), flush=True)

    def on_validation_component(
        self, trainer: Trainer, pl_module: PretrainObjective, name: str, component: Any, outputs: Any, batch: Any
    ) -> None:
        writer = tensorboard(trainer)
        if writer is not None and all(isinstance(outputs.get(k), Tensor) for k in ("context", "target", "render")):
            self.log_pictures(writer, name or "masked_view", outputs, trainer.global_step)
            if isinstance(outputs.get("context_depth"), Tensor):
                writer.add_image(
                    f"{name or 'masked_view'}/gaussians", self.gaussian_grid(outputs, batch), trainer.global_step
                )

    def log_pictures(self, writer: Any, tag: str, outputs: Mapping[str, Any], step: int) -> None:
        """The render grid and the camera plots of one validation batch's outputs, under ``tag/``."""
        writer.add_image(f"{tag}/renders", self.render_grid(outputs), step)
        if isinstance(outputs.get("pred_c2w"), Tensor) and isinstance(outputs.get("gt_c2w"), Tensor):
            num_context = outputs["context"].shape[1]
            for i in range(min(self.max_scenes, 2, outputs["gt_c2w"].shape[0])):
                fig = camera_figure(
                    outputs["pred_c2w"][i], outputs["gt_c2w"][i], num_context, f"scene {i}: true o, predicted x"
                )
                writer.add_figure(f"{tag}/cameras_{i}", fig, step, close=True)

    def gaussian_grid(self, outputs: Mapping[str, Any], batch: Any) -> Tensor:
        """``[3, H', W']`` picture of the explicit renderer's Gaussians: for each scene, rows of context views, the
        Gaussians' depth (inverse depth, normalised per scene: near is bright), opacity and colour, and the
        data's depth when the batch has it."""
        context, depth = outputs["context"], outputs["context_depth"].float()
        true = batch.get("depth") if isinstance(batch, Mapping) else None
        rows: list[Tensor] = []
        labels: list[str] = []
        va = context.shape[1]

        def inverse(d: Tensor) -> Tensor:
            inv = torch.where(d > 0, 1.0 / d.clamp(min=1e-6), torch.zeros_like(d))
            lo, hi = inv[inv > 0].min() if (inv > 0).any() else 0.0, inv.max()
            return ((inv - lo) / (hi - lo).clamp(min=1e-6)).clamp(0, 1).expand(-1, 3, -1, -1)

        for i in range(min(self.max_scenes, context.shape[0])):
            rows += [context[i, : self.max_views], inverse(depth[i, : self.max_views])]
            labels += [f"scene {i}: context", "Gaussian depth"]
            if isinstance(outputs.get("opacity"), Tensor):
                rows.append(outputs["opacity"][i, : self.max_views].float().expand(-1, 3, -1, -1))
                labels.append("opacity")
            if isinstance(outputs.get("colour"), Tensor):
                rows.append(outputs["colour"][i, : self.max_views].float())
                labels.append("colour")
            if isinstance(true, Tensor):
                rows.append(inverse(true[i, :va][: self.max_views].float()))
                labels.append("data depth")
        factor = math.ceil(self.min_size / min(context.shape[-2:]))
        if factor > 1:
            rows = [F.interpolate(row.float(), scale_factor=factor, mode="nearest") for row in rows]
        return image_grid(rows, labels=labels)

    def render_grid(self, outputs: Mapping[str, Any]) -> Tensor:
        """``[3, H', W']`` picture: for each scene, rows of context views, targets, renders (and nearest views)."""
        rows: list[Tensor] = []
        context, target, render = outputs["context"], outputs["target"], outputs["render"]
        nearest = None
        gt = outputs.get("gt_c2w")
        if isinstance(gt, Tensor):
            va = context.shape[1]
            nearest = nearest_view_baseline(context.float(), gt[:, :va].float(), gt[:, va:].float())
        labels: list[str] = []
        for i in range(min(self.max_scenes, context.shape[0])):
            rows.append(context[i, : self.max_views])
            rows.append(target[i, : self.max_views])
            rows.append(render[i, : self.max_views])
            labels += [f"scene {i}: context", "targets", "renders"]
            if nearest is not None:
                rows.append(nearest[i, : self.max_views])
                labels.append("nearest context")
        factor = math.ceil(self.min_size / min(context.shape[-2:]))
        if factor > 1:
            rows = [F.interpolate(row.float(), scale_factor=factor, mode="nearest") for row in rows]
        return image_grid(rows, labels=labels)


class OracleComparison(ObjectiveCallback):
    """Scores the supervised oracle beside the self-supervised model on the same validation views.

    The oracle is a masked-view checkpoint trained with ``cameras: data`` (LVSM: the rays come from the data's
    cameras; RayZer's paper compares against it). At every validation it renders each batch's targets with the
    oracle too and logs its figures as ``val/oracle/<name>`` (``psnr``, ``ssim``, depth errors), which the
    :class:`MaskedViewPictures` summary prints beside the model's.

    Args:
        checkpoint: the oracle's checkpoint (``.../checkpoints/last.ckpt`` of a run with ``cameras: data``).
    """

    objective = MaskedViewPrediction

    def __init__(self, checkpoint: str) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.oracle: MaskedViewPrediction | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        oracle = load_objective(self.checkpoint)
        if not isinstance(oracle, MaskedViewPrediction):
            raise ConfigError(
                f"OracleComparison's checkpoint {self.checkpoint} holds a {type(oracle).__name__}, not a "
                "MaskedViewPrediction"
            )
        if oracle.cameras_from != "data":
            raise ConfigError(
                f"OracleComparison's checkpoint {self.checkpoint} was trained with cameras: {oracle.cameras_from}; the "
                "oracle is a run with model.init_args.cameras=data (the data's cameras)"
            )
        self.oracle = oracle.eval().requires_grad_(False).to(pl_module.device)

    @torch.no_grad()
    def on_validation_component(
        self, trainer: Trainer, pl_module: PretrainObjective, name: str, component: Any, outputs: Any, batch: Any
    ) -> None:
        assert self.oracle is not None
        out = self.oracle.step(batch, "val", self.oracle.encoder_for("val"))
        keep = {k: v for k, v in out.items() if k in ORACLE_FIGURES}
        pl_module.log_scalars("val", keep, batch_size(batch), prefix=f"{name}/oracle/" if name else "oracle/")


ORACLE_FIGURES = ("psnr", "ssim", "loss", "depth_abs_rel", "depth_delta1")
"""What :class:`OracleComparison` logs of the oracle."""
