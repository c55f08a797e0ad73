"""The shared encoder: a timm Vision Transformer of the DINOv2 or DINOv3 family.

Every objective takes its encoder by injection, so this is the one place that knows about timm.
The encoder takes images in ``[0, 1]`` (it normalises them itself with the weights' mean/std) and
returns an :class:`EncoderOutput` with what the objectives need: the class token, the patch tokens
(also as a spatial grid) and the class + patch tokens of the last ``num_out_layers`` blocks.

Sizes: ``tiny`` (ours, for tests and CPU demos), ``small``, ``base``, ``large`` or any timm ViT name (built by
:mod:`selfsup3d.encoders.timm_factory`), DINOv3's included (``vit_small_patch16_dinov3``, ...: timm's ``Eva`` with
rotary position embeddings and four register tokens).
Weights: ``pretrained`` (timm's default weights for the name, or a Hugging Face hub id holding timm
weights) when the network allows, or ``checkpoint_path`` (a local file, see
:mod:`selfsup3d.encoders.weights`) which works offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import Tensor

from selfsup3d.encoders.architecture import layer_scale, vit_architecture
from selfsup3d.encoders.base import Encoder, EncoderOutput
from selfsup3d.encoders.timm_factory import PLAIN_TIMM, SIZES, TimmViT, create_vit, wants_pretrained
from selfsup3d.encoders.weights import load_encoder_weights
from selfsup3d.errors import ConfigError, require


class ViTEncoder(Encoder):
    """A timm ViT (DINOv2 or DINOv3 family) behind a small, stable interface.

    Args:
        name: ``tiny``/``small``/``base``/``large`` (DINOv2) or any timm ViT model name
            (e.g. ``vit_base_patch14_reg4_dinov2``, or DINOv3's ``vit_base_patch16_dinov3``).
        img_size: training image size; other sizes still work (position embeddings are interpolated).
        patch_size: patch size; ``null`` keeps the model's (14). With pretrained weights timm resamples
            the patch embedding.
        pretrained: ``true`` loads timm's default weights for ``name`` (DINOv2 LVD-142M for the DINOv2
            sizes); a string is a Hugging Face hub id holding timm weights
            (``timm/vit_base_patch14_dinov2.lvd142m``). Needs the network or a filled HF cache.
        checkpoint_path: a local file with weights: a timm state dict (``.pth``/``.bin``), a
            ``.safetensors`` file, an exported selfsup3d encoder or a selfsup3d Lightning checkpoint of
            any objective. Loaded strictly: mismatched keys are an error that names them.
        grad_checkpointing: recompute block activations in the backward pass to save memory.
        drop_path_rate: stochastic depth rate.
        num_out_layers: how many of the last blocks' tokens :class:`EncoderOutput` carries.
        embed_dim: override the size's width (a fresh model; breaks pretrained weights).
        depth: override the number of blocks.
        num_heads: override the number of attention heads.
        layer_scale_init: override the LayerScale start value (DINOv2 sizes: 1e-5). A randomly initialised
            encoder trained for a short CPU demo barely moves at 1e-5; 1.0 keeps the same parameters with a
            neutral start. Not with pretrained weights (they carry their own).

    Attributes:
        config: the constructor arguments (saved in checkpoints and exports).
        timm_name: the timm model name that plain timm builds this architecture from (see :data:`PLAIN_TIMM`).
        timm_kwargs: the ``timm.create_model`` keyword arguments that go with ``timm_name``.
    """

    def __init__(
        self,
        name: str = "small",
        img_size: int = 224,
        patch_size: int | None = None,
        pretrained: bool | str = False,
        checkpoint_path: str | None = None,
        grad_checkpointing: bool = False,
        drop_path_rate: float = 0.0,
        num_out_layers: int = 4,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        layer_scale_init: float | None = None,
    ) -> None:
        super().__init__()
        # Kept so that a checkpoint can rebuild this encoder (see PretrainObjective's hparams).
        self.config: dict[str, Any] = {
            "name": name,
            "img_size": img_size,
            "patch_size": patch_size,
            "pretrained": pretrained,
            "checkpoint_path": checkpoint_path,
            "grad_checkpointing": grad_checkpointing,
            "drop_path_rate": drop_path_rate,
            "num_out_layers": num_out_layers,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "layer_scale_init": layer_scale_init,
        }
        self.vit = create_vit(
            name,
            img_size=img_size,
            patch_size=patch_size,
            pretrained=pretrained,
            drop_path_rate=drop_path_rate,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            layer_scale_init=layer_scale_init,
        )
        if img_size % self.patch_size:
            raise ConfigError(
                f"{self.key('img_size')}={img_size} is not divisible by the patch size "
                f"{self.patch_size} ({self.key('patch_size')}): pick sizes so that the patch "
                "grid is whole"
            )
        depth = len(self.vit.blocks)
        require(0 <= num_out_layers <= depth, self.key("num_out_layers"), f"in [0, depth={depth}]", num_out_layers)
        self._num_out_layers = num_out_layers
        self.set_grad_checkpointing(grad_checkpointing)
        cfg = self.vit.pretrained_cfg or {}
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)
        self.timm_name, self.timm_kwargs = plain_timm_arguments(
            SIZES.get(name, name), self.vit, img_size, layer_scale_init, fresh=not wants_pretrained(pretrained)
        )
        if checkpoint_path:
            load_encoder_weights(self.vit, checkpoint_path)

    # ------------------------------------------------------------------ properties
    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def patch_size(self) -> int:
        return int(self.vit.patch_embed.patch_size[0])

    @property
    def num_out_layers(self) -> int:
        return self._num_out_layers

    @property
    def reproducible(self) -> bool:
        pretrained = self.config["pretrained"]
        if isinstance(pretrained, str):
            pretrained = pretrained.lower() not in {"", "false", "none"}
        return bool(pretrained) or bool(self.config["checkpoint_path"])

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def num_heads(self) -> int:
        return int(self.vit.blocks[0].attn.num_heads)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.vit.num_prefix_tokens)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that take no weight decay: embeddings and tokens."""
        return {f"vit.{n}" for n in self.vit.no_weight_decay()}

    def param_groups(self, weight_decay: float, layer_decay: float | None) -> list[dict[str, Any]]:
        """timm's groups: no decay on 1-d parameters, biases, embeddings and tokens; with ``layer_decay``,
        block ``i`` of ``L`` gets ``lr_scale = decay ** (L - 1 - i)``, the embeddings ``decay ** L``, the
        final norm 1 (timm's ``group_matcher``)."""
        skip = set(self.vit.no_weight_decay())
        if layer_decay is None:
            groups = param_groups_weight_decay(self.vit, weight_decay, no_weight_decay_list=skip)
        else:
            groups = param_groups_layer_decay(
                self.vit, weight_decay=weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay
            )
        for group in groups:
            group.setdefault("lr_scale", 1.0)
        return groups

    def load_weights(self, source: str | Path) -> None:
        load_encoder_weights(self.vit, source)

    def reinitialize(self) -> None:
        self.vit.init_weights()

    # ------------------------------------------------------------------ forward
    def normalize(self, images: Tensor) -> Tensor:
        """``[0, 1]`` images to the weights' input distribution."""
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: Tensor) -> EncoderOutput:
        """Encode ``[B, 3, H, W]`` images with values in ``[0, 1]``; ``H`` and ``W`` multiples of the patch."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encoder expects [B, 3, H, W] images, got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the encoder patch size {self.patch_size}")
        x = self.normalize(images)
        n_layers = max(self.num_out_layers, 1)
        final, inters = self.vit.forward_intermediates(
            x, indices=n_layers, return_prefix_tokens=True, norm=True, output_fmt="NLC"
        )
        grid = (h // self.patch_size, w // self.patch_size)
        p = self.num_prefix_tokens
        layers = [torch.cat([prefix[:, :1], tokens], dim=1) for tokens, prefix in inters]
        return EncoderOutput(
            cls=final[:, 0],
            patches=final[:, p:],
            grid=grid,
            layers=layers[-self.num_out_layers :] if self.num_out_layers else [],
        )

    def export_state_dict(self) -> dict[str, Tensor]:
        """Weights under timm's key schema: they load into ``timm.create_model(name, ...)`` unchanged."""
        return {k: v.detach().clone() for k, v in self.vit.state_dict().items()}


