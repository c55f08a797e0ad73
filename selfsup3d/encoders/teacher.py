"""Frozen teachers: the encoders a distillation or fidelity term keeps the student close to.

* :class:`FrozenTeacher` wraps an encoder: no gradients, its forward runs in eval mode without autograd.
  It knows whether it can be **rebuilt** from its source (pretrained weights, a weights file, the student's
  ``init_encoder_from``): such a teacher is left out of checkpoints and rebuilt on load; one that cannot
  (the copy of a randomly initialised encoder) is saved once, under its module name. The objectives' base
  class applies that rule to every ``FrozenTeacher`` it holds (:meth:`PretrainObjective.state_dict`).
* :func:`build_teacher` makes one from a spec: ``null`` (a frozen copy of the encoder as built), ``ema`` or
  ``ema:0.996`` (a moving average of the student, which the objectives' base class updates after every optimiser
  step with that decay; 0.999 by default), a weights
  file (an exported encoder, a timm state dict, a selfsup3d checkpoint), or a timm model id
  (``vit_large_patch14_dinov2.lvd142m``).
* :func:`sharing_teachers`: teachers built inside it with the same spec over the same encoder are one module, so
  the objectives of a multi-task run that name the same teacher hold one frozen copy (one ViT-B, not two).
* :func:`resample_patch_tokens` and :func:`distillation_loss`: the student's class + patch tokens against
  the teacher's, the teacher's patch grid resampled to the student's when they differ.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup3d.encoders.base import Encoder, EncoderOutput
from selfsup3d.encoders.export import load_exported_encoder, read_export_config
from selfsup3d.encoders.vit import ViTEncoder
from selfsup3d.errors import ConfigError, config_key

_WEIGHT_SUFFIXES = (".ckpt", ".safetensors", ".pth", ".pt", ".bin")


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.train(False)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class FrozenTeacher(nn.Module):
    """A frozen encoder: no gradients, and its forward runs in eval mode under ``torch.no_grad`` whatever
    mode the surrounding model is in.

    Args:
        module: the encoder (its parameters are frozen in place).
        reproducible: whether the teacher can be rebuilt from its source (then it is not checkpointed).
        source: where it came from, for messages (``copy of the encoder``, a path, a model id).
        momentum: a moving-average teacher: the decay with which it follows the student after every optimiser
            step (see :meth:`~selfsup3d.objectives.PretrainObjective.update_ema`); ``None``: fixed.
    """

    def __init__(
        self,
        module: Encoder,
        reproducible: bool = False,
        source: str = "copy of the encoder",
        momentum: float | None = None,
    ) -> None:
        super().__init__()
        self.module = module.requires_grad_(False)
        self.reproducible = reproducible and momentum is None
        self.source = source
        self.momentum = momentum

    @property
    def encoder(self) -> Encoder:
        return self.module

    @torch.no_grad()
    def forward(self, images: Tensor) -> EncoderOutput:
        with _eval_mode(self.module):
            return self.module(images)


def make_teacher(encoder: Encoder, reproducible: bool = False) -> FrozenTeacher:
    """A frozen copy of ``encoder`` as it is now."""
    return FrozenTeacher(copy.deepcopy(encoder), reproducible=reproducible)


_SHARED: ContextVar[dict[tuple[str, int, str | None], FrozenTeacher] | None] = ContextVar("teachers", default=None)


@contextmanager
def sharing_teachers() -> Iterator[None]:
    """Teachers that :func:`build_teacher` builds inside this block with the same spec over the same encoder (and
    fine-tuning source) are one :class:`FrozenTeacher`, built once: the objectives of a multi-task run that name
    the same teacher share one frozen copy. A shared moving-average teacher is updated once per step (modules are
    visited once), and a shared copy of the encoder is the encoder as built, before any objective changes it."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def build_teacher(spec: str | None, encoder: Encoder, init_encoder_from: str | None = None) -> FrozenTeacher:
    """The frozen teacher for ``spec``; inside :func:`sharing_teachers`, the one already built for the same spec
    over the same encoder.

    Args:
        spec: ``None``/``"encoder"`` (a copy of ``encoder`` as built: reproducible when its weights are
            pretrained, from a file, or from ``init_encoder_from``), a weights file (an export with
            selfsup3d metadata builds its own architecture; other files are read into the encoder's
            architecture) or a timm model id (``arch.tag``, ``timm/arch.tag``, ``hf-hub:timm/arch.tag``).
        encoder: the student (its configuration sizes the teacher built from a file or id).
        init_encoder_from: the student's fine-tuning source, if any.
    """
    shared = _SHARED.get()
    key = ("encoder" if spec in (None, "") else spec.strip(), id(encoder), init_encoder_from)
    if shared is not None and key in shared:
        return shared[key]
    teacher = _build_teacher(spec, encoder, init_encoder_from)
    if shared is not None:
        shared[key] = teacher
    return teacher


