"""Encoder export: the part of a pretraining run that users keep.

An exported encoder is a ``.safetensors`` file with the timm ViT's weights under timm's own key
schema, plus the encoder's constructor arguments in the file's metadata. It loads three ways::

    timm.create_model("vit_base_patch14_dinov2", checkpoint_path="encoder.safetensors", num_classes=0, ...)
    ViTEncoder("base", checkpoint_path="encoder.safetensors")       # any selfsup3d objective or script
    load_exported_encoder("encoder.safetensors")                     # rebuilt from the metadata

Command: ``selfsup3d export RUN/checkpoints/last.ckpt --out encoder.safetensors``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from selfsup3d.encoders.checkpoint import encoder_tensors
from selfsup3d.encoders.vit import ViTEncoder

METADATA_KEY = "selfsup3d_encoder"


def save_encoder(state_dict: Mapping[str, Tensor], config: Mapping[str, Any] | None, out: str | Path) -> Path:
    """Write encoder weights (timm keys) and its config to ``out`` (``.safetensors``)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"exported encoders are .safetensors files, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    meta = {METADATA_KEY: json.dumps(dict(config or {}))}
    save_file(tensors, str(out), metadata=meta)
    return out


def read_export_config(path: str | Path) -> dict[str, Any]:
    """The encoder config stored in an exported file (empty when the file has none)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get(METADATA_KEY, "{}"))


def load_exported_encoder(path: str | Path, **overrides: Any) -> ViTEncoder:
    """Rebuild a :class:`ViTEncoder` from an exported file; ``overrides`` change constructor arguments
    (e.g. ``img_size``). The weights load strictly."""
    config = read_export_config(path)
    if not config:
        raise ValueError(f"{path} has no selfsup3d encoder metadata; build ViTEncoder(name, checkpoint_path=...)")
    config.update(overrides, pretrained=False, checkpoint_path=str(path))
    return ViTEncoder(**config)


def export_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    """Export the encoder of a selfsup3d Lightning checkpoint of any objective."""
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
    return save_encoder(sd, config, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="selfsup3d export",
        description="Write the encoder of a selfsup3d checkpoint as a .safetensors file (timm key schema).",
    )
    parser.add_argument("checkpoint", help="a Lightning checkpoint of any selfsup3d objective (e.g. last.ckpt)")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint, args.out)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    n = sum(t.numel() for t in _tensors(path))
    print(f"wrote {path} ({n / 1e6:.2f}M parameters, config: {read_export_config(path)})")
    return 0


def _tensors(path: Path) -> list[Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118
