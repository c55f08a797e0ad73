"""``selfsup3d fit|validate|test|predict``: selfsup3d's LightningCLI (:class:`SelfSup3DCLI`).

Any objective is a ``class_path`` (``subclass_mode_model``): a new one needs no registry entry. The entry point
that dispatches the tool verbs first is :func:`selfsup3d.cli.main`.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

# Lightning 2.6 still calls jsonargparse APIs that 4.49+ deprecates; the warnings are not actionable by users.
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

import selfsup3d.callbacks  # noqa: F401  (short class names in YAML resolve for imported classes)
import selfsup3d.datamodules  # noqa: F401
import selfsup3d.objectives  # noqa: F401
from selfsup3d.callbacks import EncoderExport, LearningRates, StepBoundaryRequeue
from selfsup3d.callbacks.progress import default_progress_bar
from selfsup3d.checkpoint_io import check_checkpoint, install_atomic_io
from selfsup3d.cli.overrides import route_callback_arguments
from selfsup3d.cli.usage import ConciseArgumentParser
from selfsup3d.datamodules import SkippedSamplesLogger
from selfsup3d.errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    ConfigError,
    NonFiniteLossError,
    WeightsFileError,
    WeightsUnavailableError,
)
from selfsup3d.objectives.base import PretrainObjective
from selfsup3d.objectives.run.resume import (
    configured_components,
    foreign_checkpoint_message,
    foreign_objective,
    resolve_class,
)

DESCRIPTION = "selfsup3d: 3D-aware self-supervised pretraining of vision encoders."
"""The parser's description; :func:`selfsup3d.cli.main` adds the tool verbs."""

# Errors a user causes; the CLI reports the outermost one in a chain in one line, without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    CheckpointMismatchError,
    WeightsFileError,
    WeightsUnavailableError,
    FileNotFoundError,
    CheckpointCorruptError,
)

# Errors of a run that went wrong (not of its configuration): one line, exit status 1.
RUN_ERRORS: tuple[type[BaseException], ...] = (CheckpointCorruptError, NonFiniteLossError)


