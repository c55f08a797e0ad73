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

The teacher (``teacher``): by default a frozen copy of the encoder as built (with its ``pretrained`` or
``checkpoint_path`` weights, after ``init_encoder_from``); or a file (exported encoder, timm state dict,
selfsup3d checkpoint) or a timm model id (``vit_large_patch14_dinov2.lvd142m``). A teacher that can be rebuilt
from its source is **not** written into checkpoints; one that cannot (the copy of a randomly initialised
encoder) is written once, under ``teacher.``. Resuming rebuilds the first kind and loads the second; either
way the checkpoint's keys are checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from selfsup3d.encoders.vit import EncoderOutput, FrozenTeacher, ViTEncoder, make_teacher
from selfsup3d.errors import CheckpointMismatchError, ConfigError
from selfsup3d.geometry.triplane import Aggregate
from selfsup3d.geometry.volume import DepthNormalization, normalize_depth
from selfsup3d.objectives.base import PretrainObjective
from selfsup3d.objectives.triplane_heads import (
    ConvDecoder,
    FixedCameraRenderer,
    Sampler,
    TriplaneDecoder,
    TriplaneField,
)

_WEIGHT_SUFFIXES = (".ckpt", ".safetensors", ".pth", ".pt", ".bin")


def encoder_is_reproducible(encoder: nn.Module, init_encoder_from: str | None = None) -> bool:
    """Whether the encoder's initial weights can be rebuilt from its configuration: pretrained weights,
    a checkpoint file or ``init_encoder_from`` (a randomly initialised encoder cannot)."""
    if init_encoder_from:
        return True
    config = getattr(encoder, "config", None)
    if not isinstance(config, Mapping):
        return False
    pretrained = config.get("pretrained")
    if isinstance(pretrained, str):
        pretrained = pretrained.lower() not in {"", "false", "none"}
    return bool(pretrained) or bool(config.get("checkpoint_path"))


