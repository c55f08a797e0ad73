"""Write the encoder (timm weights + config) next to the checkpoints, so a run's result is usable
without the objective's code: ``RUN/encoder.safetensors``."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from selfsup3d.checkpoint_io import save_safetensors
from selfsup3d.encoders.export import save_encoder, timm_metadata
from selfsup3d.objectives.base import PretrainObjective


class EncoderExport(Callback):
    """Export the encoder at the end of fitting, when fitting is interrupted, and optionally at every checkpoint
    save.

    Args:
        filename: file name inside ``dirpath`` (a ``.safetensors`` file).
        dirpath: output folder; ``null`` means the trainer's log directory.
        on_checkpoint: also export whenever a checkpoint is saved (the file is overwritten).
    """

    def __init__(self, filename: str = "encoder.safetensors", dirpath: str | None = None, on_checkpoint: bool = False):
        self.filename = filename
        self.dirpath = dirpath
        self.on_checkpoint = on_checkpoint
        self.last_path: Path | None = None

    def _target(self, trainer: Trainer) -> Path:
        # trainer.log_dir broadcasts from rank 0: every rank must ask, not only the one that writes
        root = self.dirpath or trainer.log_dir or trainer.default_root_dir
        return Path(root) / self.filename

    def export(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the encoder to ``dirpath/filename`` (rank 0 writes; every rank must call it)."""
        self._write(pl_module, self._target(trainer))

    @rank_zero_only
    def _write(self, pl_module: LightningModule, target: Path) -> None:
        state = pl_module.encoder_state_dict()
        config = getattr(pl_module.encoder, "config", None)
        self.last_path = save_encoder(
            state,
            {**(config or {}), "checkpoint_path": None, "pretrained": False},
            target,
            **timm_metadata(pl_module.encoder),
        )
        rank_zero_info(f"encoder exported to {self.last_path}")
        if isinstance(pl_module, PretrainObjective):  # other products (the consensus objective's 3D backbone)
            for name, component in pl_module.components():
                for stem, (product, meta) in component.exports().items():
                    path = target.with_name(f"{name}_{stem}.safetensors" if name else f"{stem}.safetensors")
                    save_safetensors(product, path, {"selfsup3d": json.dumps(meta)})
                    rank_zero_info(f"{stem} exported to {path}")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.export(trainer, pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """An interrupted fit (Ctrl-C, SIGTERM, a crash) still leaves the encoder as it was, next to the
        checkpoint that ``save_on_exception`` writes; a failure here never hides the original exception. Before
        the first step (or before a resumed run's weights are restored) there is nothing to keep, and an earlier
        export in the same folder is left alone."""
        if trainer.state.fn != "fit" or trainer.global_step == 0:
            return
        try:
            self.export(trainer, pl_module)
        except Exception as err:
            rank_zero_warn(f"encoder export after {type(exception).__name__} failed: {err}")

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if self.on_checkpoint:
            self.export(trainer, pl_module)
