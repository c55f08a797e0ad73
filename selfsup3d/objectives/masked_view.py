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
distance, :class:`ContextBlend`), ``render_context_tokens`` (the renderer also attends to set A's tokens, as
LVSM's decoder-only model does) and ``ray_positions`` (2D patch positions on the ray tokens).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from timm.layers import Mlp, build_sincos2d_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from selfsup3d.errors import ConfigError
from selfsup3d.eval.nvs import context_mean_baseline, mean_colour_baseline, nearest_view_baseline, psnr, ssim
from selfsup3d.eval.pose import camera_metrics
from selfsup3d.geometry.cameras import fov_from_focal, intrinsics_from_focal, make_se3, rotation_6d_to_matrix
from selfsup3d.geometry.rays import patchify, plucker_map, unpatchify
from selfsup3d.objectives.base import PretrainObjective
from selfsup3d.objectives.perceptual import PerceptualLoss

IDENTITY_6D = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


# ---------------------------------------------------------------------------- building blocks
class Transformer(nn.Module):
    """Pre-LN timm :class:`~timm.models.vision_transformer.Block` s with QK normalisation (attention through
    ``F.scaled_dot_product_attention``), a final LayerNorm and optional gradient checkpointing.

    With ``frames``, the sequence is that many equal-length frames (views) and attention alternates, as in
    VGGT: even blocks attend within each frame, odd blocks across all frames. That tells a view's tokens
    apart from the other views' without any view-index embedding, so any number of views works.

    Args:
        dim: token width.
        depth: number of blocks (at least 1).
        num_heads: attention heads (``dim`` must be divisible by it).
        mlp_ratio: MLP hidden width over ``dim``.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=False, qk_norm=True) for _ in range(depth)
        )
        for block in self.blocks:
            block.attn.fused_attn = True
        self.norm = nn.LayerNorm(dim)
        self.grad_checkpointing = False
        self.apply(_init_linear)
        # depth-scaled init of the residual projections (GPT-2 / RayZer)
        for i, block in enumerate(self.blocks):
            for proj in (block.attn.proj, block.mlp.fc2):
                proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))

    def forward(self, x: Tensor, frames: int | None = None) -> Tensor:
        """``[B, L, D] -> [B, L, D]``; ``frames`` splits ``L`` into that many frames (alternating attention)."""
        b, length, d = x.shape
        for i, block in enumerate(self.blocks):
            within = frames is not None and i % 2 == 0
            if within:
                x = x.reshape(b * frames, length // frames, d)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if within:
                x = x.reshape(b, length, d)
        return self.norm(x)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def sincos_positions(grid: tuple[int, int], dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[h * w, dim]`` 2D sin-cos positions of a patch grid, row-major (as the encoder's tokens)."""
    return build_sincos2d_pos_embed(list(grid), dim, device=device, dtype=torch.float32).to(dtype)


# ---------------------------------------------------------------------------- heads
class CameraEstimator(nn.Module):
    """Poses relative to view 0 and one shared focal length, from all views' tokens.

    Each view's patch tokens (projected to ``dim``) get 2D sin-cos positions and a role embedding (canonical
    view or other); one camera token per view is prepended; a transformer alternates attention within each
    view (so a camera token gathers its own view) and across all views (so it relates views to each other).
    The pose of view ``v`` comes from an MLP on ``[camera token of view 0 ‖ camera token of v]`` as a 6D
    rotation and a translation added to the identity; the focal length from the canonical camera token as
    ``f0 · r^tanh(x)`` with ``f0`` the focal of ``init_fov_deg`` and ``r`` = ``focal_range``. Both output
    layers start near zero.

    Args:
        in_dim: encoder width.
        dim: transformer width.
        depth: transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width ratio.
        init_fov_deg: horizontal field of view the focal head starts at.
        focal_range: the focal length stays within this factor of the initial one.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        init_fov_deg: float,
        focal_range: float = 2.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(in_dim, dim)
        self.camera_token = nn.Parameter(torch.zeros(1, dim))
        self.role_embed = nn.Parameter(torch.zeros(2, dim))  # 0: canonical view, 1: any other view
        self.transformer = Transformer(dim, depth, num_heads, mlp_ratio)
        self.pose_head = Mlp(2 * dim, dim, 9)
        self.focal_head = nn.Linear(dim, 1)
        # normalised focal (focal in pixels over the image width) of the initial field of view
        self.log_focal0 = math.log(0.5 / math.tan(math.radians(init_fov_deg) / 2.0))
        self.log_focal_range = math.log(focal_range)
        trunc_normal_(self.camera_token, std=0.02)
        trunc_normal_(self.role_embed, std=0.02)
        _init_linear(self.proj)
        self.pose_head.apply(_init_linear)
        for out_layer in (self.pose_head.fc2, self.focal_head):
            nn.init.normal_(out_layer.weight, std=1e-3)
            nn.init.zeros_(out_layer.bias)
        self.register_buffer("identity_6d", torch.tensor(IDENTITY_6D), persistent=False)

    def no_weight_decay(self) -> set[str]:
        return {"camera_token", "role_embed"}

    def forward(self, feats: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Cameras of ``[B, V, N, in_dim]`` encoder tokens on a ``grid`` patch grid.

        Returns:
            ``c2w [B, V, 4, 4]`` (float32; view 0 is the identity) and the normalised focal ``[B]``
            (focal in pixels divided by the image width).
        """
        b, v, n, _ = feats.shape
        x = self.proj(feats) + sincos_positions(grid, self.dim, feats.device, feats.dtype)
        roles = torch.ones(v, dtype=torch.long, device=feats.device)
        roles[0] = 0
        role = self.role_embed[roles]  # [V, D]
        cam = (self.camera_token + role)[None, :, None, :].expand(b, -1, -1, -1)  # [B, V, 1, D]
        x = torch.cat([cam, x + role[None, :, None, :]], dim=2).reshape(b, v * (n + 1), self.dim)
        x = self.transformer(x, frames=v).reshape(b, v, n + 1, self.dim)
        tokens = x[:, :, 0]  # [B, V, D]
        canonical = tokens[:, :1].expand(-1, v, -1)
        raw = self.pose_head(torch.cat([canonical, tokens], dim=-1)).float()  # [B, V, 9]
        # bounded: a collapsing or exploding field of view is a free latent the renderer exploits early on
        log_focal = self.log_focal_range * torch.tanh(self.focal_head(tokens[:, 0]).float().squeeze(-1))  # [B]
        rot = rotation_6d_to_matrix(self.identity_6d + raw[..., :6])
        c2w = make_se3(rot, raw[..., 6:])
        eye = torch.eye(4, dtype=c2w.dtype, device=c2w.device)
        c2w = torch.cat([eye.expand(b, 1, 4, 4), c2w[:, 1:]], dim=1)  # the canonical view is the reference
        return c2w, torch.exp(self.log_focal0 + log_focal)


class SceneReconstructor(nn.Module):
    """Scene tokens from set A: encoder tokens fused with Plücker ray tokens (an MLP on their concatenation),
    run through a transformer together with learnable scene tokens.

    Args:
        in_dim: encoder width.
        ray_dim: Plücker features per patch (``6 p²``).
        dim: transformer width.
        depth: transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width ratio.
        num_scene_tokens: learnable scene tokens (the scene representation).
    """

    def __init__(
        self, in_dim: int, ray_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, num_scene_tokens: int
    ) -> None:
        super().__init__()
        self.image_proj = nn.Linear(in_dim, dim)
        self.ray_embed = nn.Linear(ray_dim, dim)
        self.fuse = Mlp(2 * dim, dim, dim)
        self.scene_tokens = nn.Parameter(torch.zeros(num_scene_tokens, dim))
        self.transformer = Transformer(dim, depth, num_heads, mlp_ratio)
        trunc_normal_(self.scene_tokens, std=0.02)
        for m in (self.image_proj, self.ray_embed, self.fuse):
            m.apply(_init_linear)

    def no_weight_decay(self) -> set[str]:
        return {"scene_tokens"}

    def forward(
        self, feats: Tensor, rays: Tensor, positions: Tensor | None = None, keep_context: bool = False
    ) -> Tensor:
        """``[B, Va, N, in_dim]`` tokens and ``[B, Va, N, ray_dim]`` ray patches -> ``[B, S, dim]`` scene tokens
        (``[B, S + Va N, dim]`` with the context tokens' outputs after them when ``keep_context``);
        ``positions`` (``[N, dim]``) are added to the fused tokens."""
        b = feats.shape[0]
        x = self.fuse(torch.cat([self.image_proj(feats), self.ray_embed(rays.to(feats.dtype))], dim=-1))
        if positions is not None:
            x = x + positions.to(x.dtype)
        x = torch.cat([self.scene_tokens.expand(b, -1, -1).to(x.dtype), x.flatten(1, 2)], dim=1)
        x = self.transformer(x)
        return x if keep_context else x[:, : self.scene_tokens.shape[0]]


class Renderer(nn.Module):
    """LVSM-style decoder: each target's Plücker ray tokens attend jointly with the scene tokens; the target
    tokens become ``p² · 3`` pixel values through a linear layer and a sigmoid.

    With ``refine_base`` the renderer refines a base image per target (see :class:`ContextBlend`): the base's
    patches are embedded into the target tokens, and the pixel layer predicts a correction of the base's
    logits instead of the pixels outright.

    Args:
        ray_dim: Plücker features per patch (``6 p²``).
        dim: transformer width.
        depth: transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width ratio.
        patch_size: pixels per patch side.
        refine_base: take a base image per target (``base`` in :meth:`forward`).
    """

    def __init__(
        self,
        ray_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        patch_size: int,
        refine_base: bool = False,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.ray_embed = nn.Linear(ray_dim, dim)
        self.base_embed = nn.Linear(3 * patch_size * patch_size, dim) if refine_base else None
        self.input_norm = nn.LayerNorm(dim)
        self.transformer = Transformer(dim, depth, num_heads, mlp_ratio)
        self.to_pixels = nn.Linear(dim, 3 * patch_size * patch_size)
        for m in (self.ray_embed, self.base_embed, self.to_pixels):
            if m is not None:
                _init_linear(m)

    def forward(
        self,
        rays: Tensor,
        scene: Tensor,
        height: int,
        width: int,
        positions: Tensor | None = None,
        base: Tensor | None = None,
    ) -> Tensor:
        """Render the targets.

        Args:
            rays: ``[B, Vb, N, ray_dim]`` target ray patches.
            scene: ``[B, S, dim]`` scene tokens.
            height: image height.
            width: image width.
            positions: ``[N, dim]`` added to the ray tokens.
            base: ``[B, Vb, 3, H, W]`` base images in ``[0, 1]`` (needs ``refine_base``).

        Returns:
            ``[B, Vb, 3, H, W]`` in ``[0, 1]``.
        """
        if (base is None) != (self.base_embed is None):
            raise ValueError("a base image goes with refine_base=True, and only then")
        b, vb, n, _ = rays.shape
        x = self.ray_embed(rays.to(scene.dtype))
        if positions is not None:
            x = x + positions.to(x.dtype)
        base_patches = None
        if base is not None and self.base_embed is not None:
            base_patches = patchify(base, self.patch_size)  # [B, Vb, N, 3 p²]
            x = x + self.base_embed(base_patches.to(x.dtype))
        x = x.flatten(0, 1)  # [B * Vb, N, D]
        s = scene.repeat_interleave(vb, dim=0)  # [B * Vb, S, D]
        x = self.transformer(self.input_norm(torch.cat([x, s], dim=1)))[:, :n]
        logits = self.to_pixels(x).float()  # [B * Vb, N, 3 p²]
        if base_patches is not None:
            logits = logits + torch.logit(base_patches.flatten(0, 1).float().clamp(1e-3, 1 - 1e-3))
        return unpatchify(torch.sigmoid(logits), self.patch_size, height, width).unflatten(0, (b, vb))


def camera_proximity(c2w_a: Tensor, c2w_b: Tensor, eps: float = 1e-4) -> Tensor:
    """A smooth distance between every camera of ``c2w_a [B, Na, 4, 4]`` and every one of ``c2w_b [B, Nb, 4, 4]``:
    ``sqrt(1 - cos θ + ‖c_a - c_b‖² + ε²)`` with ``θ`` the angle of the relative rotation and ``c`` the
    centres; ``[B, Na, Nb]``. Unlike a squared distance its gradient does not vanish where cameras coincide
    (as all do at the start of training), so it can pull cameras apart or together from the first step."""
    rot_a, rot_b = c2w_a[..., :3, :3], c2w_b[..., :3, :3]
    trace = (rot_a[:, :, None] * rot_b[:, None]).sum((-1, -2))  # tr(Ra^T Rb) = 1 + 2 cos θ
    sq = (3.0 - trace) / 2.0 + (c2w_a[:, :, None, :3, 3] - c2w_b[:, None, :, :3, 3]).square().sum(-1)
    return (sq.clamp(min=0.0) + eps * eps).sqrt()


class ContextBlend(nn.Module):
    """A base image for each target: the context views averaged with weights ``softmax(-s · d)`` over the
    distance ``d`` (:func:`camera_proximity`) between the target's and each context view's *predicted*
    cameras, ``s`` learnable. While the predicted cameras still coincide this is the per-pixel mean of the
    context views; as they spread, nearby context views weigh more (image-based rendering).

    Args:
        init_sharpness: initial ``s``.
    """

    def __init__(self, init_sharpness: float = 4.0) -> None:
        super().__init__()
        self.log_sharpness = nn.Parameter(torch.tensor(math.log(init_sharpness)))

    def no_weight_decay(self) -> set[str]:
        return {"log_sharpness"}

    def forward(self, context: Tensor, context_c2w: Tensor, target_c2w: Tensor) -> Tensor:
        """``[B, Va, 3, H, W]`` context views, ``[B, Va, 4, 4]`` and ``[B, Vb, 4, 4]`` predicted cameras ->
        ``[B, Vb, 3, H, W]`` base images."""
        with torch.autocast(device_type=context.device.type, enabled=False):  # pixels stay float32
            dist = camera_proximity(target_c2w.float(), context_c2w.float())  # [B, Vb, Va]
            weights = torch.softmax(-self.log_sharpness.exp() * dist, dim=-1)
            return torch.einsum("btc,bcxyz->btxyz", weights, context.float())


# ---------------------------------------------------------------------------- objective
class MaskedViewPrediction(PretrainObjective):
    """RayZer-style self-supervised masked-view prediction on the shared encoder.

    The batch is a multi-view batch (``images [B, V, 3, H, W]`` in ``[0, 1]``, ``num_context``: views
    ``[:num_context]`` are set A, the rest set B; ``K``/``c2w`` optional, read only for evaluation). The patch
    size of the rays and of the rendered patches is the encoder's; any ``V``, A/B split and resolution that
    the patch divides work, at training and at inference.

    Validation logs PSNR/SSIM of the renders beside the mean-colour, context-mean and nearest-view baselines
    (:mod:`selfsup3d.eval.nvs`), and, when the batch has true cameras, pose errors after similarity alignment
    (``rot_err``, ``trans_err`` in degrees, ``auc5/15/30``, ``centre_err``; :mod:`selfsup3d.eval.pose`) and the
    focal-length error.

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
        grad_checkpointing: recompute the activations of every head block (and the encoder's) in backward.
        compile: ``torch.compile`` the encoder and every head block in place at ``configure_model``.
        lr: peak learning rate (RayZer: 4e-4).
        warmup_steps: linear warm-up steps (RayZer: 3000).
        grad_spike_factor: skip a step whose gradient norm exceeds this many times its running mean.
        **kwargs: the remaining :class:`~selfsup3d.objectives.base.PretrainObjective` arguments.
    """

    def __init__(
        self,
        encoder: nn.Module,
        dim: int = 768,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        camera_layers: int = 8,
        scene_layers: int = 12,
        render_layers: int = 12,
        num_scene_tokens: int = 3072,
        init_fov_deg: float = 50.0,
        focal_range: float = 2.0,
        perceptual_weight: float = 0.0,
        perceptual_weights: str | None = None,
        perceptual_layers: int = 5,
        render_context_tokens: bool = False,
        ray_positions: bool = False,
        blend_context: bool = False,
        blend_sharpness: float = 4.0,
        grad_checkpointing: bool = False,
        compile: bool = False,
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
            if value < 1:
                raise ConfigError(f"model.init_args.{key} must be >= 1, got {value}")
        if dim % num_heads:
            raise ConfigError(f"model.init_args.dim={dim} is not divisible by model.init_args.num_heads={num_heads}")
        if not 1.0 < init_fov_deg < 179.0:
            raise ConfigError(f"model.init_args.init_fov_deg must be in (1, 179), got {init_fov_deg}")
        if blend_sharpness <= 0:
            raise ConfigError(f"model.init_args.blend_sharpness must be > 0, got {blend_sharpness}")
        if focal_range <= 1:
            raise ConfigError(f"model.init_args.focal_range must be > 1, got {focal_range}")
        if perceptual_weight < 0:
            raise ConfigError(f"model.init_args.perceptual_weight must be >= 0, got {perceptual_weight}")
        patch = getattr(encoder, "patch_size", None)
        in_dim = getattr(encoder, "embed_dim", None)
        if not isinstance(patch, int) or not isinstance(in_dim, int):
            raise ConfigError("model.init_args.encoder must expose integer patch_size and embed_dim (use ViTEncoder)")
        self.patch_size = patch
        ray_dim = 6 * patch * patch
        self.camera = CameraEstimator(in_dim, dim, camera_layers, num_heads, mlp_ratio, init_fov_deg, focal_range)
        self.reconstructor = SceneReconstructor(
            in_dim, ray_dim, dim, scene_layers, num_heads, mlp_ratio, num_scene_tokens
        )
        self.renderer = Renderer(ray_dim, dim, render_layers, num_heads, mlp_ratio, patch, refine_base=blend_context)
        self.blend = ContextBlend(blend_sharpness) if blend_context else None
        self.perceptual_weight = perceptual_weight
        self.perceptual: PerceptualLoss | None = None
        if perceptual_weight > 0:
            if not perceptual_weights:
                raise ConfigError(
                    "model.init_args.perceptual_weight > 0 needs model.init_args.perceptual_weights: a local VGG19 "
                    "state-dict file or a torchvision weights id such as VGG19_Weights.IMAGENET1K_V1"
                )
            self.perceptual = PerceptualLoss(perceptual_weights, perceptual_layers)
        self.grad_checkpointing = grad_checkpointing
        for head in (self.camera, self.reconstructor, self.renderer):
            head.transformer.grad_checkpointing = grad_checkpointing
        if grad_checkpointing and hasattr(encoder, "set_grad_checkpointing"):
            encoder.set_grad_checkpointing(True)
        self.render_context_tokens = render_context_tokens
        self.ray_positions = ray_positions
        self.dim = dim
        self.compile_modules = compile
        self._compiled = False

    # ------------------------------------------------------------------ set-up checks
    def setup(self, stage: str) -> None:
        """Check at start-up that the data fits the model: the resolution is whole in patches and both sets
        are non-empty. Reads the datamodule's ``image_hw`` (or ``image_size``), ``num_views`` and
        ``num_context_views``."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        size = getattr(dm, "image_hw", None) or getattr(dm, "image_size", None)
        if size is not None:
            h, w = (size, size) if isinstance(size, int) else tuple(size)
            if h % self.patch_size or w % self.patch_size:
                shown = h if h == w else [h, w]
                raise ConfigError(
                    f"data.init_args.image_size={shown} is not divisible by "
                    f"model.init_args.encoder.init_args.patch_size={self.patch_size}: pick sizes so that the "
                    "patch grid is whole"
                )
        views, context = getattr(dm, "num_views", None), getattr(dm, "num_context_views", None)
        if context is not None and context < 1:
            raise ConfigError(
                f"data.init_args.num_context_views={context}: set A (context views) must have at least one view"
            )
        if views is not None and context is not None and views - context < 1:
            raise ConfigError(
                f"data.init_args.num_views={views} with data.init_args.num_context_views={context} leaves set B "
                "(target views) empty: num_views must exceed num_context_views"
            )

    def configure_model(self) -> None:
        """``compile=true``: compile the encoder and each head block in place (state-dict keys unchanged)."""
        if not self.compile_modules or self._compiled:
            return
        self.encoder.compile()
        for head in (self.camera, self.reconstructor, self.renderer):
            for block in head.transformer.blocks:
                block.compile()
        self._compiled = True

    # ------------------------------------------------------------------ model
    def forward(self, images: Tensor, num_context: int) -> dict[str, Tensor]:
        """Predict cameras for all views and render set B from set A.

        Args:
            images: ``[B, V, 3, H, W]`` in ``[0, 1]``.
            num_context: the first ``num_context`` views are set A (context), the rest set B (targets).

        Returns:
            ``render [B, Vb, 3, H, W]``, ``c2w [B, V, 4, 4]`` (relative to view 0, the model's own scale),
            ``K [B, V, 3, 3]`` (pixels) and ``focal [B]`` (focal length over image width).
        """
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be [B, V, 3, H, W], got {tuple(images.shape)}")
        b, v, _, h, w = images.shape
        if not 1 <= num_context < v:
            raise ValueError(f"num_context={num_context} must leave both sets non-empty with {v} views")
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        enc = self.encoder(images.flatten(0, 1))
        feats = enc.patches.unflatten(0, (b, v))  # [B, V, N, De]
        c2w, focal = self.camera(feats, enc.grid)
        with torch.autocast(device_type=images.device.type, enabled=False):
            f = focal * w
            K = intrinsics_from_focal(f, f, h, w)[:, None].expand(b, v, 3, 3)
            rays = patchify(plucker_map(K, c2w, h, w), self.patch_size)  # [B, V, N, 6 p²]
        pos = sincos_positions(enc.grid, self.dim, images.device, torch.float32) if self.ray_positions else None
        scene = self.reconstructor(feats[:, :num_context], rays[:, :num_context], pos, self.render_context_tokens)
        base = None
        if self.blend is not None:
            base = self.blend(images[:, :num_context], c2w[:, :num_context], c2w[:, num_context:])
        render = self.renderer(rays[:, num_context:], scene, h, w, pos, base)
        return {"render": render, "c2w": c2w, "K": K, "focal": focal}

    def photometric_loss(self, render: Tensor, target: Tensor) -> dict[str, Tensor]:
        """MSE (plus the weighted perceptual term when on) between renders and targets ``[B, Vb, 3, H, W]``."""
        mse = F.mse_loss(render.float(), target.float())
        out = {"mse": mse, "loss": mse}
        if self.perceptual is not None:
            perc = self.perceptual(render.flatten(0, 1), target.flatten(0, 1))
            out["perceptual"] = perc
            out["loss"] = mse + self.perceptual_weight * perc
        return out

    def step(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        images = batch["images"]
        num_context = int(batch["num_context"])
        pred = self(images, num_context)
        target = images[:, num_context:]
        out: dict[str, Any] = self.photometric_loss(pred["render"], target)
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
        gt_c2w = batch.get("c2w")
        if gt_c2w is not None:
            gt_c2w = gt_c2w.float()
            nearest = nearest_view_baseline(context, gt_c2w[:, :num_context], gt_c2w[:, num_context:])
            out["psnr_nearest"] = psnr(nearest, target).mean()
            out["ssim_nearest"] = ssim(nearest, target).mean()
            metrics, aligned = camera_metrics(pred["c2w"], gt_c2w)
            out.update(metrics)
            out.update(pred_c2w=aligned, gt_c2w=gt_c2w)
        gt_K = batch.get("K")
        if gt_K is not None:
            true_focal = gt_K[..., 0, 0].float().mean(-1)  # [B], pixels
            out["focal_err"] = ((pred["K"][:, 0, 0, 0] - true_focal).abs() / true_focal).mean()
        return out

    def on_fit_start(self) -> None:
        if self.grad_spike_factor is None:
            rank_zero_warn("MaskedViewPrediction without grad_spike_factor: gradient spikes are not skipped")