def build_teacher(spec: str | None, encoder: nn.Module) -> FrozenTeacher:
    """The frozen teacher for ``spec`` (see :class:`TriplaneReconstruction`'s ``teacher``)."""
    if spec is None or spec in ("", "encoder"):
        return make_teacher(encoder)
    config = dict(getattr(encoder, "config", {}) or {})
    path = Path(spec)
    if path.exists() or spec.endswith(_WEIGHT_SUFFIXES):
        if not path.is_file():
            raise FileNotFoundError(f"teacher weights file not found: {spec}")
        if path.suffix == ".safetensors":
            from selfsup3d.encoders.export import load_exported_encoder, read_export_config

            if read_export_config(path):
                keep = {k: config[k] for k in ("img_size", "num_out_layers") if k in config}
                return FrozenTeacher(load_exported_encoder(path, **keep))
        if not config:
            raise ConfigError(f"model.teacher={spec!r}: the encoder has no config to build a teacher of its shape")
        config.update(pretrained=False, checkpoint_path=str(path), grad_checkpointing=False, drop_path_rate=0.0)
        return FrozenTeacher(ViTEncoder(**config))
    # a timm model id: "arch.tag", "timm/arch.tag" or "hf-hub:timm/arch.tag"
    model_id = spec.removeprefix("hf-hub:")
    arch = model_id.split("/")[-1].split(".")[0]
    pretrained: bool | str = model_id if "/" in model_id else (f"timm/{model_id}" if "." in model_id else True)
    return FrozenTeacher(
        ViTEncoder(
            name=arch,
            img_size=int(config.get("img_size", 224)),
            pretrained=pretrained,
            num_out_layers=int(config.get("num_out_layers", 4)),
        )
    )


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
        teacher: ``null`` (a frozen copy of the encoder as built), a weights file, or a timm model id.
        random_init: re-initialise the student encoder's weights after the teacher is taken (ablation).
        **kwargs: optimisation and fine-tuning arguments of :class:`~selfsup3d.objectives.base.PretrainObjective`.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: Literal["triplane", "conv"] = "triplane",
        decoder_dim: int = 512,
        decoder_depth: int = 2,
        decoder_heads: int = 8,
        decoder_self_attention: bool = True,
        triplane_grid: int = 16,
        triplane_size: int = 128,
        triplane_channels: int = 32,
        field_hidden: int = 64,
        plane_aggregate: Aggregate = "sum",
        sampler: Sampler = "auto",
        input_size: int | None = None,
        render_size: int = 256,
        rays_per_image: int | None = 4096,
        num_coarse: int = 16,
        num_fine: int = 16,
        fov_deg: float = 30.0,
        near: float = 1.5,
        far: float = 3.5,
        box_size: float | None = None,
        background: float | None = None,
        ray_chunk: int | None = 8192,
        recompute_chunks: bool = False,
        recompute_mlp: bool = True,
        density_shift: float = -1.0,
        depth_normalization: DepthNormalization = "percentile",
        depth_quantiles: tuple[float, float] = (0.02, 0.98),
        depth_margin: float = 0.1,
        empty_background: bool = False,
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
            if value < 0:
                raise ConfigError(f"model.{name} must be >= 0, got {value}")
        if decoder not in ("triplane", "conv"):
            raise ConfigError(f"model.decoder must be 'triplane' or 'conv', got {decoder!r}")
        if rays_per_image is not None and not 0 < rays_per_image <= render_size**2:
            raise ConfigError(f"model.rays_per_image must be in [1, render_size²={render_size**2}] or null")
        if not 0 <= depth_quantiles[0] < depth_quantiles[1] <= 1 or not 0 <= depth_margin < 0.5:
            raise ConfigError("model.depth_quantiles must be 0 <= low < high <= 1 and depth_margin in [0, 0.5)")
        num_layers = getattr(encoder, "num_out_layers", 0)
        if num_layers < 1:
            raise ConfigError("the encoder must carry its last layers' tokens: set encoder num_out_layers >= 1 (4)")
        self.decoder_kind = decoder
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
        self.teacher_reproducible = True
        if lambda_dist > 0:
            self.teacher = build_teacher(teacher, encoder)
            self.teacher_reproducible = teacher not in (None, "", "encoder") or encoder_is_reproducible(
                encoder, kwargs.get("init_encoder_from")
            )
        elif teacher is not None:
            rank_zero_warn("model.teacher is ignored: lambda_dist is 0, so there is no distillation")
        if random_init:
            vit = getattr(encoder, "vit", None)
            if vit is None or not hasattr(vit, "init_weights"):
                raise ConfigError("model.random_init needs a timm ViT encoder")
            vit.init_weights()

        dim = int(encoder.embed_dim)
        rep_dim = dim * num_layers
        self.distill_proj: nn.Module = nn.Identity()
        if self.teacher is not None:
            teacher_dim = int(self.teacher.module.embed_dim) * int(self.teacher.module.num_out_layers)
            if teacher_dim != rep_dim:
                self.distill_proj = nn.Linear(rep_dim, teacher_dim)

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
            size = input_size or int(getattr(encoder, "config", {}).get("img_size", render_size))
            grid = size // int(getattr(encoder, "patch_size", 16))
            self.conv_decoder = ConvDecoder(rep_dim, grid, dim=decoder_dim, out_size=render_size, near=near, far=far)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The module's state without the teacher when the teacher can be rebuilt from its source."""
        state = super().state_dict(*args, **kwargs)
        if self.teacher is not None and self.teacher_reproducible:
            prefix = kwargs.get("prefix", "")
            for key in [k for k in state if k.startswith(f"{prefix}teacher.")]:
                del state[key]
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load strictly; a state without teacher weights keeps the teacher rebuilt from its source."""
        if self.teacher is not None and not any(k.startswith("teacher.") for k in state_dict):
            own = {f"teacher.{k}": v for k, v in self.teacher.state_dict(keep_vars=True).items()}
            state_dict = {**state_dict, **own}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint's keys before loading, naming what is missing or unexpected: every key of
        :meth:`state_dict` must be there (teacher weights only when the teacher cannot be rebuilt)."""
        saved = set(checkpoint.get("state_dict", {}))
        expected = set(self.state_dict())
        missing = sorted(expected - saved)
        unexpected = sorted(k for k in saved - expected if not k.startswith("teacher."))
        if self.teacher is None:
            unexpected = sorted(set(unexpected) | {k for k in saved if k.startswith("teacher.")})
        if missing or unexpected:
            parts = ["the checkpoint does not match TriplaneReconstruction"]
            if missing:
                parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:10])}")
            if unexpected:
                parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}")
            raise CheckpointMismatchError("; ".join(parts))

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

    def distillation(self, student: Tensor, teacher: EncoderOutput) -> Tensor:
        """MSE between the (projected) student representation and the teacher's, patch grids matched."""
        target = teacher.concat_layers().float()
        pred = self.distill_proj(student).float()
        if target.shape[1] != pred.shape[1]:  # different patch grids: resample the teacher's patch tokens
            n = pred.shape[1] - 1
            side = int(round(n**0.5))
            t_side = int(round((target.shape[1] - 1) ** 0.5))
            if side * side != n or t_side * t_side != target.shape[1] - 1:
                raise ConfigError("student and teacher patch grids differ and are not square")
            grid = target[:, 1:].transpose(1, 2).reshape(target.shape[0], -1, t_side, t_side)
            grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
            target = torch.cat([target[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
        return F.mse_loss(pred, target)

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
            return out.rgb, out.depth, out.opacity, out.mean_density
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
    def step(self, batch: Any, stage: str) -> dict[str, Any]:
        images = batch["image"]
        b = images.shape[0]
        x = self.encoder_input(images)
        features: EncoderOutput = self.encoder(x)
        rep = self.representation(features)
        out: dict[str, Any] = {"features": features}

        target_rgb, target_depth, valid = self.targets(batch)
        if target_depth is None and self.lambda_depth > 0:
            raise ConfigError(
                "the batch has no depth: read shards with depth (data with_depth: true), annotate images with "
                "`selfsup3d data pseudo-depth`, or set model.lambda_depth 0"
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
            dist_loss = self.distillation(rep, teacher_features)
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
