"""``selfsup3d export``: write the encoder (or the frozen teacher) of a checkpoint as a ``.safetensors`` file, or
print how plain timm loads an exported file (see :mod:`selfsup3d.encoders.export`).

::

    selfsup3d export RUN/checkpoints/last.ckpt --out encoder.safetensors
    selfsup3d export RUN/checkpoints/last.ckpt --teacher --out teacher.safetensors
    selfsup3d export encoder.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors import safe_open
from torch import Tensor

from selfsup3d.encoders.architecture import TIMM_NAME_KEY
from selfsup3d.encoders.export import (
    export_checkpoint,
    export_encoder,
    read_export_config,
    read_metadata,
    timm_create_model_line,
)
from selfsup3d.objectives.base import load_objective


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="selfsup3d export",
        description="Write the encoder of a selfsup3d checkpoint as a .safetensors file (timm key schema), "
        "or print how plain timm loads an exported file.",
    )
    parser.add_argument(
        "checkpoint",
        help="a Lightning checkpoint of any selfsup3d objective (e.g. last.ckpt); or, without --out, an exported "
        ".safetensors file whose timm.create_model line to print",
    )
    parser.add_argument("--out", help="output .safetensors path")
    parser.add_argument("--teacher", action="store_true", help="export the checkpoint's frozen teacher instead")
    args = parser.parse_args(argv)
    try:
        if args.out is None:
            if not args.checkpoint.endswith(".safetensors"):
                parser.error("--out is required to export a checkpoint")
            print(f"import timm\nmodel = {timm_create_model_line(args.checkpoint)}")
            return 0
        path = (export_teacher if args.teacher else export_checkpoint)(args.checkpoint, args.out)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    n = sum(t.numel() for t in _tensors(path))
    print(f"wrote {path} ({n / 1e6:.2f}M parameters, config: {read_export_config(path)})")
    if TIMM_NAME_KEY in read_metadata(path):
        print(f"load it in plain timm:\n  import timm\n  model = {timm_create_model_line(path)}")
    return 0


def export_teacher(ckpt: str | Path, out: str | Path) -> Path:
    """Export the frozen teacher of a selfsup3d checkpoint (see :func:`~selfsup3d.encoders.export.export_encoder`)."""
    teacher = load_objective(ckpt).frozen_teacher()
    if teacher is None:
        raise ValueError(f"{ckpt} has no frozen teacher")
    return export_encoder(teacher.encoder, out)


def _tensors(path: Path) -> list[Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118
