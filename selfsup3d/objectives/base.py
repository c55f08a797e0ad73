"""The shared base of every objective.

:class:`PretrainObjective` owns what all objectives share, so that a subclass writes only its heads
and its losses:

* the injected encoder (any ``nn.Module``; :class:`~selfsup3d.encoders.ViTEncoder` in the configs);
* AdamW with parameter groups: no weight decay on norms, biases, embeddings and learnable tokens,
  optional layer-wise learning-rate decay over the encoder's blocks (timm's grouping);
* a linear warm-up then cosine schedule, stepped every optimiser step;
* skipping of optimiser steps whose gradient norm spikes far above its running mean (counted);
* logging conventions: every scalar a step returns is logged as ``train/<name>`` or ``val/<name>``;
* fine-tuning: ``init_encoder_from`` loads the encoder strictly from a checkpoint of any objective
  or from an exported encoder, naming mismatched keys;
* :meth:`encoder_state_dict` for export.

A subclass implements :meth:`step`, returning a dict with a ``loss`` entry. See ``README.md``,
"Plugging in a new objective".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from selfsup3d.encoders.checkpoint import load_encoder_weights
from selfsup3d.errors import ConfigError

# Children that are never optimised and never part of the student (see TriplaneReconstruction).
FROZEN_CHILDREN = ("teacher",)


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


class PretrainObjective(LightningModule):
    """Base class of selfsup3d objectives.

    Args:
        encoder: the shared encoder, injected (in YAML: ``class_path: selfsup3d.encoders.ViTEncoder``).
        lr: peak learning rate of the heads (and of the encoder, times ``encoder_lr_scale``).
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
    """

    def __init__(
        self,
        encoder: nn.Module,
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
    ) -> None:
        super().__init__()
        for key, value in {"lr": lr, "encoder_lr_scale": encoder_lr_scale}.items():
            if value <= 0:
                raise ConfigError(f"model.{key} must be > 0, got {value}")
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ConfigError(f"model.layer_decay must be in (0, 1], got {layer_decay}")
        if not 0 <= min_lr_ratio <= 1:
            raise ConfigError(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if grad_spike_factor is not None and grad_spike_factor <= 1:
            raise ConfigError(f"model.grad_spike_factor must be > 1, got {grad_spike_factor}")
        self.encoder = encoder
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.layer_decay = layer_decay
        self.encoder_lr_scale = encoder_lr_scale
        self.grad_spike_factor = grad_spike_factor
        self.grad_spike_warmup = grad_spike_warmup
        # running mean of the gradient norm and the number of skipped steps survive resume
        self.register_buffer("_grad_norm_ema", torch.zeros(()), persistent=True)
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long), persistent=True)
        self._save_hparams()
        if init_encoder_from:
            self.load_encoder(init_encoder_from)

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
            if isinstance(value, nn.Module):
                config = getattr(value, "config", None)
                if isinstance(config, Mapping):
                    cls = type(value)
                    self.hparams[key] = {
                        "class_path": f"{cls.__module__}.{cls.__qualname__}",
                        "init_args": dict(config),
                    }
                    converted = True
                else:
                    del self.hparams[key]
                    warnings.warn(
                        f"{key}={type(value).__name__} has no `config` dict and is not saved in the hyper-parameters; "
                        f"pass {key}=... to load_from_checkpoint",
                        stacklevel=3,
                    )
        if converted and "_instantiator" not in self.hparams:
            cls = type(self)
            self.hparams["_class_path"] = f"{cls.__module__}.{cls.__qualname__}"
            self.hparams["_instantiator"] = "lightning.pytorch.cli.instantiate_module"

    # ------------------------------------------------------------------ encoder
    def load_encoder(self, source: str) -> None:
        """Load encoder weights strictly from ``source`` (see :mod:`selfsup3d.encoders.checkpoint`)."""
        target = getattr(self.encoder, "vit", self.encoder)
        load_encoder_weights(target, source)
        rank_zero_info(f"encoder initialised from {source}")

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights for export (timm key schema for ViTEncoder)."""
        if hasattr(self.encoder, "export_state_dict"):
            return self.encoder.export_state_dict()
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}

    # ------------------------------------------------------------------ steps
    def step(self, batch: Any, stage: str) -> dict[str, Any]:
        """Compute one step's losses. Return a dict with the optimised ``loss``; every other 0-dim tensor
        or number is logged as ``<stage>/<name>``, larger tensors are handed to callbacks (pictures)."""
        raise NotImplementedError(f"{type(self).__name__} must implement step(batch, stage)")

    def batch_size(self, batch: Any) -> int:
        """Samples in ``batch``, for logging."""
        if isinstance(batch, Mapping):
            for value in batch.values():
                if isinstance(value, Tensor) and value.ndim > 0:
                    return int(value.shape[0])
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
            return int(batch[0].shape[0])
        return 1

    def log_scalars(self, stage: str, out: Mapping[str, Any], batch_size: int) -> None:
        """Log every scalar of ``out`` under ``<stage>/``; the loss also on the progress bar."""
        on_step = stage == "train"
        for name, value in out.items():
            if isinstance(value, Tensor):
                if value.numel() != 1:
                    continue
                value = value.detach().float()
            elif not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            self.log(
                f"{stage}/{name}",
                value,
                on_step=on_step,
                on_epoch=not on_step,
                prog_bar=name == "loss",
                batch_size=batch_size,
                sync_dist=not on_step,
            )

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        out = self.step(batch, "train")
        self.log_scalars("train", out, self.batch_size(batch))
        return _detach_outputs(out)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        out = self.step(batch, "val")
        self.log_scalars("val", out, self.batch_size(batch))
        return out

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        out = self.step(batch, "test")
        self.log_scalars("test", out, self.batch_size(batch))
        return out

    # ------------------------------------------------------------------ optimisation
    def head_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Trainable parameters outside the encoder (and outside frozen children such as the teacher)."""
        skip = ("encoder.", *(f"{c}." for c in FROZEN_CHILDREN))
        for name, param in self.named_parameters():
            if param.requires_grad and not name.startswith(skip):
                yield name, param

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups, each with its ``lr`` (base lr times layer/encoder scale) and ``weight_decay``."""
        groups: list[dict[str, Any]] = []
        no_wd = _collect_no_weight_decay(self)  # names relative to this module, encoder's included
        enc_no_wd = {n.removeprefix("encoder.") for n in no_wd if n.startswith("encoder.")}
        if self.layer_decay is not None:
            vit = getattr(self.encoder, "vit", None)
            if vit is None or not hasattr(vit, "group_matcher"):
                raise ConfigError("model.layer_decay needs a timm ViT encoder (with .vit and a group_matcher)")
            vit_no_wd = {n.removeprefix("vit.") for n in enc_no_wd if n.startswith("vit.")}
            enc_groups = param_groups_layer_decay(
                vit, weight_decay=self.weight_decay, no_weight_decay_list=vit_no_wd, layer_decay=self.layer_decay
            )
            for g in enc_groups:
                g["lr_scale"] = g.get("lr_scale", 1.0) * self.encoder_lr_scale
        else:
            enc_groups = param_groups_weight_decay(self.encoder, self.weight_decay, no_weight_decay_list=enc_no_wd)
            for g in enc_groups:
                g["lr_scale"] = self.encoder_lr_scale
        for g in enc_groups:
            g["name"] = f"encoder_{'decay' if g['weight_decay'] else 'no_decay'}"
            if self.layer_decay is not None:
                g["name"] += f"_scale{g['lr_scale']:.3g}"
        groups.extend(enc_groups)

        decay, no_decay = [], []
        for name, param in self.head_parameters():
            if param.ndim <= 1 or name.endswith(".bias") or name in no_wd:
                no_decay.append(param)
            else:
                decay.append(param)
        if decay:
            groups.append({"name": "heads_decay", "params": decay, "weight_decay": self.weight_decay, "lr_scale": 1.0})
        if no_decay:
            groups.append({"name": "heads_no_decay", "params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0})
        groups = [g for g in groups if g["params"]]
        for g in groups:
            g["lr"] = self.lr * g.pop("lr_scale")
        return groups

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
        """Skip the step when the (unclipped) gradient norm spikes; the spike does not move the mean."""
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
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # AdamW leaves parameters without gradient untouched
            self.skipped_steps += 1
        else:
            ema.copy_(norm if ema == 0 else 0.99 * ema + 0.01 * norm)
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        self.log("train/skipped_steps", self.skipped_steps.float(), on_step=True, on_epoch=False)


def _detach_outputs(out: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if k == "loss" or not isinstance(v, Tensor) else v.detach()) for k, v in out.items()}