def plain_timm_arguments(
    model_name: str, vit: TimmViT, img_size: int, layer_scale_init: float | None, fresh: bool
) -> tuple[str, dict[str, Any]]:
    """The model name and keyword arguments with which plain timm (without selfsup3d) builds ``vit``'s
    architecture: ``timm.create_model(name, checkpoint_path=..., **kwargs)``.

    Args:
        model_name: the timm name ``vit`` was built from (ours are mapped through :data:`PLAIN_TIMM`).
        vit: the built model; its width, depth, heads and patch size are read from it.
        img_size: the image size it was built for (position embeddings are stored at this size).
        layer_scale_init: the configured LayerScale start value, if any.
        fresh: ``vit`` holds freshly initialised weights, so its LayerScale values are the start value.
    """
    base, base_args = PLAIN_TIMM.get(model_name, (model_name, {}))
    arch = vit_architecture(vit)
    shape = ("patch_size", "embed_dim", "depth", "num_heads")
    kwargs: dict[str, Any] = {"img_size": int(img_size), **{k: arch[k] for k in shape}}
    kwargs.update({k: v for k, v in base_args.items() if k not in kwargs})
    if arch["layer_scale"]:
        if layer_scale_init is not None:
            kwargs["init_values"] = float(layer_scale_init)
        elif fresh:
            kwargs["init_values"] = float(f"{float(layer_scale(vit.blocks[0]).detach().flatten()[0]):.6g}")
        # else pretrained weights replaced the start value: the model name's own default (what was built) applies
    kwargs.update(num_classes=0, dynamic_img_size=True)
    return base, kwargs
