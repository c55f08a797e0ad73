"""Sharded training (FSDP) for selfsup3d objectives: :class:`EncoderFSDP`, opt-in beside the default DDP.

Every timm transformer ``Block`` outside the frozen teachers becomes its own FSDP unit (the encoder's blocks
and the heads' blocks built from timm's ``Block``); the rest of the trainable model (embeddings, norms, heads)
is the root unit. Frozen teachers are **replicated**: FSDP ignores them, so each rank keeps a whole copy on its
device and their forward needs no all-gather; they never train, so nothing has to be reduced for them.
``use_orig_params`` is on, so frozen and trainable parameters may share a unit and the optimiser's parameter
groups (weight decay, layer decay) see the original parameters. Checkpoints are single files (``full``)
unless ``state_dict_type: sharded``.

In YAML, stacked on a GPU config (see ``configs/gpu/fsdp.yaml`` and ``docs/lifecycle.md``)::

    trainer:
      strategy:
        class_path: selfsup3d.distributed.EncoderFSDP
        init_args: {sharding_strategy: FULL_SHARD}

Not run on a GPU in this project yet: ``tests/test_distributed.py`` checks the wrapping on the CPU (gloo,
one process) only.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.strategies import FSDPStrategy
from timm.models.vision_transformer import Block
from torch import nn

from selfsup3d.encoders.teacher import FrozenTeacher


def frozen_teachers(model: nn.Module) -> list[nn.Module]:
    """The outermost frozen teachers inside ``model`` (the modules FSDP is told to ignore)."""
    found: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, FrozenTeacher) and not any(module in set(t.modules()) for t in found):
            found.append(module)
    return found


def block_policy() -> Any:
    """FSDP's wrap policy: one unit per timm ``Block`` (ignored modules, i.e. teachers, are never wrapped)."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return ModuleWrapPolicy({Block})


class EncoderFSDP(FSDPStrategy):
    """Lightning's FSDP strategy with selfsup3d's wrapping (see the module docstring).

    Args:
        sharding_strategy: ``FULL_SHARD`` (parameters, gradients and optimiser state sharded),
            ``SHARD_GRAD_OP`` (parameters gathered for the whole step), ``HYBRID_SHARD`` (shard within a node,
            replicate across nodes) or ``NO_SHARD`` (DDP-like).
        state_dict_type: ``full`` (one checkpoint file, loadable by everything in selfsup3d) or ``sharded``
            (a folder per checkpoint, faster for large models).
        activation_checkpointing: recompute every wrapped ``Block`` in the backward pass (FSDP's own; instead of
            the encoder's ``grad_checkpointing``, not with it).
        **kwargs: Lightning's ``FSDPStrategy`` arguments (``cpu_offload``, ``process_group_backend``, ...).
    """

    def __init__(
        self,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "full",
        activation_checkpointing: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            auto_wrap_policy=block_policy(),
            activation_checkpointing_policy={Block} if activation_checkpointing else None,
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            use_orig_params=True,
            **kwargs,
        )

    def wrap_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """The keyword arguments FSDP gets for ``model`` beside Lightning's own (device, precision, sharding):
        the wrap policy, ``use_orig_params`` and the teachers to ignore (moved to this rank's device: FSDP does
        not move what it ignores)."""
        teachers = frozen_teachers(model)
        for teacher in teachers:
            teacher.to(self.root_device)
        return {**self.kwargs, "ignored_modules": teachers} if teachers else dict(self.kwargs)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        self.kwargs = self.wrap_kwargs(model)
        return super()._setup_model(model)
