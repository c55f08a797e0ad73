"""Single-view triplane reconstruction with distillation: the 3D-Prior objective.

Follows "Enhancing 2D Representation Learning with a 3D Prior" (Aygün et al. 2024, section 3). Each image
is encoded; the class and patch tokens of the encoder's last four layers, concatenated, are the
representation. Learnable ``3 × 16 × 16`` triplane queries cross-attend to it and are upsampled to
``128 × 128`` planes; a 2-layer MLP on the summed plane features gives density and colour; volume rendering
from one fixed, viewer-centred camera (16 stratified + 16 importance samples a ray) reproduces the image and
its (pseudo) depth. A frozen teacher keeps the representation close to where it started::

    loss = λrgb·MSE(colour) + λdepth·MSE(depth) + λdist·MSE(student repr., teacher repr.) + λnorm·mean(density)

with defaults 0.1 / 1 / 1 / 1e-3. Depth targets of unknown scale (pseudo depth, or metric depth seen by
cameras at unknown distances) are mapped into the renderer's ``[near, far]`` per image, see
:func:`~selfsup3d.geometry.volume.normalize_depth`.

Ablations (the paper's Table 4): ``decoder: conv`` (no triplane: colour and depth straight from the patch
tokens), ``lambda_dist: 0`` (no distillation; no teacher is built), ``random_init: true`` (the student starts
from random weights; the default teacher is the encoder as loaded, before re-initialisation).

The teacher (``teacher``, :func:`~selfsup3d.encoders.teacher.build_teacher`): by default a frozen copy of the
encoder as built (with its ``pretrained`` or ``checkpoint_path`` weights, after ``init_encoder_from``); or a
file (exported encoder, timm state dict, selfsup3d checkpoint) or a timm model id
(``vit_large_patch14_dinov2.lvd142m``). A teacher that can be rebuilt from its source is not written into
checkpoints; one that cannot (the copy of a randomly initialised encoder) is written once, under ``teacher.``
(the base class's rule for every frozen teacher). The heads are in :mod:`selfsup3d.heads.triplane`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from selfsup3d.datamodules.spec import DataSpec
from selfsup3d.encoders.base import Encoder, EncoderOutput
from selfsup3d.encoders.teacher import FrozenTeacher, build_teacher, distillation_loss, teacher_width
from selfsup3d.errors import ConfigError, require
from selfsup3d.geometry.triplane import Aggregate
from selfsup3d.geometry.volume import DepthNormalization, normalize_depth
from selfsup3d.heads.triplane import ConvDecoder, FixedCameraRenderer, Sampler, TriplaneDecoder, TriplaneField
from selfsup3d.objectives.base import PretrainObjective


def _masked_mse(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    valid = valid.to(pred.dtype)
    return ((pred - target) ** 2 * valid).sum() / valid.sum().clamp(min=1.0)


def _flat_pixels(x: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, H·W, C]``."""
    return x.flatten(2).transpose(1, 2)