class ConfigLoggingSaveConfig(SaveConfigCallback):
    """Writes ``config.yaml`` to the log directory (Lightning's behaviour) and also shows it in TensorBoard; an
    evaluation logged into the run it evaluates leaves the run's ``config.yaml`` (its training config) as it is."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" and trainer.log_dir and (Path(trainer.log_dir) / self.config_filename).is_file():
            return
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if isinstance(trainer.logger, TensorBoardLogger):
            text = self.parser.dump(self.config)
            trainer.logger.experiment.add_text("config", "```yaml\n" + text + "\n```", global_step=0)


class SelfSup3DCLI(LightningCLI):
    """LightningCLI with selfsup3d's defaults: any objective and datamodule by ``class_path``; the callbacks
    every run has, each in its own section: ``--checkpoint.*`` (``save_last`` and ``save_on_exception`` on, so
    an interrupted run loses nothing and ``--ckpt_path last`` resumes it), ``--export.*`` (the encoder as
    ``encoder.safetensors`` next to the logs), ``--lr_monitor.*`` (learning rates in TensorBoard),
    ``--skipped_samples.*`` (counts of skipped bad samples); a pinned seed, the config saved next to the logs,
    and configuration errors reported as usage errors."""

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
            "parser_kwargs": {"description": DESCRIPTION, "prog": prog()},
            "parser_class": ConciseArgumentParser,  # usage errors in two lines, not a page of usage
        }
        defaults.update(kwargs)
        super().__init__(args=args, run=run, **defaults)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # callbacks every run has, each configurable in its own section (written once, not in every config)
        parser.add_lightning_class_args(EncoderExport, "export")
        parser.add_lightning_class_args(LearningRates, "lr_monitor")
        parser.add_lightning_class_args(SkippedSamplesLogger, "skipped_samples")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(StepBoundaryRequeue, "requeue")  # inert without SLURM's auto-requeue
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.save_on_exception": True,  # Ctrl-C or a crash still leaves last.ckpt
                "checkpoint.filename": "step{step:08d}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.save_top_k": -1,
            }
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Lightning's parsing, after routing ``--trainer.callbacks.init_args.KEY VALUE`` to the configured
        callback that takes ``KEY`` (see :mod:`selfsup3d.cli.overrides`)."""
        if args is None or isinstance(args, (list, tuple)):
            argv = list(sys.argv[1:] if args is None else args)
            routed = route_callback_arguments(argv, parser.parse_args, parser.error, parser.parser_mode)
            if routed != argv:  # (parsed here: Lightning would warn that args and sys.argv differ)
                self.config = parser.parse_args(routed)
                return
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        """``--ckpt_path last`` means the newest run of this config, and an evaluated run's checkpoint is evaluated
        in that run.

        Lightning looks for ``last.ckpt`` in the *current* run's checkpoint folder, which is a fresh
        ``version_N`` for every launch, so a plain ``--ckpt_path last`` would find nothing. Here the newest run
        under the same logger folder that has a ``last.ckpt`` is found: ``fit`` pins the logger to its version
        (logs, checkpoints and the saved config continue where they were); ``validate``, ``test`` and
        ``predict`` evaluate that file. They log into the run whose checkpoint they evaluate (any checkpoint of a
        run under the logger folder), beside its training curves, rather than into a new ``version_N`` that
        holds no checkpoint; the run's ``config.yaml`` stays the one it was trained with."""
        if self.subcommand not in ("fit", "validate", "test", "predict"):
            return
        cfg = self.config[self.subcommand]
        ckpt_path = cfg.get("ckpt_path")
        if not ckpt_path or cfg.get("checkpoint", {}).get("dirpath"):
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
        if ckpt_path != "last":
            run = Path(ckpt_path).resolve().parent.parent
            if (
                self.subcommand != "fit"
                and run.parent == runs.resolve()
                and Path(ckpt_path).parent.name == "checkpoints"
            ):
                self._pin_logger(cfg, logger, run.name)
            return
        found = sorted(runs.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            if self.subcommand != "fit":
                self._parser(self.subcommand).error(
                    f"--ckpt_path last: no run under {runs} has a checkpoints/last.ckpt"
                )
            return
        self._refuse_foreign_checkpoint(self.subcommand, found[-1])
        self._pin_logger(cfg, logger, found[-1].parent.parent.name)
        if self.subcommand != "fit":
            cfg.ckpt_path = str(found[-1])
            rank_zero_info(f"evaluating {found[-1]}")
            return
        rank_zero_info(f"resuming {found[-1]}")

    @staticmethod
    def _pin_logger(cfg: Namespace, logger: Namespace, folder: str) -> None:
        """Log into the run folder ``folder`` (``version_N``) of the logger folder."""
        # TensorBoardLogger names an integer version "version_N"; a string is used as the folder name as is
        number = re.fullmatch(r"version_(\d+)", folder)
        logger.init_args.version = int(number.group(1)) if number else folder
        cfg.trainer.logger = logger

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """Lightning's, with selfsup3d's progress bar (:func:`~selfsup3d.callbacks.default_progress_bar`) unless
        the bar is off or the configuration names one."""
        if config.get("enable_progress_bar", True) is not False:
            given = config.get("callbacks") or []
            given = given if isinstance(given, list) else [given]
            if not any(isinstance(c, ProgressBar) for c in [*given, *callbacks]):
                callbacks = [*callbacks, default_progress_bar()]
        trainer = super()._instantiate_trainer(config, callbacks)
        install_atomic_io(trainer.strategy)  # a killed write never leaves a last.ckpt that cannot load
        return trainer

    def _parse_ckpt_path(self) -> None:
        """Lightning's (it reads the checkpoint's hyper-parameters), after checking that the file is whole and that
        it is a checkpoint of the config's objective."""
        subcommand = self.config.get("subcommand")
        if subcommand:
            path = self.config[subcommand].get("ckpt_path")
            if path and Path(path).is_file():
                try:
                    check_checkpoint(path)
                except CheckpointCorruptError as err:
                    run_error(subcommand, err)
                self._refuse_foreign_checkpoint(subcommand, Path(path))
        super()._parse_ckpt_path()

    def _refuse_foreign_checkpoint(self, subcommand: str, path: Path) -> None:
        """A usage error when ``path`` was written by another objective than the config's ``model.class_path``
        (Lightning would rebuild the checkpoint's objective from its hyper-parameters in place of the config's,
        and train or evaluate it on the config's data)."""
        class_path = self.config[subcommand].get("model", {}).get("class_path")
        cls = resolve_class(class_path) if isinstance(class_path, str) else None
        if cls is None:
            return
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001  (a file that does not load is reported by Lightning's own loading)
            return
        init_args = self.config[subcommand].get("model", {}).get("init_args") or {}
        found = foreign_objective(checkpoint, cls, configured_components(init_args.get("objectives")))
        if found is not None:  # one line (a usage error's pointer to --help would not help), status 2
            run_error(subcommand, foreign_checkpoint_message(path, found), status=2)
        self._note_a_short_run(subcommand, path, checkpoint)

    def _note_a_short_run(self, subcommand: str, path: Path, checkpoint: Any) -> None:
        """An evaluation of a checkpoint written before the config's ``max_steps`` says so: a run that a clock
        (``max_time``), a signal or a callback stopped early gives the figures of a shorter run."""
        max_steps = (self.config[subcommand].get("trainer") or {}).get("max_steps")
        step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
        if subcommand == "fit" or not isinstance(step, int) or not isinstance(max_steps, int) or max_steps <= 0:
            return
        if step < max_steps:
            rank_zero_warn(
                f"{path} was written at step {step} of the config's max_steps {max_steps} (the run stopped early: "
                "max_time, a signal or a callback): these figures are those of a shorter run than the config's"
            )

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
            self._report_user_error(err, USER_ERRORS)

    def _run_subcommand(self, subcommand: str) -> None:
        logger = self.trainer.logger
        before = (
            set(Path(logger.root_dir).iterdir())
            if logger and logger.root_dir and Path(logger.root_dir).is_dir()
            else set()
        )
        try:
            super()._run_subcommand(subcommand)
        except BaseException as err:
            self._drop_unused_run_folder(before)
            if isinstance(err, ConfigError):
                self._report_user_error(err, (ConfigError,))
            if isinstance(err, RUN_ERRORS):
                run_error(subcommand, err)
            raise

    def _drop_unused_run_folder(self, before: set[Path]) -> None:
        """After a start that was refused (no optimiser step, no checkpoint), remove the ``version_N`` folder this
        launch made (it holds the saved config and an empty event file) and the logger folder when it made that
        too, so that refused starts leave no run folders behind."""
        logger = self.trainer.logger
        if logger is None or not logger.log_dir or self.trainer.global_step or not self.trainer.is_global_zero:
            return
        run, root = Path(logger.log_dir), Path(logger.root_dir)
        if run.is_dir() and run not in before and run.parent == root and not any(run.rglob("*.ckpt")):
            shutil.rmtree(run, ignore_errors=True)
            if not before and root.is_dir() and not any(root.iterdir()):
                root.rmdir()


def run_error(subcommand: str, err: BaseException | str, status: int = 1) -> NoReturn:
    """Report an error in one line and exit with ``status`` (1: a run's error, the checkpoint written on the way out
    stays; 2: a usage error that ``--help`` would not help with)."""
    print(f"{prog()} {subcommand}: error: {err}", file=sys.stderr)
    raise SystemExit(status)


def prog() -> str:
    """The script's name in messages: ``selfsup3d`` or ``lightning`` (also when called from Python)."""
    name = Path(sys.argv[0]).name
    return name if name in ("selfsup3d", "lightning") else "selfsup3d"
