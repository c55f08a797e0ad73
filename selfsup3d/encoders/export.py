"""Encoder export: the part of a pretraining run that users keep.

An exported encoder is a ``.safetensors`` file with the timm ViT's weights under timm's own key schema and, in
the file's metadata (:mod:`selfsup3d.encoders.architecture`), the encoder's constructor arguments, the timm
model name and ``timm.create_model`` arguments that rebuild it without selfsup3d, and its architecture. It
loads three ways::

    # plain timm, no selfsup3d installed (`selfsup3d export encoder.safetensors` prints this line filled in)
    with safe_open("encoder.safetensors", "pt") as f:
        meta = f.metadata()
    timm.create_model(meta["timm_name"], checkpoint_path="encoder.safetensors", **json.loads(meta["timm_kwargs"]))
    ViTEncoder("base", checkpoint_path="encoder.safetensors")       # any selfsup3d objective or script
    load_exported_encoder("encoder.safetensors")                     # rebuilt from the metadata

Commands (:mod:`selfsup3d.cli.export`): ``selfsup3d export RUN/checkpoints/last.ckpt --out encoder.safetensors``
writes one; ``selfsup3d export encoder.safetensors`` prints the ``timm.create_model`` line for an exported file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from selfsup3d.checkpoint_io import save_safetensors
from selfsup3d.encoders.architecture import (
    ARCHITECTURE_KEY,
    CONFIG_KEY,
    TIMM_KWARGS_KEY,
    TIMM_NAME_KEY,
    vit_architecture,
)
from selfsup3d.encoders.base import Encoder
from selfsup3d.encoders.vit import ViTEncoder
from selfsup3d.encoders.weights import encoder_tensors, load_encoder_weights
from selfsup3d.errors import CheckpointMismatchError

METADATA_KEY = CONFIG_KEY


def timm_metadata(encoder: nn.Module) -> dict[str, Any]:
    """What plain timm needs to rebuild ``encoder`` (``timm_name``, ``timm_kwargs``) and its ``architecture``,
    as keyword arguments of :func:`save_encoder`; empty for encoders that are not a :class:`ViTEncoder`."""
    if not isinstance(encoder, ViTEncoder):
        return {}
    return {
        "timm_name": encoder.timm_name,
        "timm_kwargs": dict(encoder.timm_kwargs),
        "architecture": vit_architecture(encoder.vit),
    }


def save_encoder(
    state_dict: Mapping[str, Tensor],
    config: Mapping[str, Any] | None,
    out: str | Path,
    timm_name: str | None = None,
    timm_kwargs: Mapping[str, Any] | None = None,
    architecture: Mapping[str, Any] | None = None,
) -> Path:
    """Write encoder weights (timm keys) and their metadata to ``out`` (``.safetensors``).

    Args:
        state_dict: the timm ViT's weights.
        config: the :class:`ViTEncoder` constructor arguments (for :func:`load_exported_encoder`).
        out: the file to write.
        timm_name: the timm model name plain timm builds it from (see :func:`timm_metadata`).
        timm_kwargs: the matching ``timm.create_model`` keyword arguments.
        architecture: :func:`~selfsup3d.encoders.architecture.vit_architecture` of the model, compared on load.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"exported encoders are .safetensors files, got {out}")
    meta = {CONFIG_KEY: json.dumps(dict(config or {}))}
    if timm_name is not None:
        meta[TIMM_NAME_KEY] = timm_name
        meta[TIMM_KWARGS_KEY] = json.dumps(dict(timm_kwargs or {}))
    if architecture is not None:
        meta[ARCHITECTURE_KEY] = json.dumps(dict(architecture))
    return save_safetensors(state_dict, out, meta)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an exported ``.safetensors`` file (see :mod:`selfsup3d.encoders.architecture`)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_export_config(path: str | Path) -> dict[str, Any]:
    """The encoder config stored in an exported file (empty when the file has none)."""
    return json.loads(read_metadata(path).get(CONFIG_KEY, "{}"))


def timm_create_model_line(path: str | Path) -> str:
    """The ``timm.create_model(...)`` call that loads the exported file ``path`` in plain timm, filled in."""
    meta = read_metadata(path)
    if TIMM_NAME_KEY not in meta:
        raise ValueError(
            f"{path} records no timm model name (exported by an older selfsup3d); re-export it from its "
            "checkpoint with `selfsup3d export CKPT --out FILE.safetensors`"
        )
    kwargs = json.loads(meta.get(TIMM_KWARGS_KEY, "{}"))
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return f"timm.create_model({meta[TIMM_NAME_KEY]!r}, checkpoint_path={str(path)!r}{args})"


def load_exported_encoder(path: str | Path, **overrides: Any) -> ViTEncoder:
    """Rebuild a :class:`ViTEncoder` from an exported file; ``overrides`` change constructor arguments
    (e.g. ``img_size``). The weights load strictly."""
    config = read_export_config(path)
    if not config:
        raise ValueError(f"{path} has no selfsup3d encoder metadata; build ViTEncoder(name, checkpoint_path=...)")
    config.update(overrides, pretrained=False, checkpoint_path=str(path))
    return ViTEncoder(**config)


def export_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    """Export the encoder of a selfsup3d Lightning checkpoint of any objective.

    When the checkpoint records a :class:`ViTEncoder` config, the encoder is rebuilt from it and loaded
    strictly (so the weights are known to fit), and the export records the timm name and arguments too."""
    obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping) or "state_dict" not in obj:
        raise ValueError(f"{ckpt} is not a Lightning checkpoint (no state_dict)")
    sd = encoder_tensors({k: v for k, v in obj["state_dict"].items() if k.startswith("encoder.")})
    if not sd:
        raise ValueError(f"{ckpt} has no encoder.* weights")
    hparams = obj.get("hyper_parameters", {}) or {}
    enc = hparams.get("encoder", {})
    config = dict(enc.get("init_args", {})) if isinstance(enc, Mapping) else {}
    config.pop("checkpoint_path", None)
    config["pretrained"] = False
    if isinstance(enc, Mapping) and str(enc.get("class_path", "")).endswith("ViTEncoder"):
        encoder = ViTEncoder(**config)
        try:
            load_encoder_weights(encoder.vit, sd)
        except CheckpointMismatchError as err:
            raise ValueError(f"{ckpt}: its encoder weights do not fit its own encoder config: {err}") from None
        return save_encoder(encoder.export_state_dict(), config, out, **timm_metadata(encoder))
    return save_encoder(sd, config, out)


def export_encoder(encoder: Encoder, out: str | Path) -> Path:
    """Write a built encoder (e.g. a checkpoint's frozen teacher, the reference its student is measured against:
    saved in the checkpoint when it could not be rebuilt, rebuilt from its source otherwise) with a config that
    rebuilds it from the file alone."""
    config = {**encoder.config, "checkpoint_path": None, "pretrained": False}
    return save_encoder(encoder.export_state_dict(), config, out, **timm_metadata(encoder))
