"""Reading encoder weights from the files people have.

Accepted, all under one function, :func:`read_encoder_state_dict`:

* a timm state dict (``.pth``, ``.pt``, ``.bin``), also the original DINOv2 and DINOv3 release files
  (timm's ``checkpoint_filter_fn`` of the model's family converts their keys and resamples position embeddings);
* a ``.safetensors`` file, e.g. an encoder exported by ``selfsup3d export``;
* a selfsup3d Lightning checkpoint (``.ckpt``) of any objective: its ``encoder.`` weights are used,
  heads and teacher are ignored.

Loading is strict: :func:`load_encoder_weights` refuses weights that do not fit and names the
missing, unexpected and mis-shaped keys, and the architecture fields (e.g. ``num_heads``) that differ from the
ones the file records (:mod:`selfsup3d.encoders.architecture`). A file that holds no weights, or pickled
Python objects, is refused in one sentence (:class:`~selfsup3d.errors.WeightsFileError`).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.models import eva, vision_transformer
from torch import Tensor

from selfsup3d.encoders.architecture import architecture_differences, recorded_architecture, vit_architecture
from selfsup3d.encoders.timm_factory import TimmViT
from selfsup3d.errors import CheckpointMismatchError, WeightsFileError

# Where the timm ViT sits inside the state dicts that selfsup3d writes, most specific first.
_PREFIXES = ("encoder.vit.", "vit.")
_EXPECTED = "a state dict (.pth/.pt/.bin), a Lightning checkpoint (.ckpt) or a .safetensors file"


def _load_file(path: Path) -> tuple[Mapping[str, object], dict[str, str]]:
    """The file's contents and, for ``.safetensors``, its metadata. Only tensors and plain containers are read:
    torch's ``weights_only`` loader, never a full unpickler."""
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            return load_file(str(path), device="cpu"), metadata
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsFileError(f"{path} is not a readable .safetensors file ({err})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found or "Weights only load failed" in str(err):
            what = f" ({found.group(1)})" if found else ""
            raise WeightsFileError(
                f"{path} holds pickled Python objects{what} besides tensors; they are not loaded, since unpickling "
                "can run arbitrary code. Where the file was made, save the tensors alone "
                "(torch.save(model.state_dict(), path) or a .safetensors file) and use that file"
            ) from None
        raise WeightsFileError(f"{path} is not a weights file ({err}); expected {_EXPECTED}") from None
    except Exception as err:  # torch's reader fails in many ways on other files (KeyError, EOFError, ...)
        raise WeightsFileError(
            f"{path} is not a weights file (torch cannot read it: {type(err).__name__}); expected {_EXPECTED}"
        ) from None
    if not isinstance(obj, Mapping):
        raise WeightsFileError(f"{path} does not hold a state dict (found {type(obj).__name__}); expected {_EXPECTED}")
    return obj, {}


def _read(source: str | Path | Mapping[str, object]) -> tuple[Mapping[str, object], dict[str, str]]:
    return _load_file(Path(source)) if isinstance(source, (str, Path)) else (source, {})


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


def read_encoder_state_dict(source: str | Path | Mapping[str, object], model: TimmViT) -> dict[str, Tensor]:
    """Weights for ``model`` (timm key schema) from a file path or an in-memory state dict."""
    obj, _ = _read(source)
    return _state_dict_for(obj, source, model)


def _state_dict_for(
    obj: Mapping[str, object], source: str | Path | Mapping[str, object], model: TimmViT
) -> dict[str, Tensor]:
    sd = encoder_tensors(obj)
    if not sd:
        raise CheckpointMismatchError(
            f"no tensors found in {source if isinstance(source, (str, Path)) else 'state dict'}"
        )
    # timm converts original DINOv2 / DINOv3 / CLIP layouts and resamples position and patch embeddings.
    family = eva if isinstance(model, eva.Eva) else vision_transformer
    return family.checkpoint_filter_fn(sd, model)


def _describe(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def load_encoder_weights(model: TimmViT, source: str | Path | Mapping[str, object]) -> None:
    """Load weights into a timm ViT strictly; on any mismatch raise :class:`CheckpointMismatchError` naming the
    architecture fields that differ from the ones the file records, and the missing, unexpected and mis-shaped
    keys."""
    obj, metadata = _read(source)
    recorded: dict[str, Any] | None = recorded_architecture(obj, metadata)
    differs = architecture_differences(recorded, vit_architecture(model)) if recorded else []
    sd = _state_dict_for(obj, source, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(
        f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(sd)
        if sd[k].shape != own[k].shape
    )
    if differs or missing or unexpected or shapes:
        where = source if isinstance(source, (str, Path)) else "the given state dict"
        parts = [f"encoder weights in {where} do not match the encoder"]
        if differs:
            parts.append(f"architecture differs: {', '.join(differs)}; build the encoder with the weights' values")
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_describe(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_describe(shapes)}")
        raise CheckpointMismatchError("; ".join(parts))
    model.load_state_dict(sd, strict=True)