class TriplaneReconstruction(PretrainObjective):
    """The 3D-Prior objective: single-view triplane reconstruction of colour and depth with distillation.

    Args:
        encoder: the encoder (``selfsup3d.encoders.ViTEncoder``; ``num_out_layers: 4`` as in the paper).
        decoder: ``triplane`` (the method) or ``conv`` (ablation: colour and depth predicted directly).
        decoder_dim: width of the triplane queries (of the convolutional decoder's input for ``conv``).
        decoder_depth: query blocks (cross-attention, self-attention, MLP).
        decoder_heads: attention heads of the query blocks.
        decoder_self_attention: self-attention among the triplane queries in each block.
        triplane_grid: the learnable queries form ``3 × grid × grid`` tokens.
        triplane_size: resolution of each plane (``triplane_grid`` times a power of two).
        triplane_channels: channels of each plane.
        field_hidden: hidden width of the 2-layer radiance MLP.
        plane_aggregate: how the three planes' features combine: ``sum``, ``mean`` or ``concat``.
        sampler: triplane sampling: ``auto`` (sparse on the CPU, grid_sample on GPUs), ``grid_sample`` or
            ``sparse``.
        input_size: images are resized to this size for the encoder; ``null`` keeps the batch's size.
        render_size: size of the rendered (and target) images.
        rays_per_image: random pixels rendered per image in training (``null``: all); validation renders
            every pixel.
        num_coarse: stratified samples per ray.
        num_fine: importance samples per ray, drawn from the coarse weights.
        fov_deg: horizontal field of view of the fixed camera, degrees.
        near: near plane of the fixed camera (z-depth).
        far: far plane of the fixed camera (z-depth).
        box_size: edge of the triplane box (centred at depth ``(near + far) / 2``); ``null`` is ``far - near``.
        background: colour behind the far plane; ``null`` adds none (black).
        ray_chunk: rays per image rendered at a time (``null``: all at once).
        recompute_chunks: recompute each chunk's activations in the backward pass (memory independent of the
            number of rays, one more forward pass of the renderer).
        recompute_mlp: keep only the sampled plane features for the backward pass and recompute the radiance
            MLP there (most of the renderer's memory for a small cost).
        density_shift: added to the raw density before the softplus (negative: the field starts empty).
        depth_normalization: how depth targets map into ``[near, far]`` per image: ``percentile`` (robust
            affine map for relative pseudo depth), ``median`` (scale only) or ``none`` (metric, as is).
        depth_quantiles: low/high quantiles of ``percentile``.
        depth_margin: share of ``[near, far]`` left free at each end by ``percentile``.
        empty_background: when the batch has a foreground ``mask``, pixels outside it whose depth is unknown
            are empty space: their target depth is ``far`` (what a ray that hits nothing renders). For
            renders with masks (the embedded data); pseudo depth has no unknown pixels.
        lambda_rgb: weight of the colour MSE.
        lambda_depth: weight of the depth MSE (over pixels with known depth).
        lambda_dist: weight of the distillation MSE; 0 disables distillation and builds no teacher.
        lambda_norm: weight of the L1 norm of the densities.
        teacher: ``null`` (a frozen copy of the encoder as built), ``ema``/``ema:DECAY`` (a moving average of
            the encoder), a weights file, or a timm model id.
        random_init: re-initialise the student encoder's weights after the teacher is taken (ablation).
        **kwargs: optimisation and fine-tuning arguments of :class:`~selfsup3d.objectives.base.PretrainObjective`.
    """

    input_kind = "single_view"

    def __init__(
        self,
        encoder: Encoder,
        # the decoder: representation tokens -> triplanes
        decoder: Literal["triplane", "conv"] = "triplane",
        decoder_dim: int = 512,
        decoder_depth: int = 2,
        decoder_heads: int = 8,
        decoder_self_attention: bool = True,
        # the triplanes and their radiance field
        triplane_grid: int = 16,
        triplane_size: int = 128,
        triplane_channels: int = 32,
        field_hidden: int = 64,
        plane_aggregate: Aggregate = "sum",
        sampler: Sampler = "auto",
        # what is encoded and rendered
        input_size: int | None = None,
        render_size: int = 256,
        rays_per_image: int | None = 4096,
        # samples along each ray
        num_coarse: int = 16,
        num_fine: int = 16,
        # the fixed camera and the box it looks at
        fov_deg: float = 30.0,
        near: float = 1.5,
        far: float = 3.5,
        box_size: float | None = None,
        background: float | None = None,
        # memory, and the field's start
        ray_chunk: int | None = 8192,
        recompute_chunks: bool = False,
        recompute_mlp: bool = True,
        density_shift: float = -1.0,
        # depth targets
        depth_normalization: DepthNormalization = "percentile",
        depth_quantiles: tuple[float, float] = (0.02, 0.98),
        depth_margin: float = 0.1,
        empty_background: bool = False,
        # the loss and the teacher
        lambda_rgb: float = 0.1,
        lambda_depth: float = 1.0,
        lambda_dist: float = 1.0,
        lambda_norm: float = 1e-3,
        teacher: str | None = None,
        random_init: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(encoder, **kwargs)
        for name, value in {
            "lambda_rgb": lambda_rgb,
            "lambda_depth": lambda_depth,
            "lambda_dist": lambda_dist,
            "lambda_norm": lambda_norm,
        }.items():
            require(value >= 0, self.key(name), ">= 0", value)
        require(decoder in ("triplane", "conv"), self.key("decoder"), "'triplane' or 'conv'", decoder)
        pixels = render_size**2
        require(rays_per_image is None or 0 < rays_per_image <= pixels, self.key("rays_per_image"),
                f"in [1, render_size²={pixels}] or null", rays_per_image)  # fmt: skip
        require(0 <= depth_quantiles[0] < depth_quantiles[1] <= 1, self.key("depth_quantiles"),
                "[low, high], 0 <= low < high <= 1", list(depth_quantiles))  # fmt: skip
        require(0 <= depth_margin < 0.5, self.key("depth_margin"), "in [0, 0.5)", depth_margin)
        num_layers = encoder.num_out_layers
        if num_layers < 1:
            raise ConfigError(
                f"the encoder must carry its last layers' tokens: set {self.encoder_key('num_out_layers')} >= 1 (4)"
            )
        self.decoder_kind = decoder
        self.patch_size = encoder.patch_size
        self.input_size = input_size
        self.render_size = render_size
        self.rays_per_image = rays_per_image
        self.near, self.far = near, far
        self.depth_normalization: DepthNormalization = depth_normalization
        self.depth_quantiles = (float(depth_quantiles[0]), float(depth_quantiles[1]))
        self.depth_margin = depth_margin
        self.empty_background = empty_background
        self.lambda_rgb, self.lambda_depth = lambda_rgb, lambda_depth
        self.lambda_dist, self.lambda_norm = lambda_dist, lambda_norm

        # the teacher is taken before any re-initialisation of the student
        self.teacher: FrozenTeacher | None = None
        if lambda_dist > 0:
            self.teacher = build_teacher(teacher, encoder, kwargs.get("init_encoder_from"))
        elif teacher is not None:
            rank_zero_warn(f"{self.key('teacher')} is ignored: lambda_dist is 0, so there is no distillation")
        if random_init:
            encoder.reinitialize()

        dim = encoder.embed_dim
        rep_dim = dim * num_layers
        self.distill_proj: nn.Module = nn.Identity()
        if self.teacher is not None and teacher_width(self.teacher) != rep_dim:
            self.distill_proj = nn.Linear(rep_dim, teacher_width(self.teacher))

        self.renderer = FixedCameraRenderer(
            size=render_size,
            fov_deg=fov_deg,
            near=near,
            far=far,
            box_size=box_size,
            num_coarse=num_coarse,
            num_fine=num_fine,
            background=background,
            ray_chunk=ray_chunk,
            recompute_chunks=recompute_chunks,
        )
        self.triplane: TriplaneDecoder | None = None
        self.field: TriplaneField | None = None
        self.conv_decoder: ConvDecoder | None = None
        if decoder == "triplane":
            self.triplane = TriplaneDecoder(
                rep_dim,
                dim=decoder_dim,
                depth=decoder_depth,
                num_heads=decoder_heads,
                grid=triplane_grid,
                plane_size=triplane_size,
                channels=triplane_channels,
                self_attention=decoder_self_attention,
            )
            self.field = TriplaneField(
                triplane_channels,
                hidden=field_hidden,
                box_size=self.renderer.box_size,
                aggregate=plane_aggregate,
                sampler=sampler,
                density_shift=density_shift,
                recompute_mlp=recompute_mlp,
            )
        else:
            size = input_size or int(encoder.config.get("img_size", render_size))
            grid = size // encoder.patch_size
            self.conv_decoder = ConvDecoder(rep_dim, grid, dim=decoder_dim, out_size=render_size, near=near, far=far)

    # ------------------------------------------------------------------ set-up checks
    def check_data(self, spec: DataSpec) -> None:
        """The encoder's input must be whole in patches; depth must be there when a depth term is on."""
        size, where = self.encoder_input_size(spec)
        if size[0] % self.patch_size or size[1] % self.patch_size:
            raise ConfigError(
                f"{where}={size[0] if size[0] == size[1] else list(size)} is not divisible by the encoder's patch "
                f"size {self.encoder_key('patch_size')}={self.patch_size}: pick sizes so that the patch grid is whole"
            )
        if self.lambda_depth > 0 and not spec.with_depth:
            raise ConfigError(
                f"TriplaneReconstruction renders depth ({self.key('lambda_depth')}={self.lambda_depth}) but the data "
                f"at {spec.key_prefix} has no depth: use shards with depth (`selfsup3d data render`, converted scenes "
                f"with depth, or `selfsup3d data pseudo-depth` for photos) or set {self.key('lambda_depth')} 0"
            )

    def encoder_input_size(self, spec: DataSpec) -> tuple[tuple[int, int], str]:
        """``input_size`` when set, else the data's size."""
        if self.input_size:
            return (self.input_size, self.input_size), self.key("input_size")
        return super().encoder_input_size(spec)

    # ------------------------------------------------------------------ forward pieces
    def encoder_input(self, images: Tensor) -> Tensor:
        """Images resized to ``input_size`` (when set) for the encoder and the teacher."""
        size = (self.input_size, self.input_size) if self.input_size else None
        if size is not None and tuple(images.shape[-2:]) != size:
            return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        return images

    def representation(self, features: EncoderOutput) -> Tensor:
        """The 3D-Prior representation: class + patch tokens of the last layers, concatenated."""
        return features.concat_layers()

    def targets(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Colour ``[B, 3, S, S]`` and, when the batch has depth, normalised depth ``[B, 1, S, S]`` and its
        validity mask, at the render size."""
        images = batch["image"]
        size = (self.render_size, self.render_size)
        rgb = images
        if images.shape[-2:] != size:
            rgb = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        depth = batch.get("depth")
        if depth is None:
            return rgb.float(), None, None
        if depth.shape[-2:] != size:
            depth = F.interpolate(depth, size=size, mode="nearest")  # keeps "unknown" pixels unknown
        norm, valid = normalize_depth(
            depth, self.near, self.far, self.depth_normalization, self.depth_quantiles, self.depth_margin
        )
        mask = batch.get("mask")
        if self.empty_background and mask is not None:
            if mask.shape[-2:] != size:
                mask = F.interpolate(mask.float(), size=size, mode="nearest")
            empty = (mask <= 0.5) & ~valid
            norm = torch.where(empty, torch.full_like(norm, self.far), norm)
            valid = valid | empty
        return rgb.float(), norm, valid

    def render(
        self, features: EncoderOutput, rep: Tensor, pixels: Tensor | None, perturb: bool
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Colour ``[B, R, 3]``, depth ``[B, R]``, opacity and mean density ``[B, R]`` (``None`` for the
        convolutional ablation) at flat pixel indices ``[B, R]`` (all pixels when ``None``)."""
        if self.triplane is not None and self.field is not None:
            planes = self.triplane(rep)
            out = self.renderer(self.field, planes, pixels, perturb)
            return out.values, out.depth, out.opacity, out.mean_density
        assert self.conv_decoder is not None
        rgb_map, depth_map = self.conv_decoder(rep[:, 1:], features.grid)
        rgb, depth = _flat_pixels(rgb_map), _flat_pixels(depth_map)[..., 0]
        if pixels is not None:
            rgb = rgb.gather(1, pixels[..., None].expand(-1, -1, 3))
            depth = depth.gather(1, pixels)
        return rgb, depth, None, None

    def sample_pixels(self, batch_size: int, device: torch.device) -> Tensor | None:
        """``[B, R]`` random distinct pixel indices per image for training (``None``: every pixel)."""
        total = self.render_size**2
        if self.rays_per_image is None or self.rays_per_image >= total:
            return None
        return torch.rand(batch_size, total, device=device).argsort(dim=1)[:, : self.rays_per_image]

    # ------------------------------------------------------------------ the step
    def step(self, batch: Any, stage: str, encoder: Encoder) -> dict[str, Any]:
        images = batch["image"]
        b = images.shape[0]
        x = self.encoder_input(images)
        features: EncoderOutput = encoder(x)
        rep = self.representation(features)
        out: dict[str, Any] = {"features": features}

        target_rgb, target_depth, valid = self.targets(batch)
        if target_depth is None and self.lambda_depth > 0:
            raise ConfigError(
                "the batch has no depth: read shards with depth (data with_depth: true), annotate images with "
                f"`selfsup3d data pseudo-depth`, or set {self.key('lambda_depth')} 0"
            )
        training = stage == "train"
        pixels = self.sample_pixels(b, images.device) if training else None
        rgb, depth, opacity, mean_density = self.render(features, rep, pixels, perturb=training)

        target_rgb_px = _flat_pixels(target_rgb)
        if pixels is not None:
            target_rgb_px = target_rgb_px.gather(1, pixels[..., None].expand(-1, -1, 3))
        rgb_loss = F.mse_loss(rgb, target_rgb_px)
        loss = self.lambda_rgb * rgb_loss
        out.update(rgb_loss=rgb_loss.detach(), psnr=-10.0 * torch.log10(rgb_loss.detach().clamp(min=1e-10)))

        if target_depth is not None and valid is not None:
            t_depth, t_valid = _flat_pixels(target_depth)[..., 0], _flat_pixels(valid)[..., 0]
            if pixels is not None:
                t_depth, t_valid = t_depth.gather(1, pixels), t_valid.gather(1, pixels)
            depth_loss = _masked_mse(depth, t_depth, t_valid)
            loss = loss + self.lambda_depth * depth_loss
            out.update(depth_loss=depth_loss.detach(), depth_rmse=depth_loss.detach().sqrt())
            out["depth_valid_share"] = t_valid.float().mean()

        if mean_density is not None:
            density_l1 = mean_density.mean()
            loss = loss + self.lambda_norm * density_l1
            out["density_l1"] = density_l1.detach()
        if opacity is not None:
            out["opacity"] = opacity.detach().mean()

        if self.teacher is not None:
            teacher_features: EncoderOutput = self.teacher(x)
            dist_loss = distillation_loss(self.distill_proj(rep), teacher_features, features.grid)
            loss = loss + self.lambda_dist * dist_loss
            t_rep = teacher_features.concat_layers()
            if t_rep.shape == rep.shape:
                out["teacher_cosine"] = F.cosine_similarity(rep.detach().float(), t_rep.float(), dim=-1).mean()
            out.update(dist_loss=dist_loss.detach(), teacher_features=teacher_features)
        out["loss"] = loss

        if not training:  # pictures for callbacks (TriplaneImages)
            s = self.render_size
            out["image"] = target_rgb
            out["render_rgb"] = rgb.detach().transpose(1, 2).reshape(b, 3, s, s)
            out["render_depth"] = depth.detach().reshape(b, 1, s, s)
            if target_depth is not None:
                out["target_depth"] = target_depth
                out["depth_valid"] = valid
            if opacity is not None:
                out["render_opacity"] = opacity.detach().reshape(b, 1, s, s)
        return out
