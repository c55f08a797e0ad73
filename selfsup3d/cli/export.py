"""``selfsup3d export``: write the encoder (or the frozen teacher) of a checkpoint as a ``.safetensors`` file, or
print how plain timm loads an exported file (see :mod:`selfsup3d.encoders.export`).

::

    selfsup3d export RUN/checkpoints/last.ckpt --out encoder.safetensors
    selfsup3d export RUN/checkpoints/last.ckpt --teacher --out teacher.safetensors
    selfsup3d export RUN/checkpoints/last.ckpt --teacher triplane --out teacher.safetensors   # multi-task: whose
    selfsup3d export encoder.safetensors

An exported model takes ImageNet-normalised images (``(x - mean) / std``, ``x`` in ``[0, 1]``, mean and std in
``model.pretrained_cfg``), as selfsup3d's encoder feeds it.
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
from selfsup3d.encoders.teacher import FrozenTeacher
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
    parser.add_argument(
        "--teacher",
        nargs="?",
        const="",
        metavar="OBJECTIVE",
        help="export the checkpoint's frozen teacher instead; in a multi-task run whose objectives hold different "
        "teachers, name the objective whose teacher",
    )
    args = parser.parse_args(argv)
    try:
        if args.out is None:
            if not args.checkpoint.endswith(".safetensors"):
                parser.error("--out is required to export a checkpoint")
            print(f"import timm\nmodel = {timm_create_model_line(args.checkpoint)}\n{INPUT_NOTE}")
            return 0
        if args.teacher is None:
            path = export_checkpoint(args.checkpoint, args.out)
        else:
            path, which = export_teacher(args.checkpoint, args.out, args.teacher or None)
            print(f"the frozen teacher of {which}")
    except (OSError, ValueError) as err:
        parser.error(str(err))
    n = sum(t.numel() for t in _tensors(path))
    print(f"wrote {path} ({n / 1e6:.2f}M parameters, config: {read_export_config(path)})")
    if TIMM_NAME_KEY in read_metadata(path):
        print(f"load it in plain timm:\n  import timm\n  model = {timm_create_model_line(path)}\n  {INPUT_NOTE}")
    return 0


INPUT_NOTE = "# input: ImageNet-normalised images, (x - mean) / std with x in [0, 1] (mean, std: model.pretrained_cfg)"


def export_teacher(ckpt: str | Path, out: str | Path, objective: str | None = None) -> tuple[Path, str]:
    """Export the frozen teacher of a selfsup3d checkpoint (see :func:`~selfsup3d.encoders.export.export_encoder`)
    and say whose it is. In a multi-task run, objectives that name the same teacher share it; when they hold
    different teachers, ``objective`` names whose to export.

    Raises:
        ValueError: no frozen teacher, ``objective`` holds none, or several and none is named (naming them).
    """
    model = load_objective(ckpt)
    holders: dict[int, tuple[FrozenTeacher, list[str]]] = {}
    for name, component in model.components():
        for module in component.modules():
            if isinstance(module, FrozenTeacher):
                holders.setdefault(id(module), (module, []))[1].append(name or type(component).__name__)
    if objective is not None:
        chosen = [(t, names) for t, names in holders.values() if objective in names]
        if not chosen:
            held = sorted(n for _, names in holders.values() for n in names)
            raise ValueError(
                f"--teacher {objective}: no objective of {ckpt} of that name holds a frozen teacher "
                f"(those that do: {', '.join(held) or 'none'})"
            )
    else:
        chosen = list(holders.values())
    if not chosen:
        raise ValueError(f"{ckpt} has no frozen teacher")
    if len(chosen) > 1:
        listed = "; ".join(f"{' and '.join(names)}: {t.source}" for t, names in chosen)
        raise ValueError(
            f"{ckpt} holds {len(chosen)} different frozen teachers ({listed}); name the objective whose to export: "
            f"--teacher {chosen[0][1][0]}"
        )
    teacher, names = chosen[0]
    return export_encoder(teacher.encoder, out), f"{' and '.join(sorted(names))} ({teacher.source})"


def _tensors(path: Path) -> list[Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118
