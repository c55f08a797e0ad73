"""The shared base of every objective.

:class:`PretrainObjective` is a LightningModule that owns what all objectives share, so that a subclass writes
only its heads, its losses and :meth:`~PretrainObjective.step`:

* the injected encoder (an :class:`~selfsup3d.encoders.Encoder`; :class:`~selfsup3d.encoders.ViTEncoder` in
  the configs), passed to ``step`` explicitly, so that the same objective trains alone or as one component
  of a :class:`~selfsup3d.objectives.MultiTask` over a shared encoder;
* AdamW with parameter groups: no weight decay on norms, biases, embeddings and learnable tokens,
  optional layer-wise learning-rate decay over the encoder's blocks (the encoder builds its own groups);
* a linear warm-up then cosine schedule, stepped every optimiser step;
* skipping of optimiser steps whose gradient norm spikes far above its running mean (counted), and of steps
  whose loss is not finite (counted; too many in a row stop the run with :class:`NonFiniteLossError`);
* exact resume: the random generator is seeded at every training batch from ``(run seed, rank, epoch,
  batch)``, and the run seed and the skip counters are saved in the checkpoint, so a resumed run draws what
  the uninterrupted run would have (the data streams resume on their own, see
  :mod:`selfsup3d.datamodules.resumable`);
* logging: every scalar a step returns is logged as ``train/<name>`` or ``val/<name>`` (in a multi-task run
  ``train/<objective>/<name>``);
* the data check at start-up: the datamodule's :class:`~selfsup3d.datamodules.DataSpec` reaches
  :meth:`~PretrainObjective.check_data`, and a multi-view source feeds an objective that reads single images
  through :func:`~selfsup3d.datamodules.views.views_as_images`;
* frozen teachers (:class:`~selfsup3d.encoders.FrozenTeacher`) that can be rebuilt are left out of
  checkpoints and rebuilt on load; checkpoints are checked key by key before loading;
* an optional moving average of the encoder (``ema_decay``; the heads and frozen teachers stay out of it),
  saved in checkpoints, used for validation and testing and for the exported encoder;
* fine-tuning: ``init_encoder_from`` loads the encoder strictly from a checkpoint of any objective or from an
  exported encoder, naming mismatched keys; :meth:`~PretrainObjective.encoder_state_dict` for export.

See ``README.md``, "Plugging in a new objective".
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from selfsup3d.datamodules.resumable import stream_seed
from selfsup3d.datamodules.spec import DataSpec, data_specs
from selfsup3d.datamodules.views import batch_size, views_as_images
from selfsup3d.encoders.base import Encoder
from selfsup3d.encoders.teacher import FrozenTeacher
from selfsup3d.errors import CheckpointMismatchError, ConfigError, NonFiniteLossError, config_key, current_prefix

InputKind = Literal["multi_view", "single_view", "any"]
RUN_STATE_KEY = "selfsup3d_run_state"
"""Where checkpoints keep an objective's run state (:attr:`PretrainObjective.run_state`)."""


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate at ``step``: linear warm-up from 0, then cosine to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _collect_no_weight_decay(module: nn.Module) -> set[str]:
    """Names (relative to ``module``) of parameters that take no weight decay by declaration:
    timm's ``no_weight_decay()`` convention on any submodule, and ``nn.Embedding`` tables."""
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        if hasattr(sub, "no_weight_decay") and callable(sub.no_weight_decay):
            names.update(f"{dot}{n}" for n in sub.no_weight_decay())
        if isinstance(sub, nn.Embedding):
            names.add(f"{dot}weight")
    return names


def _teacher_prefixes(module: nn.Module, reproducible_only: bool) -> list[str]:
    """State-dict prefixes (``name.``) of the frozen teachers inside ``module``."""
    return [
        f"{name}."
        for name, sub in module.named_modules()
        if isinstance(sub, FrozenTeacher) and (sub.reproducible or not reproducible_only)
    ]


