"""The encoder interface every objective, head, probe and callback is typed against.

:class:`Encoder` is the type of every ``encoder`` argument in selfsup3d: nothing reaches into an encoder with
``getattr`` and a default. An encoder takes images in ``[0, 1]`` and returns an :class:`EncoderOutput`; it
says how wide its tokens are, how big its patches are and how many layers' tokens it returns; it builds its
own optimiser parameter groups (so layer-wise learning-rate decay knows its blocks), loads weights from the
files people have, exports its weights, and says whether its initial weights can be rebuilt from its
configuration (a teacher copied from it then needs no saving). :class:`~selfsup3d.encoders.ViTEncoder`
(timm) is the implementation the configs use; another backbone is a subclass of :class:`Encoder`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfsup3d.errors import config_key


@dataclass
class EncoderOutput:
    """What one forward pass of an encoder gives.

    Attributes:
        cls: ``[B, D]`` final-normed class token.
        patches: ``[B, N, D]`` final-normed patch tokens, row-major over the patch grid.
        grid: ``(h, w)`` of the patch grid, ``N = h * w``.
        layers: the last ``num_out_layers`` blocks' tokens, each ``[B, 1 + N, D]`` (class token first,
            register tokens dropped), final-normed; oldest first.
    """

    cls: Tensor
    patches: Tensor
    grid: tuple[int, int]
    layers: list[Tensor] = field(default_factory=list)

    @property
    def patch_grid(self) -> Tensor:
        """Patch tokens as a ``[B, D, h, w]`` feature map."""
        b, _, d = self.patches.shape
        return self.patches.transpose(1, 2).reshape(b, d, *self.grid)

    def concat_layers(self) -> Tensor:
        """Class and patch tokens of the collected layers concatenated on channels: ``[B, 1 + N, L * D]``.

        This is the representation of the 3D-Prior paper (last four layers)."""
        if not self.layers:
            raise ValueError("encoder was built with num_out_layers=0; no layer tokens to concatenate")
        return torch.cat(self.layers, dim=-1)


class Encoder(nn.Module, ABC):
    """Base class of the shared encoder (see the module docstring).

    Subclasses set :attr:`config` (their constructor arguments, plain data, so checkpoints rebuild them)
    and implement the abstract members."""

    config: dict[str, Any]

    def __init__(self) -> None:
        super().__init__()
        self.key_prefix = config_key("encoder.init_args")

    def key(self, name: str) -> str:
        """The YAML key of this encoder's argument ``name`` (``model.init_args.encoder.init_args.<name>``)."""
        return config_key(name, prefix=self.key_prefix)

    @property
    @abstractmethod
    def embed_dim(self) -> int:
        """Width ``D`` of the tokens."""

    @property
    @abstractmethod
    def patch_size(self) -> int:
        """Pixels per patch side; image sides must be multiples of it."""

    @property
    @abstractmethod
    def num_out_layers(self) -> int:
        """How many of the last blocks' tokens :attr:`EncoderOutput.layers` carries."""

    @property
    def image_size(self) -> int | None:
        """The image side the encoder was built for (``img_size``: the grid of its position embeddings; other sizes
        work, interpolated), or ``None`` when it has none."""
        size = self.config.get("img_size")
        return None if size is None else int(size)

    @property
    @abstractmethod
    def reproducible(self) -> bool:
        """Whether the initial weights can be rebuilt from :attr:`config` (pretrained or a weights file);
        a randomly initialised encoder cannot."""

    @abstractmethod
    def forward(self, images: Tensor) -> EncoderOutput:
        """Encode ``[B, 3, H, W]`` images in ``[0, 1]``; ``H`` and ``W`` multiples of :attr:`patch_size`."""

    @abstractmethod
    def param_groups(self, weight_decay: float, layer_decay: float | None) -> list[dict[str, Any]]:
        """Optimiser parameter groups (``params``, ``weight_decay``, ``lr_scale``): no weight decay on norms,
        biases, embeddings and tokens; with ``layer_decay`` the ``lr_scale`` falls with depth from the top."""

    @abstractmethod
    def load_weights(self, source: str | Path) -> None:
        """Load weights strictly from a file (its format is the encoder's to know); mismatches raise
        :class:`~selfsup3d.errors.CheckpointMismatchError` naming them."""

    @abstractmethod
    def export_state_dict(self) -> dict[str, Tensor]:
        """The weights to export, under the key schema the exported file documents."""

    @abstractmethod
    def reinitialize(self) -> None:
        """Re-draw the weights at random (the 3D-Prior paper's random-initialisation ablation)."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (no-op unless the encoder supports it)."""