def _build_teacher(spec: str | None, encoder: Encoder, init_encoder_from: str | None) -> FrozenTeacher:
    if spec is None or spec in ("", "encoder"):
        return make_teacher(encoder, reproducible=bool(init_encoder_from) or encoder.reproducible)
    if spec == "ema" or spec.startswith("ema:"):
        try:
            decay = float(spec.partition(":")[2] or 0.999)
        except ValueError:
            decay = -1.0
        if not 0 <= decay < 1:
            raise ConfigError(
                f"{config_key('teacher')}={spec!r}: a moving-average teacher is 'ema' or 'ema:DECAY', 0 <= DECAY < 1"
            )
        return FrozenTeacher(copy.deepcopy(encoder), source=f"moving average of the encoder ({decay})", momentum=decay)
    config = dict(encoder.config)
    path = Path(spec)
    if path.exists() or spec.endswith(_WEIGHT_SUFFIXES):
        if not path.is_file():
            raise FileNotFoundError(f"{config_key('teacher')}: teacher weights file not found: {spec}")
        if path.suffix == ".safetensors":
            exported = read_export_config(path)
            if exported:
                keep = {k: config[k] for k in ("img_size", "num_out_layers") if k in config}
                if "num_out_layers" in keep and "depth" in exported:  # a shallower teacher gives all its layers
                    keep["num_out_layers"] = min(int(keep["num_out_layers"]), int(exported["depth"]))
                return FrozenTeacher(load_exported_encoder(path, **keep), reproducible=True, source=spec)
        config.update(pretrained=False, checkpoint_path=str(path), grad_checkpointing=False, drop_path_rate=0.0)
        return FrozenTeacher(ViTEncoder(**config), reproducible=True, source=spec)
    model_id = spec.removeprefix("hf-hub:")
    arch = model_id.split("/")[-1].split(".")[0]
    pretrained: bool | str = model_id if "/" in model_id else (f"timm/{model_id}" if "." in model_id else True)
    teacher = ViTEncoder(
        name=arch,
        img_size=int(config.get("img_size", 224)),
        pretrained=pretrained,
        num_out_layers=int(config.get("num_out_layers", 4)),
    )
    return FrozenTeacher(teacher, reproducible=True, source=spec)


def resample_patch_tokens(tokens: Tensor, grid: tuple[int, int], to: tuple[int, int]) -> Tensor:
    """Class + patch tokens ``[B, 1 + h w, C]`` on a ``grid`` resampled (bilinear) to the ``to`` grid."""
    if tuple(grid) == tuple(to):
        return tokens
    b, n, c = tokens.shape
    if n != 1 + grid[0] * grid[1]:
        raise ValueError(f"{n} tokens are not a class token and a {grid[0]}x{grid[1]} patch grid")
    patches = tokens[:, 1:].transpose(1, 2).reshape(b, c, *grid)
    patches = F.interpolate(patches.float(), size=to, mode="bilinear", align_corners=False).to(tokens.dtype)
    return torch.cat([tokens[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)


def distillation_loss(student: Tensor, teacher: EncoderOutput, grid: tuple[int, int]) -> Tensor:
    """MSE between the student's representation ``[B, 1 + N, C]`` on the patch ``grid`` and the teacher's
    concatenated layer tokens, the teacher's patch grid resampled to the student's."""
    target = resample_patch_tokens(teacher.concat_layers().float(), teacher.grid, grid)
    if target.shape != student.shape:
        raise ConfigError(
            f"the student's representation {tuple(student.shape)} and the teacher's {tuple(target.shape)} differ; "
            "give the student a projection to the teacher's width"
        )
    return F.mse_loss(student.float(), target)


def teacher_width(teacher: FrozenTeacher) -> int:
    """Channels of the teacher's concatenated layer tokens (``num_out_layers · embed_dim``)."""
    return int(teacher.encoder.embed_dim) * int(teacher.encoder.num_out_layers)
