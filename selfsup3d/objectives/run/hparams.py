"""Hyper-parameters as plain data: what ``load_from_checkpoint`` rebuilds an objective from.

Under LightningCLI the injected modules (the encoder, a multi-task run's objectives) arrive as their
``class_path``/``init_args`` config. When an objective is built in Python, injected modules that expose a
``config`` dict (like :class:`~selfsup3d.encoders.ViTEncoder`) and component factories
(``functools.partial(Class, **kwargs)``) are recorded the same way (:func:`save_plain_hyperparameters`);
checkpoints then hold no pickled modules and load with ``weights_only=True``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any

from lightning.pytorch import LightningModule
from torch import nn


def save_plain_hyperparameters(module: LightningModule) -> None:
    """``module.save_hyperparameters()`` for the constructor arguments of ``module``'s class (of the subclass
    too), as plain data (see the module docstring); an argument that cannot be is left out with a warning."""
    with warnings.catch_warnings():
        # injected modules are converted to their config just below
        warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
        module.save_hyperparameters()
    converted = False
    for key, value in list(module.hparams.items()):
        plain = as_config(value)
        if plain is not None:
            module.hparams[key] = plain
            converted = converted or plain is not value
        elif not is_plain(value):
            del module.hparams[key]
            warnings.warn(
                f"{key}={type(value).__name__} cannot be saved as plain data and is left out of the "
                f"hyper-parameters; pass {key}=... to load_from_checkpoint",
                stacklevel=3,
            )
    if converted and "_instantiator" not in module.hparams:
        cls = type(module)
        module.hparams["_class_path"] = f"{cls.__module__}.{cls.__qualname__}"
        module.hparams["_instantiator"] = "lightning.pytorch.cli.instantiate_module"


def is_plain(value: Any) -> bool:
    """Whether ``value`` is plain data (``None``, numbers, strings, and lists and string-keyed dicts of them)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def as_config(value: Any) -> Any:
    """``value`` as plain data: a module with a ``config`` dict, or ``functools.partial(Class, **kwargs)`` (a
    component factory), becomes ``{"class_path", "init_args"}``; containers are converted item by item.
    ``None`` when ``value`` cannot be expressed as plain data."""
    if is_plain(value):
        return value
    if isinstance(value, nn.Module) and isinstance(getattr(value, "config", None), Mapping):
        cls = type(value)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(value.config)}
    if isinstance(value, functools.partial) and isinstance(value.func, type) and not value.args:
        cls = value.func
        init = {k: as_config(v) for k, v in value.keywords.items()}
        if any(v is None and value.keywords[k] is not None for k, v in init.items()):
            return None
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init}
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        items = {k: as_config(v) for k, v in value.items()}
        return None if any(v is None and value[k] is not None for k, v in items.items()) else items
    return None