class PretrainObjective(LightningModule):
    """Base class of selfsup3d objectives.

    A subclass implements :meth:`step` (and, when it has requirements on the data, :meth:`check_data`); it
    declares in :attr:`input_kind` which batches its ``step`` reads.

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
        for key, value in {"lr": lr, "encoder_lr_scale": encoder_lr_scale}.items():
            if value <= 0:
                raise ConfigError(f"{self.key(key)} must be > 0, got {value}")
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ConfigError(f"{self.key('layer_decay')} must be in (0, 1], got {layer_decay}")
        if not 0 <= min_lr_ratio <= 1:
            raise ConfigError(f"{self.key('min_lr_ratio')} must be in [0, 1], got {min_lr_ratio}")
        if grad_spike_factor is not None and grad_spike_factor <= 1:
            raise ConfigError(f"{self.key('grad_spike_factor')} must be > 1, got {grad_spike_factor}")
        if warmup_steps < 0:
            raise ConfigError(f"{self.key('warmup_steps')} must be >= 0, got {warmup_steps}")
        if ema_decay is not None and not 0 <= ema_decay < 1:
            raise ConfigError(f"{self.key('ema_decay')} must be in [0, 1) or null, got {ema_decay}")
        if max_nonfinite_steps < 1:
            raise ConfigError(f"{self.key('max_nonfinite_steps')} must be >= 1, got {max_nonfinite_steps}")
        self.encoder = encoder
        self._encoder_key_prefix = encoder.key_prefix
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.layer_decay = layer_decay
        self.encoder_lr_scale = encoder_lr_scale
        self.grad_spike_factor = grad_spike_factor
        self.grad_spike_warmup = grad_spike_warmup
        self.compile_modules = compile
        self._compiled = False
        # running mean of the gradient norm and the number of skipped steps survive resume
        self.register_buffer("_grad_norm_ema", torch.zeros(()), persistent=True)
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long), persistent=True)
        self.max_nonfinite_steps = max_nonfinite_steps
        # what a resumed run needs besides the weights (saved under RUN_STATE_KEY in checkpoints)
        self.run_state = {"seed": None, "nonfinite_total": 0, "nonfinite_streak": 0}
        self._skip_step = False  # the current step's loss was not finite (its gradients are dropped)
        self.data_spec: DataSpec | None = None
        self._save_hparams()
        if init_encoder_from:
            self.load_encoder(init_encoder_from)
        self.ema_decay = ema_decay
        self.ema_encoder: Encoder | None = None
        if ema_decay is not None:  # after init_encoder_from: the average starts at the weights training starts at
            self.ema_encoder = copy.deepcopy(encoder).requires_grad_(False)

    def key(self, name: str) -> str:
        """The YAML key of this objective's argument ``name`` (``model.init_args.<name>`` when fitted alone)."""
        return config_key(name, prefix=self.key_prefix)

    def encoder_key(self, name: str) -> str:
        """The YAML key of the (shared) encoder's argument ``name``."""
        return config_key(name, prefix=self._encoder_key_prefix)

    # ------------------------------------------------------------------ hyper-parameters
    def _save_hparams(self) -> None:
        """Save constructor arguments (of the subclass too) as plain data.

        Under LightningCLI the injected modules arrive as their ``class_path``/``init_args`` config, so
        ``load_from_checkpoint`` rebuilds them. When an object is built in Python, injected modules
        that expose a ``config`` dict (like ViTEncoder) are recorded the same way; checkpoints then
        hold no pickled modules and load with ``weights_only=True``."""
        with warnings.catch_warnings():
            # injected modules are converted to their config just below
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        converted = False
        for key, value in list(self.hparams.items()):
            plain = _as_config(value)
            if plain is not None:
                self.hparams[key] = plain
                converted = converted or plain is not value
            elif not _is_plain(value):
                del self.hparams[key]
                warnings.warn(
                    f"{key}={type(value).__name__} cannot be saved as plain data and is left out of the "
                    f"hyper-parameters; pass {key}=... to load_from_checkpoint",
                    stacklevel=3,
                )
        if converted and "_instantiator" not in self.hparams:
            cls = type(self)
            self.hparams["_class_path"] = f"{cls.__module__}.{cls.__qualname__}"
            self.hparams["_instantiator"] = "lightning.pytorch.cli.instantiate_module"

    # ------------------------------------------------------------------ what a subclass writes
    def step(self, batch: Any, stage: str, encoder: Encoder) -> dict[str, Any]:
        """Compute one step's losses with ``encoder``. Return a dict with the optimised ``loss``; every other
        0-dim tensor or number is logged as ``<stage>/<name>``, larger tensors are handed to callbacks."""
        raise NotImplementedError(f"{type(self).__name__} must implement step(batch, stage, encoder)")

    def check_data(self, spec: DataSpec) -> None:
        """Refuse data this objective cannot train on, at start-up (raise ConfigError naming the keys: the
        spec's :meth:`~selfsup3d.datamodules.DataSpec.key` and :meth:`key`). ``spec`` is already adapted to
        :attr:`input_kind` (a multi-view source given to a single-view objective arrives as images)."""

    def components(self) -> Iterator[tuple[str, PretrainObjective]]:
        """The objectives this module trains, by name: itself (name ``""``) for an objective fitted alone."""
        yield "", self

    def bind(self, components: Mapping[str, PretrainObjective]) -> None:
        """In a multi-task run, called once with all components by name (an objective that uses another's
        heads, e.g. its camera estimator, finds it here). Nothing to do by default."""

    def exports(self) -> dict[str, tuple[dict[str, Tensor], dict[str, Any]]]:
        """Products besides the encoder to write at export, by file stem: ``(state_dict, metadata)``."""
        return {}

    def compile_targets(self) -> list[nn.Module]:
        """The head modules that ``compile: true`` compiles besides the encoder (e.g. transformer blocks)."""
        return []

    def configure_model(self) -> None:
        """``compile: true``: compile the encoder and every component's :meth:`compile_targets` in place."""
        if not self.compile_modules or self._compiled:
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
        self.check_data(self.data_spec)

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

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights for export (timm key schema for ViTEncoder): the moving average when on."""
        return (self.ema_encoder or self.encoder).export_state_dict()

    def encoder_for(self, stage: str) -> Encoder:
        """The encoder a ``stage`` runs: the raw one in training, the moving average (when on) otherwise."""
        return self.encoder if stage == "train" or self.ema_encoder is None else self.ema_encoder

    @torch.no_grad()
    def update_ema(self) -> None:
        """One step of the moving averages of the encoder: ``ema = decay * ema + (1 - decay) * weights`` (buffers
        are copied), for ``ema_encoder`` and for every moving-average teacher (``teacher: ema``) of the components."""
        averages = [] if self.ema_encoder is None or self.ema_decay is None else [(self.ema_encoder, self.ema_decay)]
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

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed the random generators (all devices) from the run seed, rank, epoch and batch: what a step draws
        (masks, rays, dropout) is a function of where it is in the run, so a resumed run draws the same."""
        seed = self.run_state["seed"]
        seed = stream_seed("step", 0 if seed is None else seed, self.global_rank, self.current_epoch, batch_idx)
        torch.manual_seed(seed)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        out = _detach_outputs(self._run(batch, "train"))
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
        if state["nonfinite_streak"] >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"the loss was NaN or infinite in {state['nonfinite_streak']} steps in a row (global step "
                f"{self.global_step}; {state['nonfinite_total']} in all): the run stopped instead of training on. "
                "Usual causes: a learning rate too high (model.init_args.lr), bf16/fp16 overflow "
                "(trainer.precision), broken data; the last good weights are in the checkpoint"
            )
        return finite

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self._run(batch, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self._run(batch, "test")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The module's state without the frozen teachers that can be rebuilt from their source."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        drop = tuple(f"{prefix}{p}" for p in _teacher_prefixes(self, reproducible_only=True))
        for key in [k for k in state if drop and k.startswith(drop)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load strictly; rebuilt teachers keep their own weights when the state has none for them."""
        own = super().state_dict(keep_vars=True)
        for prefix in _teacher_prefixes(self, reproducible_only=True):
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
        rebuilt = tuple(_teacher_prefixes(self, reproducible_only=True))
        missing = sorted(expected - saved)
        unexpected = sorted(k for k in saved - expected if not (rebuilt and k.startswith(rebuilt)))
        if missing or unexpected:
            parts = [f"the checkpoint does not match {type(self).__name__}"]
            if missing:
                parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:10])}")
            if unexpected:
                parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}")
            raise CheckpointMismatchError("; ".join(parts))

    # ------------------------------------------------------------------ optimisation
    def head_parameter_groups(self, lr: float, name: str = "heads") -> list[dict[str, Any]]:
        """AdamW groups of this objective's own trainable parameters (outside the encoder and frozen teachers),
        split into decayed matrices and undecayed norms, biases, embeddings and tokens."""
        frozen = {id(p) for m in self.modules() if isinstance(m, FrozenTeacher) for p in m.parameters()}
        no_wd = _collect_no_weight_decay(self)
        decay, no_decay = [], []
        for pname, param in self.named_parameters():
            if not param.requires_grad or pname.startswith("encoder.") or id(param) in frozen:
                continue
            if param.ndim <= 1 or pname.endswith(".bias") or pname in no_wd:
                no_decay.append(param)
            else:
                decay.append(param)
        groups = [
            {"name": f"{name}_decay", "params": decay, "weight_decay": self.weight_decay, "lr": lr},
            {"name": f"{name}_no_decay", "params": no_decay, "weight_decay": 0.0, "lr": lr},
        ]
        return [g for g in groups if g["params"]]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups, each with its ``lr`` (base lr times layer/encoder scale) and ``weight_decay``:
        the encoder's (built by the encoder, optionally with layer-wise decay), then each component's heads."""
        groups: list[dict[str, Any]] = []
        for g in self.encoder.param_groups(self.weight_decay, self.layer_decay):
            scale = g.pop("lr_scale", 1.0)
            g["name"] = f"encoder_{'decay' if g['weight_decay'] else 'no_decay'}"
            if self.layer_decay is not None:
                g["name"] += f"_scale{scale:.3g}"
            g["lr"] = self.lr * self.encoder_lr_scale * scale
            groups.append(g)
        for name, component in self.components():
            heads = component.head_parameter_groups(component.lr, f"{name}_heads" if name else "heads")
            groups.extend(heads)
        return [g for g in groups if g["params"]]

    def total_steps(self) -> int:
        """Length of the schedule: ``trainer.max_steps``, else the trainer's estimate from epochs."""
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return int(self.trainer.max_steps)
        estimate = self.trainer.estimated_stepping_batches
        if not math.isfinite(estimate):
            raise ConfigError("set trainer.max_steps: the data stream has no length to derive a schedule from")
        return int(estimate)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.lr, betas=self.betas)
        total = self.total_steps()
        warmup, min_ratio = self.warmup_steps, self.min_lr_ratio
        scheduler = LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total, min_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip the step after a non-finite loss, or when the (unclipped) gradient norm spikes; neither moves the
        running mean of the norm."""
        if self._skip_step:
            self._skip_step = False
            _drop_gradients(optimizer)
            return
        if self.grad_spike_factor is None:
            return
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        ema = self._grad_norm_ema
        warm = self.global_step >= self.grad_spike_warmup and ema > 0
        spike = (not torch.isfinite(norm)) or bool(warm and norm > self.grad_spike_factor * ema)
        if spike:
            _drop_gradients(optimizer)
            self.skipped_steps += 1
        else:
            ema.copy_(norm if ema == 0 else 0.99 * ema + 0.01 * norm)
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        self.log("train/skipped_steps", self.skipped_steps.float(), on_step=True, on_epoch=False)


def _drop_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Skip an optimiser step: AdamW leaves parameters without gradient untouched (no decay, no momentum)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def load_objective(checkpoint: str | Path, map_location: str = "cpu") -> PretrainObjective:
    """The objective (of whatever class) a selfsup3d checkpoint holds, rebuilt from its hyper-parameters and loaded.

    ``LightningModule.load_from_checkpoint`` must be called on the checkpoint's own class; its name is in the
    hyper-parameters (``_class_path``), written by the CLI and by :class:`PretrainObjective` itself."""
    import importlib

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    hparams = state.get("hyper_parameters", {}) if isinstance(state, Mapping) else {}
    class_path = hparams.get("_class_path")
    if not isinstance(class_path, str) or "." not in class_path:
        raise ValueError(f"{checkpoint} is not a checkpoint of a selfsup3d objective (no _class_path hyper-parameter)")
    module, name = class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, PretrainObjective)):
        raise ValueError(f"{checkpoint} holds a {class_path}, not a selfsup3d objective")
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


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _as_config(value: Any) -> Any:
    """``value`` as plain data: a module with a ``config`` dict, or ``functools.partial(Class, **kwargs)`` (a
    component factory), becomes ``{"class_path", "init_args"}``; containers are converted item by item.
    ``None`` when ``value`` cannot be expressed as plain data."""
    import functools

    if _is_plain(value):
        return value
    if isinstance(value, nn.Module) and isinstance(getattr(value, "config", None), Mapping):
        cls = type(value)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(value.config)}
    if isinstance(value, functools.partial) and isinstance(value.func, type) and not value.args:
        cls = value.func
        init = {k: _as_config(v) for k, v in value.keywords.items()}
        if any(v is None and value.keywords[k] is not None for k, v in init.items()):
            return None
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init}
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        items = {k: _as_config(v) for k, v in value.items()}
        return None if any(v is None and value[k] is not None for k, v in items.items()) else items
    return None


def _detach_outputs(out: dict[str, Any]) -> dict[str, Any]:
    def detach(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.detach()
        if isinstance(value, dict):
            return {k: detach(v) for k, v in value.items()}
        return value

    return {k: (v if k == "loss" else detach(v)) for k, v in out.items()}
