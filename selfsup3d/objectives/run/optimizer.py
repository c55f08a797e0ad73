"""AdamW with parameter groups and the linear warm-up + cosine schedule of a run (:class:`OptimizerMixin`).

Groups: the encoder's (built by the encoder, optionally with layer-wise learning-rate decay, times
``encoder_lr_scale``), then each component's heads, split into decayed matrices and undecayed norms, biases,
embeddings and learnable tokens (timm's ``no_weight_decay()`` convention and ``nn.Embedding`` tables); frozen
teachers take no part. The schedule is stepped every optimiser step, over ``trainer.max_steps``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from selfsup3d.encoders.teacher import FrozenTeacher
from selfsup3d.errors import ConfigError


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate at ``step``: linear warm-up from 0, then cosine to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def no_weight_decay_names(module: nn.Module) -> set[str]:
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


class OptimizerMixin:
    """Lightning's ``configure_optimizers`` for an objective (see the module docstring). Reads the module's
    ``encoder``, ``lr``, ``weight_decay``, ``recipe`` (:class:`~selfsup3d.objectives.run.recipe.Recipe`),
    ``components()`` and ``trainer``."""

    def head_parameter_groups(self, lr: float, name: str = "heads") -> list[dict[str, Any]]:
        """AdamW groups of this objective's own trainable parameters (outside the encoder and frozen teachers),
        split into decayed matrices and undecayed norms, biases, embeddings and tokens."""
        frozen = {id(p) for m in self.modules() if isinstance(m, FrozenTeacher) for p in m.parameters()}
        no_wd = no_weight_decay_names(self)
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
        recipe = self.recipe
        groups: list[dict[str, Any]] = []
        for g in self.encoder.param_groups(self.weight_decay, recipe.layer_decay):
            scale = g.pop("lr_scale", 1.0)
            g["name"] = f"encoder_{'decay' if g['weight_decay'] else 'no_decay'}"
            if recipe.layer_decay is not None:
                g["name"] += f"_scale{scale:.3g}"
            g["lr"] = self.lr * recipe.encoder_lr_scale * scale
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
        recipe = self.recipe
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.lr, betas=recipe.betas)
        total = self.total_steps()
        warmup, min_ratio = recipe.warmup_steps, recipe.min_lr_ratio
        scheduler = LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total, min_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
