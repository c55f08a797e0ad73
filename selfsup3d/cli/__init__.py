"""Command line: ``selfsup3d fit|validate|test|predict`` (LightningCLI) and the tool verbs.

The same entry point is installed as ``selfsup3d`` and as ``lightning``, so both of these work::

    lightning fit --config configs/masked_view.yaml
    selfsup3d fit --config configs/demo/masked_view.yaml --trainer.max_steps 100

Tool verbs, dispatched before LightningCLI parses anything::

    selfsup3d data render|convert|pseudo-depth ...   build WebDataset shards
    selfsup3d export CKPT --out encoder.safetensors  write the encoder of a checkpoint
    selfsup3d probe ENCODER... --data URLS           compare how 3D-aware encoders are
    selfsup3d retrieve CKPT --data URLS              2D->3D scene retrieval with a consensus model

One module per verb holds its argument parser (:mod:`selfsup3d.cli.data`, :mod:`~selfsup3d.cli.export`,
:mod:`~selfsup3d.cli.probe`, :mod:`~selfsup3d.cli.retrieve`); the library rooms hold what they call.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Sequence

import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from selfsup3d.cli import data, export, probe, retrieve
from selfsup3d.cli.lightning_cli import DESCRIPTION as CLI_DESCRIPTION
from selfsup3d.cli.lightning_cli import SelfSup3DCLI, prog

TOOL_VERBS: dict[str, tuple[Callable[[list[str]], int | None], str]] = {
    "data": (data.main, "build WebDataset shards: render, convert, pseudo-depth"),
    "export": (export.main, "write the encoder of a checkpoint as timm weights"),
    "probe": (probe.main, "compare how 3D-aware encoders are (correspondence, depth, pose, ...)"),
    "retrieve": (retrieve.main, "2D->3D scene retrieval and duplicate detection with a consensus model"),
}
"""verb -> (its ``main(argv) -> exit status``, what it does)."""

DESCRIPTION = (
    CLI_DESCRIPTION
    + "\n\nTool verbs: "
    + "; ".join(f"`selfsup3d {verb} --help` ({what})" for verb, (_, what) in TOOL_VERBS.items())
)


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of the ``selfsup3d`` and ``lightning`` scripts."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in TOOL_VERBS:
        return int(TOOL_VERBS[argv[0]][0](argv[1:]) or 0)
    # TF32 matmuls on Ampere+; no effect on the CPU.
    torch.set_float32_matmul_precision("high")
    try:
        SelfSup3DCLI(args=args, parser_kwargs={"description": DESCRIPTION, "prog": prog()})  # None: sys.argv
    except SIGTERMException:
        # Lightning stops at the next step, saves (ModelCheckpoint and EncoderExport's on_exception) and raises
        # this SystemExit with no status, i.e. 0; a scheduler must see that the job did not finish.
        print("selfsup3d: stopped by SIGTERM after saving; resume with --ckpt_path last", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


__all__ = ["DESCRIPTION", "TOOL_VERBS", "SelfSup3DCLI", "main"]
