"""The one place that builds timm ViTs: :func:`create_vit` by name and size, with pretrained weights when the
network allows, and ``vit_tiny_patch14_dinov2`` (ours, for tests and CPU demos) registered with timm.

Sizes: ``tiny``, ``small``, ``base``, ``large`` (:data:`SIZES`) or any timm ViT name: timm's
``VisionTransformer`` (DINOv2 and most ViTs) or its ``Eva`` (DINOv3's ``vit_*_dinov3``, with rotary position
embeddings, and EVA-02), which share the interface the encoder uses (:data:`TimmViT`). Imports nothing else of
the encoders, so the architecture records, the weights reader and the encoder can all build models.
"""

from __future__ import annotations

from typing import Any

import timm
from timm.models import register_model
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

from selfsup3d.errors import ConfigError, WeightsUnavailableError
from selfsup3d.hub import fetch_pretrained

TimmViT = VisionTransformer | Eva
"""The timm model classes an encoder can be: both have ``blocks``, ``patch_embed``, ``num_prefix_tokens``,
``forward_intermediates``, ``group_matcher`` and ``no_weight_decay``."""

SIZES: dict[str, str] = {
    "tiny": "vit_tiny_patch14_dinov2",
    "small": "vit_small_patch14_dinov2",
    "base": "vit_base_patch14_dinov2",
    "large": "vit_large_patch14_dinov2",
}


# timm's register_model reads the module's ``default_cfgs`` for the pretrained cfg (mean/std, input size).
default_cfgs = {
    "vit_tiny_patch14_dinov2": {
        "url": "",
        "num_classes": 0,
        "input_size": (3, 224, 224),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
}


_TINY_ARGS: dict[str, Any] = dict(patch_size=14, embed_dim=192, depth=12, num_heads=3, init_values=1e-5)


PLAIN_TIMM: dict[str, tuple[str, dict[str, Any]]] = {
    "vit_tiny_patch14_dinov2": ("vit_small_patch14_dinov2", _TINY_ARGS),
}
"""Models registered here, which plain timm does not know: a timm model with the same block layout and the
arguments that turn it into ours (what an export records for ``timm.create_model``)."""


@register_model
def vit_tiny_patch14_dinov2(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Ti/14 with DINOv2's block layout (layer scale). No released weights: tests and CPU demos."""
    if pretrained:
        raise ConfigError("vit_tiny_patch14_dinov2 has no released weights; use pretrained=false")
    return _create_vision_transformer("vit_tiny_patch14_dinov2", pretrained=False, **dict(_TINY_ARGS, **kwargs))


def wants_pretrained(pretrained: bool | str) -> bool:
    """Whether a ``pretrained`` setting (``true``, ``false``, a hub id, ``"none"``) asks for weights."""
    return pretrained.lower() not in {"", "false", "none"} if isinstance(pretrained, str) else bool(pretrained)


def create_vit(
    name: str,
    *,
    img_size: int = 224,
    patch_size: int | None = None,
    pretrained: bool | str = False,
    drop_path_rate: float = 0.0,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    layer_scale_init: float | None = None,
) -> TimmViT:
    """Build a timm ViT (a ``VisionTransformer`` or an ``Eva``). See :class:`ViTEncoder` for the arguments."""
    model_name = SIZES.get(name, name)
    if model_name not in timm.list_models():
        known = ", ".join(SIZES)
        raise ConfigError(f"unknown encoder name {name!r}: use one of {known} or a timm ViT model name")
    kwargs: dict[str, Any] = {
        "img_size": img_size,
        "num_classes": 0,
        "dynamic_img_size": True,
        "drop_path_rate": drop_path_rate,
    }
    overrides = {
        "patch_size": patch_size,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "init_values": layer_scale_init,
    }
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(pretrained, str) and pretrained.lower() in {"", "false", "none"}:
        pretrained = False
    if isinstance(pretrained, str) and pretrained.lower() == "true":
        pretrained = True
    if pretrained and any(v is not None for k, v in overrides.items() if k != "patch_size"):
        raise ConfigError(
            "embed_dim/depth/num_heads overrides change the architecture: they cannot use pretrained weights"
        )
    hub_id: str | None = None
    if isinstance(pretrained, str):
        hub_id = pretrained.removeprefix("hf-hub:")
        kwargs["pretrained_cfg_overlay"] = {"hf_hub_id": hub_id}
        pretrained = True
    if not pretrained:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    else:
        hub_id = hub_id or getattr(timm.models.get_pretrained_cfg(model_name), "hf_hub_id", None) or model_name
        what = f"pretrained weights {hub_id} for encoder {name!r}"
        advice = (
            f"Download them where there is network (`hf download {hub_id} model.safetensors`, or copy the Hugging "
            "Face cache), then set the encoder's checkpoint_path to the file and pretrained to false."
        )
        try:
            model = fetch_pretrained(lambda: timm.create_model(model_name, pretrained=True, **kwargs), what, advice)
        except (ConfigError, WeightsUnavailableError):
            raise
        except (OSError, RuntimeError, ValueError) as err:
            raise WeightsUnavailableError(f"could not load {what}: {err}. {advice}") from err
    if not isinstance(model, (VisionTransformer, Eva)):
        raise ConfigError(
            f"encoder {name!r} is a {type(model).__name__}, not a timm ViT (a VisionTransformer, as DINOv2, or an "
            "Eva, as DINOv3's vit_*_dinov3)"
        )
    for block in model.blocks:
        # timm routes attention through F.scaled_dot_product_attention (flash / memory-efficient kernels).
        block.attn.fused_attn = True
    return model
