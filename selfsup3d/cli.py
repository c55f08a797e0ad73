"""Command line: ``selfsup3d fit|validate|test|predict`` (LightningCLI) and the tool verbs.

The same entry point is installed as ``selfsup3d`` and as ``lightning``, so both of these work::

    lightning fit --config configs/masked_view.yaml
    selfsup3d fit --config configs/demo/masked_view.yaml --trainer.max_steps 100

Tool verbs, dispatched before LightningCLI parses anything::

    selfsup3d data render|convert|pseudo-depth ...   build WebDataset shards
    selfsup3d export CKPT --out encoder.safetensors  write the encoder of a checkpoint
    selfsup3d probe ENCODER... --data URLS           compare how 3D-aware encoders are

Any objective is a ``class_path`` (``subclass_mode_model``): a new one needs no registry entry.
"""

from __future__ import annotations

import importlib
import os
import sys

# Lightning 2.6 still calls jsonargparse APIs that 4.49+ deprecates; the warnings are not actionable by users.
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

import selfsup3d.callbacks  # noqa: F401  (short class names in YAML resolve for imported classes)
import selfsup3d.datamodules  # noqa: F401
import selfsup3d.objectives  # noqa: F401
from selfsup3d.errors import CheckpointMismatchError, ConfigError
from selfsup3d.objectives.base import PretrainObjective

# verb -> "module:function(argv) -> int | None"; imported only when used.
TOOL_VERBS: dict[str, tuple[str, str]] = {
    "data": ("selfsup3d.datamodules.commands:main", "build WebDataset shards: render, convert, pseudo-depth"),
    "export": ("selfsup3d.encoders.export:main", "write the encoder of a checkpoint as timm weights"),
    "probe": ("selfsup3d.eval.command:main", "compare how 3D-aware encoders are (correspondence, depth, pose, ...)"),
}

DESCRIPTION = "selfsup3d: 3D-aware self-supervised pretraining of vision encoders.\n\nTool verbs: " + "; ".join(
    f"`selfsup3d {verb} --help` ({what})" for verb, (_, what) in TOOL_VERBS.items()
)


class ConfigLoggingSaveConfig(SaveConfigCallback):
    """Writes ``config.yaml`` to the log directory (Lightning's behaviour) and also shows it in TensorBoard."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if isinstance(trainer.logger, TensorBoardLogger):
            text = self.parser.dump(self.config)
            trainer.logger.experiment.add_text("config", "```yaml\n" + text + "\n```", global_step=0)


class SelfSup3DCLI(LightningCLI):
    """LightningCLI with selfsup3d's defaults: any objective and datamodule by ``class_path``, a
    checkpoint section (``--checkpoint.*``; ``save_last`` and ``save_on_exception`` on, so an interrupted
    run loses nothing and ``--ckpt_path last`` resumes it), a pinned
    seed, the config saved next to the logs, and configuration errors reported as usage errors."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        defaults: dict[str, Any] = {
            "model_class": PretrainObjective,
            "datamodule_class": LightningDataModule,
            "subclass_mode_model": True,
            "subclass_mode_data": True,
            "save_config_callback": ConfigLoggingSaveConfig,
            "save_config_kwargs": {"overwrite": True},
            "seed_everything_default": 42,
            "auto_configure_optimizers": False,
            "parser_kwargs": {"description": DESCRIPTION},
        }
        defaults.update(kwargs)
        super().__init__(args=args, run=run, **defaults)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.save_on_exception": True,  # Ctrl-C or a crash still leaves last.ckpt
                "checkpoint.filename": "step{step:08d}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.save_top_k": -1,
            }
        )

    def before_instantiate_classes(self) -> None:
        """``fit --ckpt_path last`` continues the newest run in place.

        Lightning looks for ``last.ckpt`` in the *current* run's checkpoint folder, which is a fresh
        ``version_N`` for every launch, so a plain ``--ckpt_path last`` would start from scratch. Here the
        newest run under the same logger folder that has a ``last.ckpt`` is found and the logger is pinned
        to its version: logs, checkpoints and the saved config continue where they were."""
        if self.subcommand != "fit":
            return
        cfg = self.config["fit"]
        if cfg.get("ckpt_path") != "last" or cfg.get("checkpoint", {}).get("dirpath"):
            return
        logger = cfg.trainer.get("logger")
        root = cfg.trainer.get("default_root_dir") or os.getcwd()
        if logger is None or logger is True:
            logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(save_dir=root, name="lightning_logs", version=None),
            )
        if not isinstance(logger, Namespace) or "init_args" not in logger:
            return  # no logger, several loggers, or an unusual one: Lightning's own lookup applies
        args = logger.init_args
        if args.get("version") is not None or args.get("save_dir") is None:
            return
        runs = Path(args.save_dir) / (args.get("name") or "")
        found = sorted(runs.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if found:
            args.version = found[-1].parent.parent.name
            cfg.trainer.logger = logger
            rank_zero_info(f"resuming {found[-1]}")

    def _report_user_error(self, err: BaseException, kinds: tuple[type[BaseException], ...]) -> None:
        """Turn a user error raised while building or running the classes (jsonargparse wraps it) into a
        usage error that names the problem; anything else propagates with its traceback."""
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, kinds):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise err
        parser = self._parser(self.subcommand) if self.subcommand else self.parser
        parser.error(str(cause))

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            self._report_user_error(err, (ConfigError, CheckpointMismatchError, FileNotFoundError))

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except ConfigError as err:
            self._report_user_error(err, (ConfigError,))


def _load_verb(target: str) -> Callable[[list[str]], int | None]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of the ``selfsup3d`` and ``lightning`` scripts."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in TOOL_VERBS:
        return int(_load_verb(TOOL_VERBS[argv[0]][0])(argv[1:]) or 0)
    # TF32 matmuls on Ampere+; no effect on the CPU.
    torch.set_float32_matmul_precision("high")
    SelfSup3DCLI(args=args)  # None: LightningCLI reads sys.argv itself
    return 0


if __name__ == "__main__":
    sys.exit(main())
