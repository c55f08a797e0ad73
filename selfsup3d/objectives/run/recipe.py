"""The recipe of a run: the arguments that belong to the run as a whole, not to an objective's heads.

:class:`~selfsup3d.objectives.PretrainObjective` takes them (:data:`RECIPE_ARGUMENTS`), so an objective fitted
alone is a whole run: the optimiser's betas, the warm-up + cosine schedule, layer-wise learning-rate decay and the
encoder's learning-rate scale, the gradient-spike and non-finite guards, ``compile``, the moving average of the
encoder and ``init_encoder_from``. :class:`Recipe` holds them, checked once. Every objective keeps ``lr`` and
``weight_decay``: its heads' own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from selfsup3d.errors import ConfigError

RECIPE_ARGUMENTS: tuple[str, ...] = (
    "betas",
    "warmup_steps",
    "min_lr_ratio",
    "layer_decay",
    "encoder_lr_scale",
    "grad_spike_factor",
    "grad_spike_warmup",
    "init_encoder_from",
    "compile",
    "max_nonfinite_steps",
    "ema_decay",
)
"""The :class:`~selfsup3d.objectives.PretrainObjective` arguments that configure the run, not an objective."""


@dataclass(frozen=True)
class Recipe:
    """The recipe of a run (see :class:`~selfsup3d.objectives.PretrainObjective` for each argument)."""

    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 500
    min_lr_ratio: float = 0.01
    layer_decay: float | None = None
    encoder_lr_scale: float = 1.0
    grad_spike_factor: float | None = None
    grad_spike_warmup: int = 100
    compile: bool = False
    max_nonfinite_steps: int = 20
    ema_decay: float | None = None

    def check(self, key: Callable[[str], str]) -> None:
        """Refuse values out of range with a :class:`~selfsup3d.errors.ConfigError` naming ``key(argument)``."""
        if self.encoder_lr_scale <= 0:
            raise ConfigError(f"{key('encoder_lr_scale')} must be > 0, got {self.encoder_lr_scale}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"{key('layer_decay')} must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{key('min_lr_ratio')} must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_spike_factor is not None and self.grad_spike_factor <= 1:
            raise ConfigError(f"{key('grad_spike_factor')} must be > 1, got {self.grad_spike_factor}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{key('warmup_steps')} must be >= 0, got {self.warmup_steps}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ConfigError(f"{key('ema_decay')} must be in [0, 1) or null, got {self.ema_decay}")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"{key('max_nonfinite_steps')} must be >= 1, got {self.max_nonfinite_steps}")
