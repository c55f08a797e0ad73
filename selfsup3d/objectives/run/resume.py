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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from selfsup3d.datamodules.resumable import stream_seed
from selfsup3d.encoders.teacher import FrozenTeacher
from selfsup3d.errors import CheckpointMismatchError

RUN_STATE_KEY = "selfsup3d_run_state"
"""Where checkpoints keep an objective's run state (``run_state``)."""


def teacher_prefixes(module: nn.Module, reproducible_only: bool) -> list[str]:
    """State-dict prefixes (``name.``) of the frozen teachers inside ``module``."""
    return [
        f"{name}."
        for name, sub in module.named_modules()
        if isinstance(sub, FrozenTeacher) and (sub.reproducible or not reproducible_only)
    ]


class ResumeMixin:
    """Seeding, run state and checkpoint keys of the module docstring. Reads the module's ``run_state``
    (``seed``: the run's seed, set at set-up)."""

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed the random generators (all devices) from the run seed, rank, epoch and batch: what a step draws
        (masks, rays, dropout) is a function of where it is in the run, so a resumed run draws the same."""
        seed = self.run_state["seed"]
        seed = stream_seed("step", 0 if seed is None else seed, self.global_rank, self.current_epoch, batch_idx)
        torch.manual_seed(seed)

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
        rebuilt from their source may be absent); take the run state back."""
        self.run_state.update(checkpoint.get(RUN_STATE_KEY, {}))
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
