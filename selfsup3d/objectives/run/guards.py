"""Steps a run skips instead of training on (:class:`StepGuardsMixin`).

* A step whose loss is NaN or infinite (on any rank: all ranks then skip it together) trains on a zero loss over
  every trainable parameter, so the backward (and DDP's gradient reduction) runs as usual with zero gradients,
  which are then dropped: nothing moves. Counted in the run state (``train/skipped_nonfinite``);
  ``max_nonfinite_steps`` in a row stop the run with :class:`~selfsup3d.errors.NonFiniteLossError`.
* With ``grad_spike_factor``, a step whose unclipped gradient norm is not finite or exceeds that many times its
  running mean (after ``grad_spike_warmup`` steps) is dropped and counted (``train/skipped_steps``); neither kind
  of skipped step moves the running mean.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from selfsup3d.errors import NonFiniteLossError


def drop_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Skip an optimiser step: AdamW leaves parameters without gradient untouched (no decay, no momentum)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def detach_outputs(out: dict[str, Any]) -> dict[str, Any]:
    """A training step's outputs for callbacks: every tensor but the ``loss`` detached."""

    def detach(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.detach()
        if isinstance(value, dict):
            return {k: detach(v) for k, v in value.items()}
        return value

    return {k: (v if k == "loss" else detach(v)) for k, v in out.items()}


class StepGuardsMixin:
    """The step guards of the module docstring. Reads the module's ``recipe``, ``run_state`` (its non-finite
    counters) and the buffers ``_grad_norm_ema`` (running mean of the gradient norm) and ``skipped_steps``."""

    def skip_nonfinite(self, out: dict[str, Any]) -> dict[str, Any]:
        """``out`` of a training step, its ``loss`` replaced by a zero loss when it is not finite."""
        if not self._loss_is_finite(out["loss"]):
            # a zero loss over every trainable parameter: the backward (and DDP's gradient reduction) runs as
            # usual with zero gradients, which on_before_optimizer_step then drops, so nothing moves
            self._skip_step = True
            out["loss"] = sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
        return out

    def _loss_is_finite(self, loss: Any) -> bool:
        """Count a non-finite loss (on any rank: all ranks then skip the step together) and stop after
        ``max_nonfinite_steps`` in a row."""
        finite = bool(torch.isfinite(loss).all()) if isinstance(loss, Tensor) else math.isfinite(float(loss))
        if self._trainer is not None:
            finite = bool(self.trainer.strategy.reduce_boolean_decision(finite, all=True))
        state = self.run_state
        if finite:
            state["nonfinite_streak"] = 0
        else:
            state["nonfinite_total"] += 1
            state["nonfinite_streak"] += 1
        if self._trainer is not None:
            self.log("train/skipped_nonfinite", float(state["nonfinite_total"]), on_step=True, on_epoch=False)
        if state["nonfinite_streak"] >= self.recipe.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"the loss was NaN or infinite in {state['nonfinite_streak']} steps in a row (global step "
                f"{self.global_step}; {state['nonfinite_total']} in all): the run stopped instead of training on. "
                "Usual causes: a learning rate too high (model.init_args.lr), bf16/fp16 overflow "
                "(trainer.precision), broken data; the last good weights are in the checkpoint"
            )
        return finite

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip the step after a non-finite loss, or when the (unclipped) gradient norm spikes; neither moves the
        running mean of the norm."""
        if self._skip_step:
            self._skip_step = False
            drop_gradients(optimizer)
            return
        factor = self.recipe.grad_spike_factor
        if factor is None:
            return
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        ema = self._grad_norm_ema
        warm = self.global_step >= self.recipe.grad_spike_warmup and ema > 0
        spike = (not torch.isfinite(norm)) or bool(warm and norm > factor * ema)
        if spike:
            drop_gradients(optimizer)
            self.skipped_steps += 1
        else:
            ema.copy_(norm if ema == 0 else 0.99 * ema + 0.01 * norm)
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        self.log("train/skipped_steps", self.skipped_steps.float(), on_step=True, on_epoch=False)
