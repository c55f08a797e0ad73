"""Exact resume and checkpoints that hold what a run needs (:class:`ResumeMixin`).

* The random generators are seeded at every training batch from ``(run seed, rank, epoch, batch)``: what a step
  draws (masks, rays, dropout) is a function of where it is in the run, so a resumed run draws what the
  uninterrupted run would have (the data streams resume on their own, see
  :mod:`selfsup3d.datamodules.resumable`).
* The run state (:attr:`run_state`: the run seed, the non-finite counters) is saved beside the weights, under
  :data:`RUN_STATE_KEY`.
* Frozen teachers (:class:`~selfsup3d.encoders.FrozenTeacher`) that can be rebuilt from their source are left out
  of checkpoints and keep their rebuilt weights on load; a checkpoint's keys are checked before loading, naming
  what is missing or unexpected.
* Lightning's loop counters are made to say where the run stopped, whatever stopped it
  (:func:`continue_stopped_epoch`, :meth:`ResumeMixin.align_logging_step`): an epoch ended early by
  ``trainer.should_stop`` (``max_time``, early stopping, a callback, ``max_steps``) is continued, not counted as
  finished, and the logging step after a resume is the optimiser step, however the checkpoint was written.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from selfsup3d.datamodules.resumable import stream_seed
from selfsup3d.encoders.teacher import FrozenTeacher
from selfsup3d.errors import CheckpointMismatchError

RUN_STATE_KEY = "selfsup3d_run_state"
"""Where checkpoints keep an objective's run state (``run_state``)."""


def continue_stopped_epoch(checkpoint: dict[str, Any]) -> bool:
    """Restore an epoch that ``trainer.should_stop`` ended early as unfinished; return whether one was.

    When a run stops mid-epoch (``max_time``, early stopping, a callback setting ``should_stop``, ``max_steps``),
    Lightning's fit loop ends the epoch as if it were over (``on_train_epoch_end`` runs, the epoch counts as
    processed and completed) and saves that. On resume it would start the *next* epoch, but with the stopped
    epoch's batch count carried into it (iteration-based runs keep ``batch_progress.current``): every later
    batch had another ``current_epoch`` than in the uninterrupted run (per-batch seeds, epoch-based schedules and
    checks), and the progress bar read ``Epoch 1 20/10``, while the resumable data streams (which save their own
    position) continued the stopped epoch. Here the saved epoch counters are put back to "started, not
    processed" (Lightning's mid-epoch restart): the loop continues the stopped epoch where the streams do.

    Only for checkpoints that hold the training loaders' positions (stateful loaders, such as
    :class:`~selfsup3d.datamodules.resumable.ResumableLoader`): a loader that cannot resume mid-epoch starts
    over, and Lightning's own handling applies.
    """
    fit = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = fit.get("epoch_progress"), fit.get("epoch_loop.batch_progress")
    if not fit.get("state_dict", {}).get("combined_loader") or not epochs or not batches:
        return False
    current = epochs["current"]
    stopped = (
        not batches.get("is_last_batch", True)  # the epoch's last batch was not reached
        and batches["current"]["ready"] > 0
        and current["started"] > 0
        and current["processed"] == current["started"]  # yet the fit loop ended the epoch
    )
    if stopped:
        for progress in (epochs["total"], epochs["current"]):
            progress["processed"] = progress["completed"] = progress["started"] - 1
    return stopped


def resolve_class(class_path: str) -> type | None:
    """The class a ``module.Name`` path names, or ``None`` when it cannot be imported."""
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError, ValueError):
        return None
    return found if isinstance(found, type) else None


def configured_components(objectives: Any) -> dict[str, str] | None:
    """``{name: class path}`` of a multi-task module's ``objectives`` as configured or saved (``{name: {class_path,
    init_args}}``, dicts or jsonargparse namespaces), or ``None`` when there is no such mapping."""
    if hasattr(objectives, "as_dict"):  # a jsonargparse Namespace
        objectives = objectives.as_dict()
    if not isinstance(objectives, Mapping) or not objectives:
        return None
    found = {str(name): getattr(spec, "get", lambda _: None)("class_path") for name, spec in objectives.items()}
    return found if all(isinstance(path, str) for path in found.values()) else None  # type: ignore[return-value]


def _same_class(saved: str, cls: type | str) -> bool:
    if isinstance(cls, str):
        resolved = resolve_class(cls)
        if resolved is None:
            return saved.rpartition(".")[2] == cls.rpartition(".")[2]
        cls = resolved
    found = resolve_class(saved)
    return found is cls if found is not None else saved.rpartition(".")[2] == cls.__name__


def _describe(class_path: str, components: Mapping[str, str] | None) -> str:
    name = class_path.rpartition(".")[2]
    if not components:
        return name
    parts = ", ".join(f"{k}: {components[k].rpartition('.')[2]}" for k in sorted(components))
    return f"{name}({parts})"


class Foreign(NamedTuple):
    """A checkpoint of another objective than the config's: both described in words, and the config key that
    differs."""

    theirs: str
    ours: str
    key: str


