"""What a timm ViT's tensor shapes do not tell: its architecture, recorded with exported weights and compared
when weights are loaded.

Two encoders can hold tensors of the same shapes and still compute different things: the number of attention
heads splits one ``qkv`` matrix differently. So an exported encoder records :func:`vit_architecture` in its
metadata, and loading weights compares the architecture they were trained with (from that metadata, or rebuilt
from a Lightning checkpoint's encoder config) with the encoder's, naming the fields that differ.

The metadata keys of an exported ``.safetensors`` file (all JSON strings but ``timm_name``):

* ``selfsup3d_encoder``: the :class:`~selfsup3d.encoders.ViTEncoder` constructor arguments;
* ``timm_name`` and ``timm_kwargs``: what plain timm needs to build the same model,
  ``timm.create_model(timm_name, checkpoint_path=file, **timm_kwargs)``;
* ``architecture``: :func:`vit_architecture` of the exported model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from timm.layers import LayerScale
from torch import Tensor

from selfsup3d.encoders.timm_factory import TimmViT, create_vit

CONFIG_KEY = "selfsup3d_encoder"
TIMM_NAME_KEY = "timm_name"
TIMM_KWARGS_KEY = "timm_kwargs"
ARCHITECTURE_KEY = "architecture"

ARCHITECTURE_FIELDS = (
    "embed_dim",
    "depth",
    "num_heads",
    "patch_size",
    "mlp_hidden",
    "reg_tokens",
    "class_token",
    "layer_scale",
)
"""Compared on load; ``num_heads`` is the one no tensor shape reveals."""

# ViTEncoder arguments that decide the architecture (the rest: weights, memory, regularisation, outputs).
_BUILD_ARGS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "layer_scale_init")


def layer_scale(block: Any) -> Tensor | None:
    """The LayerScale factors of a block's attention branch: ``ls1.gamma`` (``VisionTransformer``) or ``gamma_1``
    (``Eva``), or ``None`` when it has none."""
    ls1 = getattr(block, "ls1", None)
    return ls1.gamma if isinstance(ls1, LayerScale) else getattr(block, "gamma_1", None)


def vit_architecture(vit: TimmViT) -> dict[str, Any]:
    """The architecture of a built timm ViT (read from its modules; works on the meta device)."""
    block = vit.blocks[0]
    reg_token = getattr(vit, "reg_token", None)
    fc1 = getattr(block.mlp, "fc1", None)
    return {
        "embed_dim": int(vit.embed_dim),
        "depth": len(vit.blocks),
        "num_heads": int(block.attn.num_heads),
        "patch_size": int(vit.patch_embed.patch_size[0]),
        "mlp_hidden": int(fc1.out_features if fc1 is not None else block.mlp.fc2.in_features),  # Eva's SwiGLU: no fc1
        "reg_tokens": int(reg_token.shape[1]) if reg_token is not None else 0,
        "class_token": getattr(vit, "cls_token", None) is not None,
        "layer_scale": layer_scale(block) is not None,
    }


def architecture_from_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The architecture a :class:`~selfsup3d.encoders.ViTEncoder` config builds, or ``None`` when it cannot be
    built here. The model is built on the meta device: no memory, no weights, no network."""
    args = {k: config[k] for k in _BUILD_ARGS if config.get(k) is not None}
    try:
        with torch.device("meta"):
            vit = create_vit(str(config.get("name", "small")), pretrained=False, **args)
    except Exception:  # an unknown name or arguments of another version: nothing to compare with
        return None
    return vit_architecture(vit)


def recorded_architecture(
    obj: Mapping[str, object], metadata: Mapping[str, str] | None = None
) -> dict[str, Any] | None:
    """The architecture weights were trained with, when their file says: an export's ``architecture`` (or its
    encoder config) metadata, or the encoder config in a Lightning checkpoint's hyper-parameters."""
    metadata = metadata or {}
    if ARCHITECTURE_KEY in metadata:
        return dict(json.loads(metadata[ARCHITECTURE_KEY]))
    if CONFIG_KEY in metadata:
        config = json.loads(metadata[CONFIG_KEY])
        return architecture_from_config(config) if config else None
    hparams = obj.get("hyper_parameters")
    encoder = hparams.get("encoder") if isinstance(hparams, Mapping) else None
    if isinstance(encoder, Mapping) and str(encoder.get("class_path", "")).endswith("ViTEncoder"):
        init_args = encoder.get("init_args")
        if isinstance(init_args, Mapping):
            return architecture_from_config(init_args)
    return None


def architecture_differences(recorded: Mapping[str, Any], target: Mapping[str, Any]) -> list[str]:
    """``"<field> <recorded> (weights) vs <target> (encoder)"`` for every field where the two differ."""
    return [
        f"{k} {recorded[k]} (weights) vs {target[k]} (encoder)"
        for k in ARCHITECTURE_FIELDS
        if k in recorded and k in target and recorded[k] != target[k]
    ]
