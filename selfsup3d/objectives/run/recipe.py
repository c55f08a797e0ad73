"""The recipe of a run: the arguments that belong to the run as a whole, not to an objective's heads.

:class:`~selfsup3d.objectives.PretrainObjective` takes them (:data:`RECIPE_ARGUMENTS`), so an objective fitted
alone is a whole run: the optimiser's betas, the warm-up + cosine schedule, layer-wise learning-rate decay and the
encoder's learning-rate scale, the gradient-spike and non-finite guards, ``compile``, the moving average of the
encoder and ``init_encoder_from``. :class:`Recipe` holds them, checked once. Every objective keeps ``lr`` and
``weight_decay``: its heads' own.

A component of a :class:`~selfsup3d.objectives.MultiTask` is not a run: the multi-task module's recipe applies to
all of it. Components are built inside :func:`building_components`; one that is given a recipe argument other than
its class's default refuses it (:func:`refuse_recipe_arguments`) instead of silently ignoring it, and carries none
of the run's state (guards, counters, moving average).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from selfsup3d.errors import ConfigError, config_key, require

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
        require(self.encoder_lr_scale > 0, key("encoder_lr_scale"), "> 0", self.encoder_lr_scale)
        require(
            self.layer_decay is None or 0 < self.layer_decay <= 1, key("layer_decay"), "in (0, 1]", self.layer_decay
        )
        require(0 <= self.min_lr_ratio <= 1, key("min_lr_ratio"), "in [0, 1]", self.min_lr_ratio)
        require(
            self.grad_spike_factor is None or self.grad_spike_factor > 1,
            key("grad_spike_factor"),
            "> 1",
            self.grad_spike_factor,
        )
        require(self.warmup_steps >= 0, key("warmup_steps"), ">= 0", self.warmup_steps)
        require(
            self.ema_decay is None or 0 <= self.ema_decay < 1, key("ema_decay"), "in [0, 1) or null", self.ema_decay
        )
        require(self.max_nonfinite_steps >= 1, key("max_nonfinite_steps"), ">= 1", self.max_nonfinite_steps)


_RUN_PREFIX: ContextVar[str | None] = ContextVar("selfsup3d_multitask_prefix", default=None)


@contextmanager
def building_components(run_prefix: str) -> Iterator[None]:
    """Objectives built inside this block are components of the multi-task module configured at ``run_prefix``
    (its YAML key prefix, e.g. ``model.init_args``)."""
    token = _RUN_PREFIX.set(run_prefix)
    try:
        yield
    finally:
        _RUN_PREFIX.reset(token)


def component_of() -> str | None:
    """The key prefix of the multi-task module whose component is being built now, or ``None``."""
    return _RUN_PREFIX.get()


def declared_default(cls: type, name: str) -> Any:
    """The default of the constructor argument ``name`` as ``cls`` declares it: that of the first ``__init__`` in
    its method resolution order that names it (an objective may declare its own, e.g. its paper's warm-up)."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        param = inspect.signature(init).parameters.get(name) if init is not None else None
        if param is not None and param.default is not inspect.Parameter.empty:
            return param.default
    raise TypeError(f"{cls.__name__} declares no default for {name}")


def refuse_recipe_arguments(cls: type, given: Mapping[str, Any], key: Callable[[str], str], run_prefix: str) -> None:
    """Raise a one-line :class:`~selfsup3d.errors.ConfigError` naming the first recipe argument in ``given`` (the
    values a component of class ``cls`` was built with) that differs from the default ``cls`` declares."""
    for name in RECIPE_ARGUMENTS:
        value, default = given[name], declared_default(cls, name)
        if _plain(value) != _plain(default):
            raise ConfigError(
                f"{key(name)}={value!r}: the objectives of a multi-task run share its recipe, which they cannot set; "
                f"set {config_key(name, prefix=run_prefix)} instead"
            )


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value