def foreign_objective(
    checkpoint: Mapping[str, Any], cls: type, components: Mapping[str, str] | None = None
) -> Foreign | None:
    """The checkpoint's objective and the config's (:class:`Foreign`) when the objective that wrote
    ``checkpoint`` (its ``_class_path`` hyper-parameter, written by the CLI and by every objective) is not ``cls``
    or, for a multi-task module, its objectives (``{name: class path}``, from its ``objectives`` hyper-parameter)
    are not ``components``; ``None`` when they are, or when the checkpoint does not say."""
    hparams = checkpoint.get("hyper_parameters")
    saved = hparams.get("_class_path") if isinstance(hparams, Mapping) else None
    if not isinstance(saved, str) or not saved:
        return None
    ours = f"{cls.__module__}.{cls.__qualname__}"
    if not _same_class(saved, cls):
        if saved.rpartition(".")[2] == cls.__name__:  # alike by name: say the full paths
            return Foreign(saved, ours, "model.class_path")
        return Foreign(_describe(saved, None), _describe(ours, None), "model.class_path")
    theirs = configured_components(hparams.get("objectives"))
    if theirs is None or components is None:
        return None
    same = set(theirs) == set(components) and all(_same_class(theirs[k], components[k]) for k in theirs)
    return (
        None if same else Foreign(_describe(saved, theirs), _describe(ours, components), "model.init_args.objectives")
    )


def foreign_checkpoint_message(path: Any, found: Foreign) -> str:
    """One line: ``--ckpt_path`` names a checkpoint of another objective than the config's (``found``: what
    :func:`foreign_objective` says), and what to do."""
    theirs, ours = found.theirs, found.ours
    return (
        f"--ckpt_path {path} is a checkpoint of {theirs}, but the config trains {ours} ({found.key}): "
        f"--ckpt_path continues or evaluates a run of the same objective; to start {ours.partition('(')[0]} from "
        f"that run's encoder, set model.init_args.init_encoder_from: {path} instead"
    )


def teacher_prefixes(module: nn.Module, reproducible_only: bool) -> list[str]:
    """State-dict prefixes (``name.``) of the frozen teachers inside ``module``, under every name a shared one has."""
    return [
        f"{name}."
        for name, sub in module.named_modules(remove_duplicate=False)
        if isinstance(sub, FrozenTeacher) and (sub.reproducible or not reproducible_only)
    ]


class ResumeMixin:
    """Seeding, run state and checkpoint keys of the module docstring. Reads the module's ``run_state``
    (``seed``: the run's seed, set at set-up)."""

    _logging_step_to_align = False

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed the random generators (all devices) from the run seed, rank, epoch and batch: what a step draws
        (masks, rays, dropout) is a function of where it is in the run, so a resumed run draws the same."""
        if self._logging_step_to_align:
            self.align_logging_step()
        seed = self.run_state["seed"]
        seed = stream_seed("step", 0 if seed is None else seed, self.global_rank, self.current_epoch, batch_idx)
        torch.manual_seed(seed)

    def align_logging_step(self) -> None:
        """Log the first batch after a restore at the step the uninterrupted run logs it at.

        Lightning logs a step at ``fit_loop.epoch_loop._batches_that_stepped``, the number of batches that made
        an optimiser step so far, which equals ``global_step`` at every batch start (automatic optimisation,
        with or without gradient accumulation). It does not save the count as of the restart point but
        adjusts the saved one on restore by a guess of where the checkpoint was written (one added unless it
        was written after a whole batch), which is one off after a stop between steps (Ctrl-C or a crash once
        the next batch was fetched) or after a stop saved at a validation's end: every later step was logged
        one step late. Called at the first batch after a restore, when that adjustment is done.
        """
        self._logging_step_to_align = False
        if self.automatic_optimization:
            self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.trainer.global_step

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The module's state without the frozen teachers that can be rebuilt from their source."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        drop = tuple(f"{prefix}{p}" for p in teacher_prefixes(self, reproducible_only=True))
        for key in [k for k in state if drop and k.startswith(drop)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load strictly; rebuilt teachers keep their own weights when the state has none for them."""
        own = super().state_dict(keep_vars=True)
        for prefix in teacher_prefixes(self, reproducible_only=True):
            if not any(k.startswith(prefix) for k in state_dict):
                state_dict = {**state_dict, **{k: v for k, v in own.items() if k.startswith(prefix)}}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The run state (seed, non-finite counters) beside the weights."""
        checkpoint[RUN_STATE_KEY] = dict(self.run_state)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint's keys before loading, naming what is missing or unexpected (teachers that are
        rebuilt from their source may be absent); take the run state back; make the loop counters say where the
        run stopped (:func:`continue_stopped_epoch`, :meth:`align_logging_step`)."""
        mine = {name: f"{type(c).__module__}.{type(c).__qualname__}" for name, c in self.components() if name}
        found = foreign_objective(checkpoint, type(self), mine or None)
        if found is not None:
            path = getattr(self._trainer, "ckpt_path", None) or "(the checkpoint)"
            raise CheckpointMismatchError(foreign_checkpoint_message(path, found))
        self.run_state.update(checkpoint.get(RUN_STATE_KEY, {}))
        continue_stopped_epoch(checkpoint)
        self._logging_step_to_align = True
        saved = set(checkpoint.get("state_dict", {}))
        expected = set(self.state_dict())
        rebuilt = tuple(teacher_prefixes(self, reproducible_only=True))
        missing = sorted(expected - saved)
        unexpected = sorted(k for k in saved - expected if not (rebuilt and k.startswith(rebuilt)))
        if missing or unexpected:
            parts = [f"the checkpoint does not match {type(self).__name__}"]
            if missing:
                parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:10])}")
            if unexpected:
                parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}")
            raise CheckpointMismatchError("; ".join(parts))
