"""Masked-view prediction (RayZer, Jiang et al. 2025; renderer from LVSM, Jin et al. 2024).

Learning 3D from unposed, uncalibrated views with no camera or geometry labels. The ``V`` views of a scene
are split into set A (context, ``views[:num_context]``) and set B (targets, the rest). Then:

1. every view goes through the shared encoder;
2. a **camera estimator** (a transformer over all views' patch tokens plus one camera token per view)
   predicts each view's pose relative to a canonical reference view (view 0, a context view) and one focal
   length shared by the scene;
3. the cameras become pixel-level Plücker ray maps ``(d, o × d)``, patchified and linearly embedded;
4. a **scene reconstructor** (a transformer over set A's encoder tokens fused with their ray tokens, plus
   learnable scene tokens) produces the scene representation (the scene tokens);
5. a **renderer** (an LVSM-style transformer over each target's ray tokens and the scene tokens) predicts
   the target's patches (``Linear -> p² · 3``, sigmoid), unpatchified to an image.

The loss is photometric on set B only (MSE plus an optional VGG perceptual term); the batch's true
cameras (``K``, ``c2w``) are never read by the loss, only by the evaluation in validation.

What makes it learn (as in the official RayZer code): the pose and focal heads start at the identity pose
and a plausible field of view (their output layers start near zero), so that early Plücker rays already tell
the renderer which pixel each token is; all attention uses QK normalisation; gradient-norm spikes skip the
step (``grad_spike_factor``, the base class counts them).

Unlike RayZer, whose absolute image-index embedding ties a model to the view count it was trained with, no
token carries a view index: image tokens get 2D sin-cos patch positions and a learnable embedding that
marks the canonical view versus the others, and the camera estimator alternates attention within each view
and across views (as VGGT does), so any number of views and any A/B split work at inference.

Small, short runs (the CPU demo) need more help than RayZer's recipe gives; three options, off by default,
provide it: ``blend_context`` (the renderer refines a blend of the context views weighted by predicted-camera
distance, :class:`~selfsup3d.heads.latent_renderer.ContextBlend`), ``render_context_tokens`` (the renderer also attends
to set A's tokens, as LVSM's decoder-only model does) and ``ray_positions`` (2D patch positions on the ray
tokens). The heads live in :mod:`selfsup3d.heads.camera` and :mod:`selfsup3d.heads.latent_renderer`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup3d.datamodules.spec import DataSpec
from selfsup3d.encoders.base import Encoder
from selfsup3d.errors import ConfigError, require
from selfsup3d.geometry.cameras import fov_from_focal, relative_to_first
from selfsup3d.geometry.rays import patchify, plucker_map
from selfsup3d.heads.camera import CameraEstimator, DepthHead
from selfsup3d.heads.gaussians import PixelGaussianHead, render_gaussians
from selfsup3d.heads.latent_renderer import ContextBlend, Renderer, SceneReconstructor
from selfsup3d.layers.positions import sincos_positions
from selfsup3d.losses.perceptual import PerceptualLoss
from selfsup3d.losses.reprojection import min_reprojection_loss
from selfsup3d.metrics.depth import scaled_depth_errors
from selfsup3d.metrics.nvs import context_mean_baseline, mean_colour_baseline, nearest_view_baseline, psnr, ssim
from selfsup3d.metrics.pose import camera_metrics, relative_pose_accuracy, relative_rotation_error
from selfsup3d.objectives.base import PretrainObjective


class MaskedViewPrediction(PretrainObjective):
    """RayZer-style self-supervised masked-view prediction on the shared encoder.

    The batch is a multi-view batch (``images [B, V, 3, H, W]`` in ``[0, 1]``, ``num_context``: views
    ``[:num_context]`` are set A, the rest set B; ``K``/``c2w`` optional, read only for evaluation). The patch
    size of the rays and of the rendered patches is the encoder's; any ``V``, A/B split and resolution that
    the patch divides work, at training and at inference.

    Validation logs PSNR/SSIM of the renders beside the mean-colour, context-mean and nearest-view baselines
    (:mod:`selfsup3d.metrics.nvs`), and, when the batch has true cameras, pose errors after similarity alignment
    (``rot_err``, ``trans_err`` in degrees, ``auc5/15/30``, ``centre_err``; :mod:`selfsup3d.metrics.pose`) beside
    ``rot_err_identity`` (the rotation error of cameras that all keep the canonical view's orientation: the
    true views' mean relative angle) and the focal-length error; and ``psnr_still_cameras``, the PSNR of the
    same model rendering with every camera at the canonical pose: how much of the render rests on the
    predicted cameras (equal to ``psnr`` when the renderer ignores them).

    Args:
        encoder: the shared encoder (``selfsup3d.encoders.ViTEncoder``).
        dim: width of the camera estimator, scene reconstructor and renderer.
        num_heads: attention heads of those transformers.
        mlp_ratio: their MLP width ratio.
        camera_layers: camera-estimator depth (RayZer: 8).
        scene_layers: scene-reconstructor depth (RayZer: 12).
        render_layers: renderer depth (RayZer: 12).
        num_scene_tokens: learnable scene tokens (RayZer / LVSM: 3072).
        init_fov_deg: horizontal field of view the focal head starts at.
        focal_range: the predicted focal length stays within this factor of the initial one (2: a 50° start
            ranges over about 26° to 87°).
        perceptual_weight: weight of the VGG19 perceptual loss (RayZer 0.2, LVSM 0.5); 0 turns it off.
        perceptual_weights: where the VGG19 weights come from when the perceptual loss is on: a local
            torchvision state-dict file or a torchvision weights id (``VGG19_Weights.IMAGENET1K_V1``).
        perceptual_layers: how many of VGG19's five perceptual layers to compare.
        render_context_tokens: the renderer attends to the scene reconstructor's outputs at set A's tokens as
            well as to the scene tokens, as LVSM's decoder-only model does (RayZer: scene tokens only).
        ray_positions: add 2D sin-cos patch positions to the ray tokens of the reconstructor and the renderer
            (RayZer: rays only), so a token knows its pixel even while the predicted poses are far off.
        blend_context: the renderer refines a base image per target instead of drawing it from nothing: the
            context views blended with weights that fall with the distance between *predicted* cameras
            (:class:`ContextBlend`; the per-pixel context mean at the start). An image-based-rendering prior
            for small, short runs (the CPU demo); it gives the camera estimator a direct gradient too.
            RayZer: off.
        blend_sharpness: the blend's initial sharpness ``s`` (learned from there).
        reprojection_weight: weight of the auto-masked minimum reprojection loss (monodepth2) between all views
            of a scene: a depth head on the camera estimator's patch tokens predicts every view's depth, and
            each view is warped into every other through that depth and the *predicted* cameras
            (:mod:`selfsup3d.losses.reprojection`). Photometric like the render loss (no camera or depth
            labels), but it can only be low when cameras and depth are geometrically right. 0: off (RayZer).
        reprojection_auto_mask: drop pixels that the unwarped views already explain (monodepth2's auto-mask).
        grad_checkpointing: recompute the activations of every head block in the backward pass (the
            encoder's own ``grad_checkpointing`` does the same for the encoder).
        lr: peak learning rate (RayZer: 4e-4).
        warmup_steps: linear warm-up steps (RayZer: 3000).
        grad_spike_factor: skip a step whose gradient norm exceeds this many times its running mean.
        **kwargs: the remaining :class:`~selfsup3d.objectives.base.PretrainObjective` arguments.
    """

    input_kind = "multi_view"

    def __init__(
        self,
        encoder: Encoder,
        # the heads' transformers: width, heads, MLP ratio
        dim: int = 768,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        # their depths, and the scene representation's size (RayZer: 8, 12, 12 blocks and 3072 tokens)
        camera_layers: int = 8,
        scene_layers: int = 12,
        render_layers: int = 12,
        num_scene_tokens: int = 3072,
        # cameras
        init_fov_deg: float = 50.0,
        focal_range: float = 2.0,
        # the photometric loss
        perceptual_weight: float = 0.0,
        perceptual_weights: str | None = None,
        perceptual_layers: int = 5,
        # aids for small, short runs (off in RayZer)
        render_context_tokens: bool = False,
        ray_positions: bool = False,
        blend_context: bool = False,
        blend_sharpness: float = 4.0,
        # a photometric check of the cameras between the views themselves (off in RayZer)
        reprojection_weight: float = 0.0,
        reprojection_auto_mask: bool = True,
        # the renderer and where the cameras come from
        renderer: Literal["latent", "gaussians"] = "latent",
        cameras: Literal["predicted", "data"] = "predicted",
        gaussian_opacity_bias: float = 0.0,
        gaussian_size_px: float = 0.5,
        gaussian_init_depth: float = 1.0,
        gaussian_near: float = 0.05,
        gaussian_far: float | None = None,
        gaussian_min_opacity: float = 0.0,
        gaussian_eps2d: float = 0.3,
        focal_freeze_steps: int = 0,
        register_tokens: int = 0,
        photometric_scales: int = 1,
        # memory and optimisation (RayZer's)
        grad_checkpointing: bool = False,
        lr: float = 4e-4,
        warmup_steps: int = 3000,
        grad_spike_factor: float | None = 5.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(encoder, lr=lr, warmup_steps=warmup_steps, grad_spike_factor=grad_spike_factor, **kwargs)
        for key, value in {
            "dim": dim,
            "num_heads": num_heads,
            "camera_layers": camera_layers,
            "scene_layers": scene_layers,
            "render_layers": render_layers,
            "num_scene_tokens": num_scene_tokens,
        }.items():
            require(value >= 1, self.key(key), ">= 1", value)
        if dim % num_heads:
            raise ConfigError(f"{self.key('dim')}={dim} is not divisible by {self.key('num_heads')}={num_heads}")
        for key, value, ok, rule in (
            ("init_fov_deg", init_fov_deg, 1.0 < init_fov_deg < 179.0, "in (1, 179)"),
            ("blend_sharpness", blend_sharpness, blend_sharpness > 0, "> 0"),
            ("focal_range", focal_range, focal_range > 1, "> 1"),
            ("perceptual_weight", perceptual_weight, perceptual_weight >= 0, ">= 0"),
            ("reprojection_weight", reprojection_weight, reprojection_weight >= 0, ">= 0"),
        ):
            require(ok, self.key(key), rule, value)
        patch, in_dim = encoder.patch_size, encoder.embed_dim
        self.patch_size = patch
        ray_dim = 6 * patch * patch
        self.camera = CameraEstimator(
            in_dim, dim, camera_layers, num_heads, mlp_ratio, init_fov_deg, focal_range, register_tokens
        )
        self.reconstructor = SceneReconstructor(
            in_dim, ray_dim, dim, scene_layers, num_heads, mlp_ratio, num_scene_tokens
        )
        self.renderer_kind = renderer
        self.photometric_scales = photometric_scales
        self.gaussian_eps2d = gaussian_eps2d
        self.cameras_from = cameras
        self.focal_freeze_steps = focal_freeze_steps
        self.renderer = (
            Renderer(ray_dim, dim, render_layers, num_heads, mlp_ratio, patch, refine_base=blend_context)
            if renderer == "latent"
            else None
        )
        self.gaussians = (
            PixelGaussianHead(
                dim,
                patch,
                near=gaussian_near,
                init_depth=gaussian_init_depth,
                opacity_bias=gaussian_opacity_bias,
                size_px=gaussian_size_px,
                far=gaussian_far,
                min_opacity=gaussian_min_opacity,
            )
            if renderer == "gaussians"
            else None
        )
        if blend_context and renderer != "latent":
            raise ConfigError(
                f"{self.key('blend_context')}=true is an aid of the latent renderer; {self.key('renderer')}={renderer} "
                "places the context pixels itself: set blend_context to false"
            )
        self.blend = ContextBlend(blend_sharpness) if blend_context else None
        if cameras == "data":  # the oracle trains no camera estimator: every trainable weight gets a gradient (DDP)
            self.camera.requires_grad_(False)
        self.reprojection_weight = reprojection_weight
        self.reprojection_auto_mask = reprojection_auto_mask
        self.depth = DepthHead(dim, patch) if reprojection_weight > 0 else None
        self.perceptual_weight = perceptual_weight
        self.perceptual: PerceptualLoss | None = None
        if perceptual_weight > 0:
            if not perceptual_weights:
                raise ConfigError(
                    f"{self.key('perceptual_weight')} > 0 needs {self.key('perceptual_weights')}: a local VGG19 "
                    "state-dict file or a torchvision weights id such as VGG19_Weights.IMAGENET1K_V1"
                )
            self.perceptual = PerceptualLoss(perceptual_weights, perceptual_layers)
        self.grad_checkpointing = grad_checkpointing
        for head in (self.camera, self.reconstructor, self.renderer):
            if head is not None:
                head.transformer.grad_checkpointing = grad_checkpointing
        self.render_context_tokens = render_context_tokens
        self.ray_positions = ray_positions
        self.dim = dim

    # ------------------------------------------------------------------ set-up checks
    def needs_cameras(self) -> str | None:
        if self.cameras_from != "data":
            return None
        return f"{self.key('cameras')}=data renders with them; {self.key('cameras')}=predicted learns its own"

    def check_data(self, spec: DataSpec) -> None:
        """The resolution must be whole in patches and both view sets non-empty."""
        h, w = spec.image_hw
        if h % self.patch_size or w % self.patch_size:
            shown = h if h == w else [h, w]
            raise ConfigError(
                f"{spec.key('image_size')}={shown} is not divisible by the encoder's patch size "
                f"{self.encoder_key('patch_size')}={self.patch_size}: pick sizes so that the patch grid is whole"
            )
        views, context = spec.num_views, spec.num_context_views
        if context is not None and context < 1:
            raise ConfigError(f"{spec.key('num_context_views')}={context}: set A (context views) needs a view")
        if views is not None and context is not None and views - context < 1:
            raise ConfigError(
                f"{spec.key('num_views')}={views} with {spec.key('num_context_views')}={context} leaves set B "
                "(target views) empty: num_views must exceed num_context_views"
            )

    def compile_targets(self) -> list[nn.Module]:
        heads = [h for h in (self.camera, self.reconstructor, self.renderer) if h is not None]
        return [block for head in heads for block in head.transformer.blocks]

    # ------------------------------------------------------------------ model
    def forward(
        self,
        images: Tensor,
        num_context: int,
        encoder: Encoder | None = None,
        true_cameras: tuple[Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Predict cameras for all views and render set B from set A.

        Args:
            images: ``[B, V, 3, H, W]`` in ``[0, 1]``.
            num_context: the first ``num_context`` views are set A (context), the rest set B (targets).
            encoder: the shared encoder (default: this objective's own, when it is fitted alone).

        Returns:
            ``render [B, Vb, 3, H, W]``, ``c2w [B, V, 4, 4]`` (relative to view 0, the model's own scale),
            ``K [B, V, 3, 3]`` (pixels), ``focal [B]`` (focal length over image width) and ``camera_tokens
            [B, V, dim]`` (what the pose heads read; RayZer's pose probe reads them too).
        """
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be [B, V, 3, H, W], got {tuple(images.shape)}")
        b, v, _, h, w = images.shape
        if not 1 <= num_context < v:
            raise ValueError(f"num_context={num_context} must leave both sets non-empty with {v} views")
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        enc = (encoder if encoder is not None else self.encoder)(images.flatten(0, 1))
        feats = enc.patches.unflatten(0, (b, v))  # [B, V, N, De]
        # the oracle (LVSM) renders with the data's cameras: its (frozen) camera estimator is not run, unless the
        # reprojection loss's depth head reads its patch tokens
        cameras = None
        if true_cameras is None or self.depth is not None:
            cameras = self.camera.predict(feats, enc.grid, (h, w))
        if true_cameras is not None:
            K, c2w = true_cameras
            focal = K[:, 0, 0, 0] / w
        else:
            assert cameras is not None
            K, c2w, focal = cameras.K, cameras.c2w, cameras.focal
            if self.training and self.global_step < self.focal_freeze_steps:  # E-RayZer: the focal held at first
                K, focal = K.detach(), focal.detach()
        rendered = self.render_from(images, feats, K, c2w, num_context)
        out = {"c2w": c2w, "K": K, "focal": focal, "features": feats, **rendered}
        if cameras is not None:
            out["camera_tokens"] = cameras.tokens
        if self.depth is not None:
            assert cameras is not None
            out["reprojection_depth"] = self.depth(cameras.patches, h, w)
        return out

    def render_from(self, images: Tensor, feats: Tensor, K: Tensor, c2w: Tensor, num_context: int) -> dict[str, Tensor]:
        """Render set B from set A's views and encoder tokens ``feats [B, V, N, De]`` with the cameras ``K``,
        ``c2w`` (``[B, V, ...]``, the predicted ones in training; others for the camera-dependence check):
        ``render [B, Vb, 3, H, W]``, and for the Gaussian renderer the context views' ``depth [B, Va, 1, H, W]``,
        the targets' ``alpha`` and ``target_depth``, and the Gaussians' ``opacity`` and ``colour`` maps."""
        h, w = images.shape[-2:]
        grid = (h // self.patch_size, w // self.patch_size)
        with torch.autocast(device_type=images.device.type, enabled=False):
            rays = patchify(plucker_map(K, c2w, h, w), self.patch_size)  # [B, V, N, 6 p²]
        pos = sincos_positions(grid, self.dim, images.device, torch.float32) if self.ray_positions else None
        if self.gaussians is not None:
            tokens = self.reconstructor(feats[:, :num_context], rays[:, :num_context], pos, keep_context=True)
            n = grid[0] * grid[1]
            tokens = tokens[:, -num_context * n :].unflatten(1, (num_context, n))
            g = self.gaussians(tokens, images[:, :num_context], K[:, :num_context], c2w[:, :num_context])
            with torch.autocast(device_type=images.device.type, enabled=False):
                out = render_gaussians(g, K[:, num_context:], c2w[:, num_context:], h, w, eps2d=self.gaussian_eps2d)
            return {
                "render": out["image"], "alpha": out["alpha"], "target_depth": out["depth"], "depth": g.depth,
                **g.maps(num_context, h, w),
            }  # fmt: skip
        scene = self.reconstructor(feats[:, :num_context], rays[:, :num_context], pos, self.render_context_tokens)
        base = None
        if self.blend is not None:
            base = self.blend(images[:, :num_context], c2w[:, :num_context], c2w[:, num_context:])
        return {"render": self.renderer(rays[:, num_context:], scene, h, w, pos, base)}

    def data_cameras(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """The batch's cameras as the model sees its own: relative to view 0 and scaled so that the farthest camera
        centre is at distance 1 (the supervised LVSM oracle, ``cameras: data``)."""
        K, c2w = batch.get("K"), batch.get("c2w")
        if K is None or c2w is None:
            raise ConfigError(f"{self.key('cameras')}=data needs cameras in the data (K and c2w); this batch has none")
        return K.float(), relative_to_first(c2w.float())[0]

    def photometric_loss(self, render: Tensor, target: Tensor) -> dict[str, Tensor]:
        """MSE (plus the weighted perceptual term when on) between renders and targets ``[B, Vb, 3, H, W]``."""
        mse = F.mse_loss(render.float(), target.float())
        out = {"mse": mse, "loss": mse}
        if self.photometric_scales > 1:  # the same MSE on 2x, 4x, ... average-pooled images: wider basins
            r, t = render.float().flatten(0, 1), target.float().flatten(0, 1)
            for _ in range(self.photometric_scales - 1):
                if min(r.shape[-2:]) < 2:
                    break
                r, t = F.avg_pool2d(r, 2), F.avg_pool2d(t, 2)
                out["loss"] = out["loss"] + F.mse_loss(r, t)
        if self.perceptual is not None:
            perc = self.perceptual(render.flatten(0, 1), target.flatten(0, 1))
            out["perceptual"] = perc
            out["loss"] = out["loss"] + self.perceptual_weight * perc
        return out

    def step(self, batch: dict[str, Any], stage: str, encoder: Encoder) -> dict[str, Any]:
        images = batch["images"]
        num_context = int(batch["num_context"])
        pred = self(images, num_context, encoder, self.data_cameras(batch) if self.cameras_from == "data" else None)
        target = images[:, num_context:]
        out: dict[str, Any] = self.photometric_loss(pred["render"], target)
        if self.depth is not None:
            reprojection = min_reprojection_loss(
                images, pred["reprojection_depth"], pred["K"], pred["c2w"], auto_mask=self.reprojection_auto_mask
            )
            out["reprojection"] = reprojection["loss"]
            out["reprojection_used"] = reprojection["used"]
            out["loss"] = out["loss"] + self.reprojection_weight * reprojection["loss"]
        with torch.no_grad():
            out["psnr"] = psnr(pred["render"].detach(), target).mean()
            out["fov_deg"] = torch.rad2deg(fov_from_focal(pred["focal"].detach(), 1.0)).mean()
        if stage != "train":
            out.update(self.evaluate(batch, pred))
        return out

    # ------------------------------------------------------------------ evaluation (reads true cameras)
    @torch.no_grad()
    def evaluate(self, batch: dict[str, Any], pred: dict[str, Tensor]) -> dict[str, Any]:
        """Validation figures: render quality beside the baselines, pose accuracy against the batch's cameras
        (when present), and the pictures' tensors for callbacks. Never part of the loss."""
        images = batch["images"].float()
        num_context = int(batch["num_context"])
        context, target = images[:, :num_context], images[:, num_context:]
        render = pred["render"].float()
        vb = target.shape[1]
        out: dict[str, Any] = {"ssim": ssim(render, target).mean()}
        mean = mean_colour_baseline(context, vb)
        out["psnr_mean_colour"] = psnr(mean, target).mean()
        out["ssim_mean_colour"] = ssim(mean, target).mean()
        context_mean = context_mean_baseline(context, vb)
        out["psnr_context_mean"] = psnr(context_mean, target).mean()
        out["ssim_context_mean"] = ssim(context_mean, target).mean()
        out.update(context=context, target=target, render=render)
        if "camera_tokens" in pred:  # RayZer's pose probe reads them (the oracle has none)
            out["camera_tokens"] = pred["camera_tokens"].detach()
        # does the render depend on the cameras? the same model with every camera at the canonical pose
        still_c2w = torch.eye(4, device=images.device).expand_as(pred["c2w"])
        still = self.render_from(images, pred["features"], pred["K"], still_c2w, num_context)["render"].float()
        out["psnr_still_cameras"] = psnr(still, target).mean()
        gt_c2w = batch.get("c2w")
        if gt_c2w is not None:
            gt_c2w = gt_c2w.float()
            nearest = nearest_view_baseline(context, gt_c2w[:, :num_context], gt_c2w[:, num_context:])
            out["psnr_nearest"] = psnr(nearest, target).mean()
            out["ssim_nearest"] = ssim(nearest, target).mean()
            metrics, aligned = camera_metrics(pred["c2w"], gt_c2w)
            out.update(metrics)
            out.update(relative_pose_accuracy(pred["c2w"], gt_c2w))
            # the rotation error of cameras that never turn (all identity): what rot_err must beat
            still = torch.eye(4, device=gt_c2w.device).expand_as(gt_c2w)
            out["rot_err_identity"] = relative_rotation_error(still, gt_c2w).mean()
            out.update(pred_c2w=aligned, gt_c2w=gt_c2w)
        if "depth" in pred:  # the explicit renderer's Gaussians (pictures), and their depth against the data's
            out.update(context_depth=pred["depth"].detach(), opacity=pred["opacity"].detach())
            out.update(colour=pred["colour"].detach())
            gt_depth = batch.get("depth")
            if gt_depth is not None:
                errors = scaled_depth_errors(pred["depth"], gt_depth[:, :num_context].float())
                constant = scaled_depth_errors(torch.ones_like(pred["depth"]), gt_depth[:, :num_context].float())
                out.update({f"depth_{k}": v for k, v in errors.items()})
                out.update({f"depth_{k}_constant": v for k, v in constant.items()})
        gt_K = batch.get("K")
        if gt_K is not None:
            true_focal = gt_K[..., 0, 0].float().mean(-1)  # [B], pixels
            out["focal_err"] = ((pred["K"][:, 0, 0, 0] - true_focal).abs() / true_focal).mean()
        return out
