"""Several objectives, one encoder, one run: :class:`MultiTask`.

Each objective is a :class:`~selfsup3d.objectives.PretrainObjective` that could be fitted alone; here they are
built over one shared encoder and trained together::

    loss = Σ_name weight[name] · objective[name].step(batch[source[name]], stage, encoder)["loss"]

* The encoder is stored once (a checkpoint has one ``encoder.*`` copy); the objectives keep their heads, their
  frozen teachers (left out of checkpoints when they can be rebuilt) and their losses, under
  ``objectives.<name>.*``. Objectives that name the same teacher share one frozen copy
  (:func:`~selfsup3d.encoders.teacher.sharing_teachers`), held under each of their names.
* Each objective reads one named data source of a :class:`~selfsup3d.datamodules.CombinedShards` datamodule
  (``sources``), or the only source of a plain datamodule. A multi-view source feeds an objective that reads
  single images as its views (``image_views`` of each scene).
* Logged: ``train/<name>/<metric>`` and ``val/<name>/<metric>`` for every objective, and ``train/loss`` (the
  weighted sum that is optimised).
* The run's recipe (AdamW betas, schedule, layer decay, spike and non-finite guards, ``compile``, the moving
  average, ``init_encoder_from``: :data:`~selfsup3d.objectives.run.recipe.RECIPE_ARGUMENTS`) is this module's;
  an objective refuses one set on it, naming the key and the one to set instead, and carries none of the run's
  state. Each objective keeps its ``lr`` (its heads' peak learning rate) and ``weight_decay``.
* An objective whose source has no batch in a step (``max_size`` mode) adds a zero-weighted term of its
  parameters, so every head takes part in every step and DDP never waits for a gradient.

In YAML the objectives are given without their encoder (it is this module's), by ``class_path`` alone::

    model:
      class_path: selfsup3d.objectives.MultiTask
      init_args:
        encoder: {class_path: selfsup3d.encoders.ViTEncoder, init_args: {...}}
        objectives:
          masked_view: {class_path: selfsup3d.objectives.MaskedViewPrediction, init_args: {...}}
          triplane: {class_path: selfsup3d.objectives.TriplaneReconstruction, init_args: {...}}
        weights: {masked_view: 1.0, triplane: 0.5}
        sources: {masked_view: scenes, triplane: scenes}
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn

from selfsup3d.datamodules.spec import DataSpec
from selfsup3d.datamodules.views import batch_size
from selfsup3d.encoders.base import Encoder
from selfsup3d.encoders.teacher import sharing_teachers
from selfsup3d.errors import ConfigError, config_prefix, require
from selfsup3d.objectives.base import PretrainObjective
from selfsup3d.objectives.run.recipe import building_components

ObjectiveFactory = Callable[[Encoder], PretrainObjective]
"""An objective without its encoder: in YAML, a ``class_path`` with ``init_args`` (``encoder`` left out)."""


@contextmanager
def _own_hyperparameters() -> Iterator[None]:
    """Objectives built inside this module's constructor record their own arguments: LightningCLI hands the
    enclosing module's configuration to ``save_hyperparameters`` through a context variable, which must not
    leak into the components."""
    token = _given_hyperparameters.set(None)
    try:
        yield
    finally:
        _given_hyperparameters.reset(token)


class MultiTask(PretrainObjective):
    """Objectives trained together over one shared encoder (see the module docstring).

    Args:
        encoder: the shared encoder.
        objectives: the objectives by name, each built with this module's encoder.
        weights: loss weight per objective name (default 1 each).
        sources: the data source each objective reads, by objective name (a source name of the
            datamodule's ``sources``); ``null`` when the datamodule has a single source.
        image_views: how many views of each scene an objective that reads single images takes from a
            multi-view source (``null``: all).
        **kwargs: the run's recipe: the optimisation and fine-tuning arguments of
            :class:`~selfsup3d.objectives.PretrainObjective`.
    """

    def __init__(
        self,
        encoder: Encoder,
        objectives: dict[str, ObjectiveFactory],
        weights: dict[str, float] | None = None,
        sources: dict[str, str] | None = None,
        image_views: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(encoder, **kwargs)
        if not objectives:
            raise ConfigError(f"{self.key('objectives')} is empty: name at least one objective")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(objectives))
        if unknown:
            raise ConfigError(
                f"{self.key('weights')} names no objective: {', '.join(unknown)} (objectives: {', '.join(objectives)})"
            )
        require(all(w >= 0 for w in weights.values()), self.key("weights"), ">= 0", weights)
        unknown = sorted(set(sources or {}) - set(objectives))
        if unknown:
            raise ConfigError(f"{self.key('sources')} names no objective: {', '.join(unknown)}")
        require(image_views is None or image_views >= 1, self.key("image_views"), ">= 1 or null", image_views)
        built: dict[str, PretrainObjective] = {}
        with sharing_teachers():  # objectives that name the same teacher hold one frozen copy
            for name, factory in objectives.items():
                prefix = f"{self.key('objectives')}.{name}.init_args"
                with _own_hyperparameters(), config_prefix(prefix), building_components(self.key_prefix):
                    component = factory(encoder)
                require(
                    isinstance(component, PretrainObjective),
                    f"{self.key('objectives')}.{name}",
                    "a PretrainObjective",
                    type(component),
                )
                if component.encoder is not encoder:
                    raise ConfigError(
                        f"{self.key('objectives')}.{name} was built with another encoder than the shared one"
                    )
                if component.recipe is not None:  # built before, as a run of its own
                    raise ConfigError(
                        f"{self.key('objectives')}.{name} was built outside the multi-task module: give a factory "
                        "that builds it (a class_path, or functools.partial in Python)"
                    )
                del component.encoder  # the encoder is this module's: stored, moved and optimised once
                built[name] = component
        for component in built.values():
            with config_prefix(component.key_prefix):
                component.bind(built)
        self.objectives = nn.ModuleDict(built)
        self.weights = {name: float(weights.get(name, 1.0)) for name in objectives}
        self.sources = dict(sources or {})
        self.image_views = image_views
        self._routes: dict[str, str | None] = {}

    # ------------------------------------------------------------------ components and data
    def components(self) -> Iterator[tuple[str, PretrainObjective]]:
        yield from self.objectives.items()  # type: ignore[misc]

    def configure_data(self, specs: Mapping[str, DataSpec]) -> None:
        """Route each objective to its source and run its start-up checks on that source's spec."""
        if not specs:
            self._routes = dict.fromkeys(self.objectives)
            return
        for name, component in self.components():
            source = self.sources.get(name)
            if source is None:
                if len(specs) > 1:
                    raise ConfigError(
                        f"the datamodule has {len(specs)} sources ({', '.join(specs)}): name the one objective "
                        f"{name!r} reads in {self.key('sources')}"
                    )
                source = next(iter(specs))
            elif source not in specs:
                raise ConfigError(
                    f"{self.key('sources')}.{name}={source!r} is not a source of the datamodule ({', '.join(specs)})"
                )
            self._routes[name] = source
            with config_prefix(f"{self.key('objectives')}.{name}.init_args"):
                component.data_spec = component.adapt_spec(specs[source])
                component.check_cameras(component.data_spec)
                component.check_data(component.data_spec)
                component.check_image_size(component.data_spec, self.encoder)
        unused = sorted(set(specs) - set(self._routes.values()))
        if unused:
            raise ConfigError(f"no objective reads the data source(s) {', '.join(unused)} (see {self.key('sources')})")

    def source_of(self, name: str) -> str | None:
        """The data source objective ``name`` reads (after set-up; ``None`` for a datamodule without specs)."""
        return self._routes.get(name)

    def _route(self, batch: Any) -> dict[str, Any]:
        """``{objective name: its batch or None}`` from a ``{source: batch}`` dict or a single source's batch."""
        routes = self._routes or dict.fromkeys(self.objectives)
        named = set(r for r in routes.values() if r is not None)
        if isinstance(batch, Mapping) and named and set(batch) <= named:
            return {name: batch.get(source) for name, source in routes.items()}
        return dict.fromkeys(routes, batch)

    # ------------------------------------------------------------------ steps
    def step(self, batch: Any, stage: str, encoder: Encoder) -> dict[str, Any]:
        """Every objective's step on its source's batch; ``loss`` is the weighted sum of their losses."""
        total: Tensor | float = 0.0
        out: dict[str, Any] = {}
        for name, part in self._route(batch).items():
            component = self.objectives[name]
            if part is None:
                if stage == "train":  # every head takes part in every step (DDP)
                    total = total + sum(p.sum() * 0.0 for p in component.parameters() if p.requires_grad)
                continue
            result = component.step(component.adapt_batch(part, self.image_views), stage, encoder)
            total = total + self.weights[name] * result["loss"]
            out[name] = result
        out["loss"] = total
        return out

    def _run(self, batch: Any, stage: str) -> dict[str, Any]:
        out = self.step(batch, stage, self.encoder_for(stage))
        routed = self._route(batch)
        for name, result in out.items():
            if isinstance(result, Mapping):
                self.log_scalars(stage, result, batch_size(routed[name]), prefix=f"{name}/")
        if stage == "train":
            self.log_scalars(stage, {"loss": out["loss"]}, batch_size(next(iter(routed.values()))))
        return out

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Before the key check: checkpoints of runs whose objectives still carried the gradient-spike state hold
        it, unused, under each objective's name (``objectives.<name>._grad_norm_ema``/``skipped_steps``); dropped."""
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.count(".") == 2 and k.startswith("objectives.")]:
            if key.rsplit(".", 1)[1] in ("_grad_norm_ema", "skipped_steps"):
                del state[key]
        super().on_load_checkpoint(checkpoint)

    # ------------------------------------------------------------------ the objectives see the trainer
    @property
    def trainer(self) -> Any:
        return PretrainObjective.trainer.fget(self)  # type: ignore[attr-defined]

    @trainer.setter
    def trainer(self, trainer: Any) -> None:
        PretrainObjective.trainer.fset(self, trainer)  # type: ignore[attr-defined]
        for component in self.objectives.values():
            component.trainer = trainer  # global_step, current_epoch, device hooks as when fitted alone
