"""The objective contract: what an objective's author writes, and what the base class does for it.

An objective is a :class:`PretrainObjective` subclass in its own file. It is a LightningModule, fitted alone with
``selfsup3d fit``, and the same class trains as one component of a :class:`~selfsup3d.objectives.MultiTask` over
a shared encoder. Its author writes:

* :attr:`~PretrainObjective.input_kind`: which batches its step reads, ``multi_view``, ``single_view`` (a
  multi-view source then gives it its views as images) or ``any``;
* ``__init__(self, encoder, <its typed arguments>, **kwargs)``: ``super().__init__(encoder, **kwargs)`` first,
  then its heads and losses; bad values raise :class:`~selfsup3d.errors.ConfigError` naming the YAML key
  (:meth:`~PretrainObjective.key`);
* :meth:`~PretrainObjective.step` ``(batch, stage, encoder) -> dict``: its losses computed with ``encoder`` (the
  argument: in a multi-task run it is the shared one); ``loss`` is optimised, every other scalar is logged as
  ``<stage>/<name>``, larger tensors go to callbacks;
* :meth:`~PretrainObjective.check_data` ``(spec)``: refuse, at start-up, data it cannot train on;
  :meth:`~PretrainObjective.needs_cameras`: whether (and by which setting) it reads the data's cameras, so that
  an unposed source (video, frame folders) is refused in one line before any step;
* when needed: :meth:`~PretrainObjective.bind` (find another component of a multi-task run),
  :meth:`~PretrainObjective.exports` (products besides the encoder), :meth:`~PretrainObjective.compile_targets`
  (the blocks ``compile: true`` compiles), :meth:`~PretrainObjective.encoder_input_size` (when it resizes the
  images it gives the encoder).

The rest is the run's, each part in its own module of :mod:`selfsup3d.objectives.run`: the recipe arguments
(:class:`~selfsup3d.objectives.run.recipe.Recipe`), AdamW parameter groups and the warm-up + cosine schedule
(:mod:`~selfsup3d.objectives.run.optimizer`), skipped steps for a non-finite loss or a spiking gradient norm
(:mod:`~selfsup3d.objectives.run.guards`), the encoder's moving average
(:mod:`~selfsup3d.objectives.run.moving_average`), per-batch seeding and checkpoint keys for exact resume
(:mod:`~selfsup3d.objectives.run.resume`), hyper-parameters as plain data (:mod:`~selfsup3d.objectives.run.hparams`).
In a multi-task run the recipe is the multi-task module's: a component refuses recipe arguments set on it and
carries none of the run's state. This module adds the data check at start-up (the datamodule's
:class:`~selfsup3d.datamodules.DataSpec` reaches :meth:`~PretrainObjective.check_data`, and images of another
size than the encoder's are said in a warning), the logging, fine-tuning (``init_encoder_from``) and export.

See ``README.md``, "Plugging in a new objective".
"""

from __future__ import annotations

import copy
import importlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from selfsup3d.datamodules.spec import DataSpec, data_specs
from selfsup3d.datamodules.views import batch_size, views_as_images
from selfsup3d.encoders.base import Encoder
from selfsup3d.encoders.teacher import FrozenTeacher
from selfsup3d.errors import ConfigError, config_key, current_prefix, require
from selfsup3d.objectives.run.guards import StepGuardsMixin, detach_outputs
from selfsup3d.objectives.run.hparams import save_plain_hyperparameters
from selfsup3d.objectives.run.moving_average import MovingAverageMixin
from selfsup3d.objectives.run.optimizer import OptimizerMixin
from selfsup3d.objectives.run.recipe import Recipe, component_of, refuse_recipe_arguments
from selfsup3d.objectives.run.resume import ResumeMixin

InputKind = Literal["multi_view", "single_view", "any"]


