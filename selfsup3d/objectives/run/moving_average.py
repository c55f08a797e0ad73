"""Moving averages of the encoder (:class:`MovingAverageMixin`).

With ``ema_decay``, a run keeps an exponential moving average of the encoder's weights (``ema_encoder``; the heads
and frozen teachers stay out of it), updated after every optimiser step and saved in checkpoints; validation,
testing and the exported encoder use it, training the raw weights. Moving-average teachers
(:func:`~selfsup3d.encoders.teacher.build_teacher` with ``ema``) follow the encoder the same way, with their own
decay.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from selfsup3d.encoders.base import Encoder
from selfsup3d.encoders.teacher import FrozenTeacher


class MovingAverageMixin:
    """The moving averages of the module docstring. Reads the module's ``encoder``, ``ema_encoder`` (``None``
    without ``ema_decay``) and ``recipe``."""

    def encoder_for(self, stage: str) -> Encoder:
        """The encoder a ``stage`` runs: the raw one in training, the moving average (when on) otherwise."""
        return self.encoder if stage == "train" or self.ema_encoder is None else self.ema_encoder

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights for export (timm key schema for ViTEncoder): the moving average when on."""
        return (self.ema_encoder or self.encoder).export_state_dict()

    @torch.no_grad()
    def update_ema(self) -> None:
        """One step of the moving averages of the encoder: ``ema = decay * ema + (1 - decay) * weights`` (buffers
        are copied), for ``ema_encoder`` and for every moving-average teacher (``teacher: ema``) of the components."""
        ema_decay = self.recipe.ema_decay
        averages = [] if self.ema_encoder is None or ema_decay is None else [(self.ema_encoder, ema_decay)]
        averages += [
            (m.encoder, m.momentum) for m in self.modules() if isinstance(m, FrozenTeacher) and m.momentum is not None
        ]
        for average, decay in averages:
            ema = [p for p in average.parameters() if p.is_floating_point()]
            raw = [p.detach() for p in self.encoder.parameters() if p.is_floating_point()]
            torch._foreach_lerp_(ema, raw, 1.0 - decay)
            for mine, theirs in zip(average.buffers(), self.encoder.buffers(), strict=True):
                mine.copy_(theirs)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's step, then the moving average of the encoder follows (before any callback saves)."""
        super().optimizer_step(*args, **kwargs)
        self.update_ema()
