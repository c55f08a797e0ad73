"""Reading encoder weights from the files people have.

Accepted, all under one function, :func:`read_encoder_state_dict`:

* a timm state dict (``.pth``, ``.pt``, ``.bin``), also the original DINOv2 release files
  (timm's ``checkpoint_filter_fn`` converts their keys and resamples position embeddings);
* a ``.safetensors`` file, e.g. an encoder exported by ``selfsup3d export``;
* a selfsup3d Lightning checkpoint (``.ckpt``) of any objective: its ``encoder.`` weights are used,
  heads and teacher are ignored.

Loading is strict: :func:`load_encoder_weights` refuses weights that do not fit and names the
missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor

from selfsup3d.errors import CheckpointMismatchError

# Where the timm ViT sits inside the state dicts that selfsup3d writes, most specific first.
_PREFIXES = ("encoder.vit.", "vit.")


def _load_file(path: Path) -> Mapping[str, object]:
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds pickled Python objects besides tensors, which are not loaded for safety. "
            f"Re-save its state dict alone (torch.save(model.state_dict(), ...)). Detail: {err}"
        ) from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return obj


def encoder_tensors(obj: Mapping[str, object]) -> dict[str, Tensor]:
    """The ViT tensors of a loaded file: unwraps ``state_dict``/``model`` containers and strips the
    ``encoder.vit.`` (Lightning checkpoint) or ``vit.`` (ViTEncoder) prefix."""
    for key in ("state_dict", "model", "module"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
            obj = inner
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def read_encoder_state_dict(source: str | Path | Mapping[str, object], model: VisionTransformer) -> dict[str, Tensor]:
    """Weights for ``model`` (timm key schema) from a file path or an in-memory state dict."""
    obj = _load_file(Path(source)) if isinstance(source, (str, Path)) else source
    sd = encoder_tensors(obj)
    if not sd:
        raise CheckpointMismatchError(
            f"no tensors found in {source if isinstance(source, (str, Path)) else 'state dict'}"
        )
    # timm converts original DINOv2 / CLIP layouts and resamples position and patch embeddings.
    return checkpoint_filter_fn(sd, model)


def _describe(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def load_encoder_weights(model: VisionTransformer, source: str | Path | Mapping[str, object]) -> None:
    """Load weights into a timm ViT strictly; on any mismatch raise :class:`CheckpointMismatchError`
    naming the missing, unexpected and mis-shaped keys."""
    sd = read_encoder_state_dict(source, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(
        f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(sd)
        if sd[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        where = source if isinstance(source, (str, Path)) else "the given state dict"
        parts = [f"encoder weights in {where} do not match the encoder"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_describe(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_describe(shapes)}")
        raise CheckpointMismatchError("; ".join(parts))
    model.load_state_dict(sd, strict=True)