class PretrainObjective(ResumeMixin, StepGuardsMixin, MovingAverageMixin, OptimizerMixin, LightningModule):
    """Base class of selfsup3d objectives (see the module docstring for what a subclass writes).

    Args:
        encoder: the shared encoder, injected (in YAML: ``class_path: selfsup3d.encoders.ViTEncoder``).
        lr: peak learning rate of the heads (and of the encoder, times ``encoder_lr_scale``). In a multi-task
            run each objective's ``lr`` is its heads' peak rate; the encoder's and the schedule come from the
            multi-task module.
        weight_decay: AdamW weight decay on matrices; norms, biases, embeddings and tokens get none.
        betas: AdamW betas.
        warmup_steps: linear warm-up length in optimiser steps.
        min_lr_ratio: the cosine schedule ends at ``lr * min_lr_ratio``.
        layer_decay: layer-wise learning-rate decay over the encoder (e.g. 0.75), grouped as timm does:
            block ``i`` of ``L`` gets ``decay ** (L - 1 - i)``, the embeddings ``decay ** L``, the final
            norm and the heads 1. ``null`` disables it.
        encoder_lr_scale: multiplies the encoder's learning rate (e.g. 0.1 when starting from DINOv2).
        grad_spike_factor: skip an optimiser step when the gradient norm exceeds this many times its
            running mean (after ``grad_spike_warmup`` steps); ``null`` disables skipping.
        grad_spike_warmup: steps before skipping may start.
        init_encoder_from: fine-tuning: a checkpoint of any selfsup3d objective or an exported encoder;
            the encoder is loaded strictly. (Resume a run with ``--ckpt_path last`` instead.)
        compile: ``torch.compile`` the encoder and the heads' blocks (:meth:`compile_targets`) in place when
            the model is configured (state-dict keys unchanged; the first steps are slow).
        max_nonfinite_steps: a step whose loss is NaN or infinite (on any rank) is skipped, counted and logged
            (``train/skipped_nonfinite``); this many in a row stop the run with an error.
        ema_decay: keep an exponential moving average of the encoder's weights (``ema_encoder``), updated after
            every optimiser step with this decay (e.g. 0.999; ``null``: none). When on, validation, testing and
            the exported encoder use the average; training uses the raw weights.
    """

    input_kind: ClassVar[InputKind] = "any"
    """Which batches :meth:`step` reads: ``multi_view``, ``single_view`` (a multi-view source is then given as
    its views, :func:`~selfsup3d.datamodules.views.views_as_images`) or ``any``."""

    def __init__(
        self,
        encoder: Encoder,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 500,
        min_lr_ratio: float = 0.01,
        layer_decay: float | None = None,
        encoder_lr_scale: float = 1.0,
        grad_spike_factor: float | None = None,
        grad_spike_warmup: int = 100,
        init_encoder_from: str | None = None,
        compile: bool = False,
        max_nonfinite_steps: int = 20,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__()
        self.key_prefix = current_prefix("model")
        if not isinstance(encoder, Encoder):
            raise ConfigError(
                f"{self.key('encoder')} must be a selfsup3d.encoders.Encoder (e.g. selfsup3d.encoders.ViTEncoder), "
                f"got {type(encoder).__name__}"
            )
        require(lr > 0, self.key("lr"), "> 0", lr)
        self.encoder = encoder
        self._encoder_key_prefix = encoder.key_prefix
        self.lr = lr
        self.weight_decay = weight_decay
        self.data_spec: DataSpec | None = None
        recipe = Recipe(tuple(betas), warmup_steps, min_lr_ratio, layer_decay, encoder_lr_scale, grad_spike_factor,
                        grad_spike_warmup, compile, max_nonfinite_steps, ema_decay)  # fmt: skip
        run_prefix = component_of()
        if run_prefix is not None:  # a component of a multi-task run, whose recipe and state are the run's
            given = {**vars(recipe), "init_encoder_from": init_encoder_from}
            refuse_recipe_arguments(type(self), given, self.key, run_prefix)
            self.recipe = None
            save_plain_hyperparameters(self)
            return
        recipe.check(self.key)
        self.recipe = recipe
        self._compiled = False
        # running mean of the gradient norm and the number of skipped steps survive resume
        self.register_buffer("_grad_norm_ema", torch.zeros(()), persistent=True)
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long), persistent=True)
        # what a resumed run needs besides the weights (see selfsup3d.objectives.run.resume)
        self.run_state = {"seed": None, "nonfinite_total": 0, "nonfinite_streak": 0}
        self._skip_step = False  # the current step's loss was not finite (its gradients are dropped)
        save_plain_hyperparameters(self)
        if init_encoder_from:
            self.load_encoder(init_encoder_from)
        self.ema_encoder: Encoder | None = None
        if ema_decay is not None:  # after init_encoder_from: the average starts at the weights training starts at
            self.ema_encoder = copy.deepcopy(encoder).requires_grad_(False)

    def key(self, name: str) -> str:
        """The YAML key of this objective's argument ``name`` (``model.init_args.<name>`` when fitted alone)."""
        return config_key(name, prefix=self.key_prefix)

    def encoder_key(self, name: str) -> str:
        """The YAML key of the (shared) encoder's argument ``name``."""
        return config_key(name, prefix=self._encoder_key_prefix)

    # ------------------------------------------------------------------ what a subclass writes
    def step(self, batch: Any, stage: str, encoder: Encoder) -> dict[str, Any]:
        """Compute one step's losses with ``encoder``. Return a dict with the optimised ``loss``; every other
        0-dim tensor or number is logged as ``<stage>/<name>``, larger tensors are handed to callbacks."""
        raise NotImplementedError(f"{type(self).__name__} must implement step(batch, stage, encoder)")

    def check_data(self, spec: DataSpec) -> None:
        """Refuse data this objective cannot train on, at start-up (raise ConfigError naming the keys: the
        spec's :meth:`~selfsup3d.datamodules.DataSpec.key` and :meth:`key`). ``spec`` is already adapted to
        :attr:`input_kind` (a multi-view source given to a single-view objective arrives as images)."""

    def needs_cameras(self) -> str | None:
        """Why this objective reads the data's cameras (``K``, ``c2w``) in training, naming the setting that makes
        it (e.g. ``"model.init_args.cameras=data"``), or ``None`` (the default: it does not). An objective that
        returns a reason is refused at start-up on a source whose scenes carry no cameras (:meth:`check_cameras`)."""
        return None

    def check_cameras(self, spec: DataSpec) -> None:
        """Refuse, in one line naming the source, a multi-view source without cameras for an objective that needs
        them (:meth:`needs_cameras`)."""
        reason = self.needs_cameras()
        if reason is not None and spec.kind == "multi_view" and not spec.has_cameras:
            raise ConfigError(
                f"{type(self).__name__} needs the data's cameras ({reason}), but the scenes of "
                f"{spec.key('train_urls')} carry no cameras.json (an unposed source, e.g. converted video or "
                "frames; the start-up inventory counts them); use posed scenes"
            )

    def bind(self, components: Mapping[str, PretrainObjective]) -> None:
        """In a multi-task run, called once with all components by name (an objective that uses another's
        heads, e.g. its camera estimator, finds it here). Nothing to do by default."""

    def exports(self) -> dict[str, tuple[dict[str, Tensor], dict[str, Any]]]:
        """Products besides the encoder to write at export, by file stem: ``(state_dict, metadata)``."""
        return {}

    def compile_targets(self) -> list[nn.Module]:
        """The head modules that ``compile: true`` compiles besides the encoder (e.g. transformer blocks)."""
        return []

    def encoder_input_size(self, spec: DataSpec) -> tuple[tuple[int, int], str]:
        """The ``(height, width)`` of the images :meth:`step` gives the encoder for data of ``spec``, and the YAML key
        that sets it (the data's ``image_size`` unless the objective resizes its input)."""
        return spec.image_hw, spec.key("image_size")

    def components(self) -> Iterator[tuple[str, PretrainObjective]]:
        """The objectives this module trains, by name: itself (name ``""``) for an objective fitted alone."""
        yield "", self

    def configure_model(self) -> None:
        """``compile: true``: compile the encoder and every component's :meth:`compile_targets` in place."""
        if not self.recipe.compile or self._compiled:
            return
        self.encoder.compile()
        for _, component in self.components():
            for module in component.compile_targets():
                module.compile()
        self._compiled = True

    # ------------------------------------------------------------------ data
    def adapt_spec(self, spec: DataSpec) -> DataSpec:
        """``spec`` as this objective's ``step`` sees it (views as images for a single-view objective)."""
        if self.input_kind == "single_view" and spec.kind == "multi_view":
            return spec.as_images()
        if self.input_kind == "multi_view" and spec.kind != "multi_view":
            raise ConfigError(
                f"{type(self).__name__} trains on multi-view scenes, but the data source at {spec.key_prefix} "
                "delivers single images: use selfsup3d.datamodules.MultiViewShards"
            )
        return spec

    def adapt_batch(self, batch: Any, max_views: int | None = None) -> Any:
        """A batch as this objective's ``step`` reads it (a multi-view batch's views for a single-view one)."""
        if self.input_kind == "single_view" and isinstance(batch, Mapping) and "images" in batch:
            return views_as_images(batch, max_views)
        return batch

    def configure_data(self, specs: Mapping[str, DataSpec]) -> None:
        """Check the data sources at start-up (called from :meth:`setup` with the datamodule's specs)."""
        if not specs:
            return
        if len(specs) != 1:
            raise ConfigError(
                f"{type(self).__name__} reads one data source, the datamodule has {len(specs)} ({', '.join(specs)}): "
                "train several objectives together with selfsup3d.objectives.MultiTask"
            )
        self.data_spec = self.adapt_spec(next(iter(specs.values())))
        self.check_cameras(self.data_spec)
        self.check_data(self.data_spec)
        self.check_image_size(self.data_spec, self.encoder)

    def check_image_size(self, spec: DataSpec, encoder: Encoder) -> None:
        """Warn at start-up when the images this objective gives ``encoder`` are not the size it was built for: its
        position embeddings are then interpolated at every step, and it is exported at the size it was built for."""
        (h, w), where = self.encoder_input_size(spec)
        built = encoder.image_size
        if built is not None and (h, w) != (built, built):
            rank_zero_warn(
                f"{where}={h if h == w else [h, w]} but the encoder is built for {encoder.key('img_size')}={built}: "
                "its position embeddings are interpolated at every step (and exported at its size); set them equal "
                "unless that is meant"
            )

    def setup(self, stage: str) -> None:
        """Start-up checks of the data against the model (see :meth:`check_data`); the run's seed (the one
        ``seed_everything`` set; a resumed run takes its checkpoint's)."""
        if self._trainer is not None:
            self.configure_data(data_specs(self.trainer.datamodule))
        if self.run_state["seed"] is None:
            self.run_state["seed"] = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed() % 2**31))

    # ------------------------------------------------------------------ encoder
    def load_encoder(self, source: str) -> None:
        """Load encoder weights strictly from ``source`` (see :mod:`selfsup3d.encoders.weights`)."""
        self.encoder.load_weights(source)
        rank_zero_info(f"encoder initialised from {source}")

    def frozen_teacher(self) -> FrozenTeacher | None:
        """The first frozen teacher any component holds (probes report it beside the student), or ``None``."""
        for _, component in self.components():
            for module in component.modules():
                if isinstance(module, FrozenTeacher):
                    return module
        return None

    # ------------------------------------------------------------------ steps and logging
    def log_scalars(self, stage: str, out: Mapping[str, Any], size: int, prefix: str = "") -> None:
        """Log every scalar of ``out`` as ``<stage>/<prefix><name>``; the loss also on the progress bar."""
        on_step = stage == "train"
        for name, value in out.items():
            if isinstance(value, Tensor):
                if value.numel() != 1:
                    continue
                value = value.detach().float()
            elif not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            self.log(
                f"{stage}/{prefix}{name}",
                value,
                on_step=on_step,
                on_epoch=not on_step,
                prog_bar=name == "loss" and not prefix,
                batch_size=size,
                sync_dist=not on_step,
                add_dataloader_idx=False,
            )

    def _run(self, batch: Any, stage: str) -> dict[str, Any]:
        out = self.step(self.adapt_batch(batch), stage, self.encoder_for(stage))
        self.log_scalars(stage, out, batch_size(batch))
        return out

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self.skip_nonfinite(detach_outputs(self._run(batch, "train")))

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self._run(batch, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self._run(batch, "test")


def load_objective(checkpoint: str | Path, map_location: str = "cpu") -> PretrainObjective:
    """The objective (of whatever class) a selfsup3d checkpoint holds, rebuilt from its hyper-parameters and loaded.

    ``LightningModule.load_from_checkpoint`` must be called on the checkpoint's own class; its name is in the
    hyper-parameters (``_class_path``), written by the CLI and by :class:`PretrainObjective` itself."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    hparams = state.get("hyper_parameters", {}) if isinstance(state, Mapping) else {}
    class_path = hparams.get("_class_path")
    if not isinstance(class_path, str) or "." not in class_path:
        raise ValueError(f"{checkpoint} is not a checkpoint of a selfsup3d objective (no _class_path hyper-parameter)")
    module, name = class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, PretrainObjective)):
        raise ValueError(f"{checkpoint} holds a {class_path}, not a selfsup3d objective")
    instantiator = hparams.get("_instantiator")
    if not isinstance(instantiator, str):
        return cls.load_from_checkpoint(str(checkpoint), map_location=map_location, weights_only=True)
    # rebuilt by the CLI's instantiator, as the CLI built it: the hyper-parameters are the checkpoint's (else
    # save_hyperparameters would see a multi-task module's objectives as the instantiator's factories, which
    # are not plain data, and leave them out with a warning)
    given = {k: v for k, v in hparams.items() if k != "_instantiator"}
    with _given_hyperparameters_context(given, instantiator):
        return cls.load_from_checkpoint(str(checkpoint), map_location=map_location, weights_only=True)


def component_outputs(
    module: PretrainObjective, outputs: Any, kind: type[PretrainObjective]
) -> Iterator[tuple[str, PretrainObjective, Mapping[str, Any]]]:
    """The step outputs of every component of ``module`` that is a ``kind``: ``(name, objective, outputs)``.

    For callbacks (pictures, probes) that serve one objective whether it is fitted alone (its outputs are the
    step's) or inside a multi-task run (its outputs are under its name)."""
    if not isinstance(outputs, Mapping):
        return
    for name, component in module.components():
        out = outputs if not name else outputs.get(name)
        if isinstance(component, kind) and isinstance(out, Mapping):
            yield name, component, out
