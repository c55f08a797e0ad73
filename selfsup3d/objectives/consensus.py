"""2D-3D feature consensus (ConDense, Zhang et al., ECCV 2024): the encoder's features held in agreement with a
3D representation of the scene, dense and sparse.

For a batch of posed views with depth (``images``, ``K``, ``c2w``, ``depth`` of ``B`` scenes, ``V`` views each):

1. **2D branch**: the shared encoder and a light residual head give a dense map ``F2D`` per view (the patch
   grid, the encoder's width ``D``).
2. **3D branch** (:class:`~selfsup3d.heads.scene.SceneBranch`): J3D fuses the views' depth and cameras into a
   point cloud in the scene's unit cube carrying colours (``scene_input: colour``) or the 2D branch's features
   projected to ``feature_dim`` (``features``), voxelised; H3D, a 3D U-Net, turns it into a feature grid
   ``F^s`` and a density.
3. **Rendering**: ``F^s`` volume-rendered along every view's rays (the shared posed-ray renderer) gives
   ``feature_dim`` channels per cell, lifted to ``D`` by a bias-free linear map: ``F3D``; the density renders
   depth.
4. **Losses** (:mod:`selfsup3d.losses.consensus`), each weighted and logged:
   ``consensus(F3D, F2D)`` (cosine or L2, stop-gradient switches), ``fidelity(F2D, teacher)`` (the frozen
   teacher keeps the features from drifting), ``depth`` (rendered vs the views' depth, in cube units), and
   the key-point terms: 3D key points (score and descriptor heads over ``F^s``, non-maximum suppression over
   occupied voxels) projected into every view are the targets of the 2D detector (score map over ``F2D``) and
   match the 2D descriptors at their projections (InfoNCE across key points and scenes); their scores learn
   how well they match (reliability).

A scene becomes a set of descriptor-decorated 3D key points (:meth:`FeatureConsensus.scene_keypoints`), an
image a set of 2D ones (:meth:`FeatureConsensus.image_keypoints`): the pieces of 2D->3D scene retrieval and
duplicate-scene detection (:class:`~selfsup3d.callbacks.SceneRetrieval`, ``selfsup3d retrieve``). The 3D
backbone is a product too: ``SceneBranch`` is exported beside the encoder, and a linear probe on its pooled
grid features (``num_classes``) is trained online on detached features and reported.

Cameras come from the data (``cameras: data``), or, in a multi-task run, from a masked-view objective's
camera estimator (``cameras: predicted``): poses relative to the first view, their unknown scale fixed in
closed form so that the views' point clouds share one centre, and the predicted focal length.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup3d.datamodules.spec import DataSpec
from selfsup3d.datamodules.views import select_views
from selfsup3d.encoders.base import Encoder, EncoderOutput
from selfsup3d.encoders.teacher import FrozenTeacher, build_teacher
from selfsup3d.errors import ConfigError, config_key, require
from selfsup3d.geometry.cameras import scale_intrinsics
from selfsup3d.geometry.points import sample_pixels, scale_to_common_centre
from selfsup3d.heads.camera import CameraEstimator
from selfsup3d.heads.keypoints import (
    KeypointHead2D,
    KeypointSet,
    project_keypoints,
    sample_descriptors_2d,
    select_keypoints_2d,
    select_keypoints_3d,
)
from selfsup3d.heads.scene import SceneBranch, SceneGrid, pooled_depth, sample_known_pixels
from selfsup3d.layers.conv import ResidualHead
from selfsup3d.losses.consensus import (
    Metric,
    consensus_loss,
    depth_loss,
    fidelity_loss,
    keypoint_descriptor_loss,
    keypoint_detection_loss,
    keypoint_heatmap,
    keypoint_reliability_loss,
    linear_probe_loss,
)
from selfsup3d.objectives.base import PretrainObjective


class FeatureConsensus(PretrainObjective):
    """ConDense-style 2D-3D feature consensus on the shared encoder (see the module docstring).

    Args:
        encoder: the shared encoder.
        feature_dim: channels of the 3D feature grid and of the rendered maps before lifting.
        head_hidden: hidden width of the 2D branch's residual head (default: the encoder's width).
        scene_input: what J3D voxelises: ``colour`` (the coloured point cloud) or ``features`` (the 2D
            branch's features at the points, projected to ``feature_dim``).
        detach_scene_input: with ``scene_input: features``, the 3D branch's input takes no gradient.
        grid_size: voxels per side of the scene grid.
        grid_width: channels of the 3D U-Net at full resolution.
        grid_levels: the U-Net's down-sampling stages.
        num_coarse: stratified samples per ray.
        num_fine: importance samples per ray.
        consensus: ``cosine`` or ``l2``.
        detach_2d: ``F2D`` is a fixed target of the consensus (only the 3D branch learns from it).
        detach_3d: ``F3D`` is a fixed target of the consensus (only the 2D branch learns from it).
        lambda_consensus: weight of the consensus term.
        lambda_fidelity: weight of the fidelity term (0: no teacher is built).
        lambda_depth: weight of the depth term.
        lambda_keypoints: weight of the key-point terms (detection + descriptors + reliability; 0: no heads).
        num_keypoints: 3D key points per scene (and 2D ones per image) in training.
        summary_keypoints: key points per scene and per image in the retrieval summaries (:meth:`scene_keypoints`,
            :meth:`image_keypoints`; local maxima at most); ``null``: ``num_keypoints``.
        descriptor_dim: key-point descriptor channels.
        keypoint_temperature: temperature of the descriptors' InfoNCE.
        teacher: the fidelity term's frozen teacher: ``null`` (the encoder as built), ``ema``/``ema:DECAY`` (a
            moving average of the encoder), a weights file or a timm model id (see
            :func:`~selfsup3d.encoders.teacher.build_teacher`).
        cameras: ``data`` (the batch's cameras) or ``predicted`` (a masked-view objective's, in a multi-task run).
        camera_objective: with ``predicted``, the name of that objective in the multi-task run.
        num_classes: classes of the 3D backbone's online linear probe (``null``: no probe).
        max_views: use the first ``max_views`` views of each scene (``null``: all), e.g. beside masked-view
            prediction on one stream of many views (training batches come in random view order); the name and
            meaning of :func:`~selfsup3d.datamodules.views.views_as_images`'s ``max_views``.
        render_pixels: in training, the consensus and depth terms compare this many random foreground pixels per
            view, ``F2D`` read there bilinearly (what a probe of dense features reads), instead of the patch grid
            (``null``: the patch grid, as validation does).
        num_views: the old name of ``max_views``: still read, with a warning (it read like the data's ``num_views``,
            the views per sample).
        **kwargs: optimisation and fine-tuning arguments of :class:`~selfsup3d.objectives.base.PretrainObjective`.
    """

    input_kind = "multi_view"

    def __init__(
        self,
        encoder: Encoder,
        # the two branches
        feature_dim: int = 64,
        head_hidden: int | None = None,
        scene_input: Literal["colour", "features"] = "colour",
        detach_scene_input: bool = True,
        # the scene grid and its rendering
        grid_size: int = 32,
        grid_width: int = 16,
        grid_levels: int = 3,
        num_coarse: int = 16,
        num_fine: int = 16,
        # the losses
        consensus: Metric = "cosine",
        detach_2d: bool = False,
        detach_3d: bool = False,
        lambda_consensus: float = 1.0,
        lambda_fidelity: float = 1.0,
        lambda_depth: float = 0.1,
        lambda_keypoints: float = 0.1,
        # key points, the teacher, cameras, the 3D probe
        num_keypoints: int = 32,
        summary_keypoints: int | None = None,
        descriptor_dim: int = 32,
        keypoint_temperature: float = 0.07,
        teacher: str | None = None,
        cameras: Literal["data", "predicted"] = "data",
        camera_objective: str = "masked_view",
        num_classes: int | None = None,
        max_views: int | None = None,
        render_pixels: int | None = 256,
        num_views: int | None = None,
        **kwargs: Any,
    ) -> None:
        if num_views is not None:  # the old name (before super().__init__: the hyper-parameters keep the new one)
            if max_views not in (None, num_views):
                raise ConfigError(
                    f"{config_key('num_views')}={num_views} and {config_key('max_views')}={max_views}: num_views is "
                    "the old name of max_views; set max_views alone"
                )
            warnings.warn(
                f"{config_key('num_views')} is now {config_key('max_views')} (the first views of each scene, as "
                "views_as_images names them); set that instead",
                FutureWarning,
                stacklevel=2,
            )
            max_views, num_views = num_views, None
        super().__init__(encoder, **kwargs)
        for key, value in {"lambda_consensus": lambda_consensus, "lambda_fidelity": lambda_fidelity,
                           "lambda_depth": lambda_depth, "lambda_keypoints": lambda_keypoints}.items():  # fmt: skip
            require(value >= 0, self.key(key), ">= 0", value)
        if detach_2d and detach_3d:
            raise ConfigError(f"{self.key('detach_2d')} and {self.key('detach_3d')} together leave nothing to learn")
        if scene_input not in ("colour", "features") or cameras not in ("data", "predicted"):
            raise ConfigError(f"{self.key('scene_input')} is colour|features, {self.key('cameras')} data|predicted")
        if grid_size % 2**grid_levels:
            raise ConfigError(
                f"{self.key('grid_size')}={grid_size} must be divisible by 2**grid_levels={2**grid_levels}"
            )
        dim = encoder.embed_dim
        self.patch_size = encoder.patch_size
        self.scene_input, self.detach_scene_input = scene_input, detach_scene_input
        self.metric, self.detach_2d, self.detach_3d = consensus, detach_2d, detach_3d
        self.lambda_consensus, self.lambda_fidelity = lambda_consensus, lambda_fidelity
        self.lambda_depth, self.lambda_keypoints = lambda_depth, lambda_keypoints
        self.num_keypoints, self.keypoint_temperature = num_keypoints, keypoint_temperature
        for key, count in (("num_keypoints", num_keypoints), ("summary_keypoints", summary_keypoints)):
            require(count is None or count >= 1, self.key(key), ">= 1", count)
        self.summary_keypoints = summary_keypoints or num_keypoints
        self.cameras, self.camera_objective = cameras, camera_objective
        self.max_views, self.render_pixels = max_views, render_pixels
        self._camera_source: list[PretrainObjective] = []  # bound in a multi-task run (not a submodule)
        self.head2d = ResidualHead(dim, head_hidden or dim)
        self.to_scene = nn.Linear(dim, feature_dim) if scene_input == "features" else None
        with_keypoints = lambda_keypoints > 0
        self.scene = SceneBranch(
            3 if scene_input == "colour" else feature_dim,
            feature_dim,
            grid_size,
            grid_width,
            grid_levels,
            descriptor_dim if with_keypoints else 0,
            num_coarse,
            num_fine,
        )
        self.lift = nn.Linear(feature_dim, dim, bias=False)
        self.keypoints2d = KeypointHead2D(dim, descriptor_dim) if with_keypoints else None
        self.grid_probe = nn.Linear(feature_dim, num_classes) if num_classes else None
        self.teacher: FrozenTeacher | None = None
        if lambda_fidelity > 0:
            self.teacher = build_teacher(teacher, encoder, kwargs.get("init_encoder_from"))

    # ------------------------------------------------------------------ set-up
    def needs_cameras(self) -> str | None:
        if self.cameras != "data":
            return None
        return f"{self.key('cameras')}=data; `predicted` takes a masked-view objective's cameras in a multi-task run"

    def check_data(self, spec: DataSpec) -> None:
        h, w = spec.image_hw
        if h % self.patch_size or w % self.patch_size:
            raise ConfigError(
                f"{spec.key('image_size')}={[h, w]} is not divisible by the encoder's patch size "
                f"{self.encoder_key('patch_size')}={self.patch_size}"
            )
        if not spec.with_depth:
            raise ConfigError(
                f"FeatureConsensus fuses the views' depth into the scene, but the data at {spec.key_prefix} has no "
                "depth: use scenes with depth (`selfsup3d data render`, converted captures with depth)"
            )
        if self.cameras == "predicted" and not self._camera_source:
            raise ConfigError(
                f"{self.key('cameras')}=predicted takes the cameras of a masked-view objective in the same "
                f"multi-task run, named by {self.key('camera_objective')}={self.camera_objective!r}"
            )
        if self.grid_probe is not None and spec.num_classes not in (None, self.grid_probe.out_features):
            raise ConfigError(
                f"{self.key('num_classes')}={self.grid_probe.out_features} but the data has {spec.num_classes}"
            )

    def bind(self, components: Mapping[str, PretrainObjective]) -> None:
        """In a multi-task run, ``cameras: predicted`` finds its camera estimator among the other objectives."""
        if self.cameras == "predicted":
            source = components.get(self.camera_objective)
            if source is None or not isinstance(getattr(source, "camera", None), CameraEstimator):
                raise ConfigError(
                    f"{self.key('camera_objective')}={self.camera_objective!r} names no masked-view objective of "
                    f"this run ({', '.join(components)})"
                )
            self._camera_source = [source]

    # ------------------------------------------------------------------ the two branches
    def features_2d(self, images: Tensor, encoder: Encoder) -> tuple[EncoderOutput, Tensor]:
        """The encoder's output and ``F2D [N, D, h, w]`` of ``images [N, 3, H, W]``."""
        enc = encoder(images)
        return enc, self.head2d(enc.patch_grid)

    def scene_cameras(self, batch: Mapping[str, Any], enc: EncoderOutput, b: int, v: int) -> tuple[Tensor, Tensor]:
        """``K`` and ``c2w`` ``[B, V, ...]``: the data's, or predicted (see the module docstring)."""
        if self.cameras == "data":
            return batch["K"].float(), batch["c2w"].float()
        image_hw = tuple(batch["images"].shape[-2:])
        with torch.no_grad():  # the masked-view objective's camera estimator learns from its own loss
            cameras = self._camera_source[0].camera.predict(enc.patches.unflatten(0, (b, v)), enc.grid, image_hw)
            c2w = scale_to_common_centre(cameras.c2w, cameras.K, batch["depth"].float())
        return cameras.K, c2w

    def build_scene(self, batch: Mapping[str, Any], f2d: Tensor, K: Tensor, c2w: Tensor) -> SceneGrid:
        """J3D + H3D on the views of ``batch`` (``F2D [B·V, D, h, w]`` for ``scene_input: features``)."""
        images, depth = batch["images"], batch["depth"].float()
        b, v = images.shape[:2]
        mask = batch.get("mask")
        cube = self.scene.fit_cube(depth, K, c2w, mask)
        if self.to_scene is None:
            values = images.float()
        else:
            source = f2d.detach() if self.detach_scene_input else f2d
            values = self.to_scene(source.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).unflatten(0, (b, v))
        return self.scene(self.scene.embed(depth, K, c2w, values, cube), cube)

    # ------------------------------------------------------------------ the step
    def step(self, batch: dict[str, Any], stage: str, encoder: Encoder) -> dict[str, Any]:
        if self.max_views is not None:
            batch = select_views(batch, slice(0, self.max_views))
        images = batch["images"]
        b, v, _, height, width = images.shape
        enc, f2d = self.features_2d(images.flatten(0, 1), encoder)
        h, w = enc.grid
        K, c2w = self.scene_cameras(batch, enc, b, v)
        scene = self.build_scene(batch, f2d, K, c2w)
        target_depth, surface = pooled_depth(batch["depth"].float().flatten(0, 1), (h, w))
        mask = batch.get("mask")
        known = surface  # the dense terms: the foreground where masks are given; key points: every surface
        if isinstance(mask, Tensor):
            known = surface & (F.adaptive_avg_pool2d(mask.float().flatten(0, 1), (h, w)) >= 0.5)
        target_depth = scene.cube.depth_to_unit(target_depth.unflatten(0, (b, v))).flatten(0, 1)
        if stage == "train" and self.render_pixels:
            # the consensus at random foreground pixels, F2D read there bilinearly (as probes read features)
            pixel_known = batch["depth"].float().flatten(0, 1) > 0
            if isinstance(mask, Tensor):
                pixel_known = pixel_known & (mask.flatten(0, 1) > 0.5)
            pixels, use = sample_known_pixels(pixel_known, self.render_pixels)
            rendered, depth3d, opacity = self.scene.render(
                scene, K, c2w, (h, w), (height, width), True, pixels.unflatten(0, (b, v))
            )
            uv = torch.stack([pixels % width + 0.5, pixels // width + 0.5], dim=-1).float()
            uv = uv * torch.tensor([w / width, h / height], device=uv.device)
            f2d_at = sample_pixels(f2d, uv).transpose(1, 2)[..., None]  # [B·V, D, R, 1]
            depth_at = batch["depth"].float().flatten(0, 1).flatten(1).gather(1, pixels)
            depth_at = scene.cube.depth_to_unit(depth_at.unflatten(0, (b, v))).flatten(0, 1)[:, None, :, None]
            compared, target_2d, target_3d, where = f2d_at, depth_at, rendered, use[:, None, :, None]
        else:
            rendered, depth3d, opacity = self.scene.render(scene, K, c2w, (h, w), (height, width), stage == "train")
            compared, target_2d, target_3d, where = f2d, target_depth, rendered, known
        f3d = self.lift(target_3d.flatten(0, 1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # [B·V, D, ·, ·]

        out: dict[str, Any] = {}
        out["consensus"] = consensus_loss(f3d, compared, where, self.metric, self.detach_2d, self.detach_3d)
        out["depth"] = depth_loss(depth3d.flatten(0, 1), target_2d, where)
        loss = self.lambda_consensus * out["consensus"] + self.lambda_depth * out["depth"]
        teacher_grid = None
        if self.teacher is not None:
            teacher_grid = self.teacher(images.flatten(0, 1)).patch_grid
            out["fidelity"] = fidelity_loss(f2d, teacher_grid)
            loss = loss + self.lambda_fidelity * out["fidelity"]
        if self.keypoints2d is not None:
            terms = self.keypoint_losses(scene, f2d, K, c2w, target_depth, surface, (h, w), (height, width))
            out.update(terms)
            loss = loss + self.lambda_keypoints * (
                terms["kp_detection"] + terms["kp_descriptor"] + terms["kp_reliability"]
            )
        if self.grid_probe is not None:
            out.update(self.probe_3d(scene, batch["label"]))
            loss = loss + out["probe3d_loss"]
        out["loss"] = loss
        with torch.no_grad():
            out["opacity"] = opacity.flatten(0, 1)[where].mean()
            out["depth_abs_rel"] = ((depth3d.flatten(0, 1) - target_2d).abs() / target_2d.clamp(min=1e-6))[where].mean()
        if stage != "train":  # pictures and key points for callbacks
            out.update(images=images, f2d=f2d.detach(), f3d=f3d.detach(), known=known, scene=scene)
            if teacher_grid is not None:
                out["teacher_f2d"] = teacher_grid
        return out

    def keypoint_losses(
        self, scene: SceneGrid, f2d: Tensor, K: Tensor, c2w: Tensor, depth: Tensor, known: Tensor,
        size: tuple[int, int], image_hw: tuple[int, int],
    ) -> dict[str, Tensor]:  # fmt: skip
        """Detection, descriptor and reliability terms of the 3D key points against the 2D heads."""
        assert self.keypoints2d is not None and scene.scores is not None
        b, v = c2w.shape[:2]
        h, w = size
        kp3 = select_keypoints_3d(scene.scores, scene.occupancy > 0, self.num_keypoints, 1, scene.descriptors)
        K_map = scale_intrinsics(K, w / image_hw[1], h / image_hw[0])
        depth_maps = torch.where(known, depth, torch.zeros_like(depth)).unflatten(0, (b, v))
        tolerance = 4.0 / self.scene.grid_size  # two voxels
        uv, visible = project_keypoints(
            kp3.positions, K_map, scene.cube.cameras_to_unit(c2w), depth_maps, None, tolerance
        )
        scores2d, desc2d = self.keypoints2d(f2d)
        uv_flat, vis_flat = uv.flatten(0, 1), visible.flatten(0, 1)
        desc_at = sample_descriptors_2d(desc2d, uv_flat).unflatten(0, (b, v))  # [B, V, N, E]
        assert kp3.descriptors is not None
        desc_loss, matched = keypoint_descriptor_loss(
            kp3.descriptors, desc_at, visible, kp3.valid, self.keypoint_temperature
        )
        heat = keypoint_heatmap(uv_flat, vis_flat, h, w, sigma=1.0)
        seen = visible.any(1)
        return {
            "kp_detection": keypoint_detection_loss(scores2d, heat),
            "kp_descriptor": desc_loss,
            "kp_reliability": keypoint_reliability_loss(kp3.scores, matched, seen & kp3.valid),
            "kp_visible": visible.float().sum(1).mean(),
            "kp_match": (matched * seen).sum() / seen.sum().clamp(min=1),
            "kp_uv": uv.detach(),  # [B, V, N, 2] in feature-map cells (pictures)
            "kp_seen": visible,
        }

    def probe_3d(self, scene: SceneGrid, labels: Tensor) -> dict[str, Tensor]:
        """The 3D backbone's online linear probe: class from the occupancy-pooled grid features (detached)."""
        assert self.grid_probe is not None
        return linear_probe_loss(self.grid_probe(scene.pooled_features().detach()), labels)

    # ------------------------------------------------------------------ sparse summaries (retrieval)
    @torch.no_grad()
    def scene_keypoints(self, batch: Mapping[str, Any], encoder: Encoder) -> KeypointSet:
        """Each scene of ``batch`` (the views it holds) as its descriptor-decorated 3D key points."""
        if self.keypoints2d is None:
            raise ConfigError(f"scene key points need the key-point heads: {self.key('lambda_keypoints')} > 0")
        images = batch["images"]
        b, v = images.shape[:2]
        enc, f2d = self.features_2d(images.flatten(0, 1), encoder)
        K, c2w = self.scene_cameras(batch, enc, b, v)
        scene = self.build_scene(batch, f2d, K, c2w)
        assert scene.scores is not None
        kp = select_keypoints_3d(scene.scores, scene.occupancy > 0, self.summary_keypoints, 1, scene.descriptors)
        assert kp.descriptors is not None
        return KeypointSet.from_keypoints(kp.descriptors, kp.valid, kp.scores)

    @torch.no_grad()
    def image_keypoints(self, images: Tensor, encoder: Encoder) -> KeypointSet:
        """Each image ``[N, 3, H, W]`` as its descriptor-decorated 2D key points."""
        if self.keypoints2d is None:
            raise ConfigError(f"image key points need the key-point heads: {self.key('lambda_keypoints')} > 0")
        _, f2d = self.features_2d(images, encoder)
        scores, desc = self.keypoints2d(f2d)
        kp = select_keypoints_2d(scores, self.summary_keypoints, 1, desc)
        assert kp.descriptors is not None
        return KeypointSet.from_keypoints(kp.descriptors, kp.valid, kp.scores)

    def exports(self) -> dict[str, tuple[dict[str, Tensor], dict[str, Any]]]:
        """The 3D backbone, written beside the encoder as ``backbone3d.safetensors`` (see EncoderExport)."""
        state = {k: t.detach().clone() for k, t in self.scene.state_dict().items()}
        meta = {"class_path": "selfsup3d.heads.scene.SceneBranch", "init_args": self.scene.config}
        return {"backbone3d": (state, {**meta, "scene_input": self.scene_input})}
