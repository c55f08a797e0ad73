"""A toy objective and datamodule: what a user writes to plug a new objective in (see README)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule
from torch import nn
from torch.utils.data import DataLoader, Dataset

from selfsup3d.encoders import Encoder
from selfsup3d.objectives.base import PretrainObjective


class RotationPrediction(PretrainObjective):
    """Predict which of four rotations was applied to an image (Gidaris et al. 2018), in 15 lines."""

    input_kind = "single_view"

    def __init__(self, encoder: Encoder, hidden: int = 16, **kwargs) -> None:
        super().__init__(encoder, **kwargs)
        self.head = nn.Sequential(nn.Linear(encoder.embed_dim, hidden), nn.GELU(), nn.Linear(hidden, 4))

    def rotations(self, images: torch.Tensor) -> torch.Tensor:
        return torch.arange(images.shape[0], device=images.device) % 4

    def step(self, batch: dict, stage: str, encoder: Encoder) -> dict:
        images = batch["image"]
        k = self.rotations(images)
        rotated = torch.stack([torch.rot90(im, int(r), dims=(1, 2)) for im, r in zip(images, k)])
        logits = self.head(encoder(rotated).cls)
        loss = F.cross_entropy(logits, k)
        return {"loss": loss, "accuracy": (logits.argmax(-1) == k).float().mean()}


class RandomRotation(RotationPrediction):
    """:class:`RotationPrediction` with a random rotation per image, drawn from the step's random generator (as
    masks and rays are): its losses depend on the per-batch seeds."""

    def rotations(self, images: torch.Tensor) -> torch.Tensor:
        return torch.randint(0, 4, (images.shape[0],), device=images.device)


class _Images(Dataset):
    def __init__(self, n: int, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i]}


class RandomImages(LightningDataModule):
    """Random images, for plumbing tests."""

    def __init__(self, num_samples: int = 16, image_size: int = 32, batch_size: int = 4) -> None:
        super().__init__()
        self.num_samples, self.image_size, self.batch_size = num_samples, image_size, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Images(self.num_samples, self.image_size, 0), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Images(self.batch_size, self.image_size, 1), batch_size=self.batch_size)


class InterruptAt(Callback):
    """Simulates Ctrl-C (or, with ``crash``, a failing step) after ``step`` optimiser steps: at the end of that
    step, or (``mid_step``) once the next batch is fetched, before it is trained on."""

    def __init__(self, step: int = 2, crash: bool = False, mid_step: bool = False) -> None:
        self.step, self.crash, self.mid_step = step, crash, mid_step

    def _interrupt(self, trainer) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError("simulated crash") if self.crash else KeyboardInterrupt

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.mid_step:
            self._interrupt(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.mid_step:
            self._interrupt(trainer)


def tiny_encoder_config(num_out_layers: int = 2, **init_args) -> dict:
    """The ``encoder`` entry of a test config: a 2-block, 32-wide ViT on 32x32 images in patches of 8."""
    args = {"name": "tiny", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    return {
        "class_path": "selfsup3d.encoders.ViTEncoder",
        "init_args": {**args, "num_out_layers": num_out_layers, **init_args},
    }


class MarkStep(Callback):
    """Writes ``path`` once ``step`` optimiser steps are done, then slows every later step by ``sleep`` seconds:
    a run another process can interrupt mid-epoch, at a known point."""

    def __init__(self, path: str, step: int = 2, sleep: float = 0.05) -> None:
        self.path, self.step, self.sleep = path, step, sleep

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time
        from pathlib import Path

        if trainer.global_step >= self.step:
            Path(self.path).touch()
            time.sleep(self.sleep)


class RecordProgress(Callback):
    """Writes what the progress bar shows (totals, epoch text, version) during the first training and validation
    batch of the second epoch to ``path`` (JSON)."""

    def __init__(self, path: str) -> None:
        self.path, self.seen = path, {}

    def _description(self, trainer) -> str:
        bar = trainer.progress_bar_callback
        if hasattr(bar, "_get_train_description"):  # Rich
            return bar._get_train_description(trainer.current_epoch).strip()
        return str(bar.train_progress_bar.desc).rstrip(": ")

    def _record(self, trainer, pl_module, stage: str) -> None:
        import json

        bar = trainer.progress_bar_callback
        if trainer.sanity_checking or trainer.current_epoch < 1 or stage in self.seen:
            return
        total = bar.total_train_batches if stage == "train" else bar.total_val_batches_current_dataloader
        self.seen[stage] = {
            "total": total if total != float("inf") else None,
            "description": self._description(trainer),
            "v_num": bar.get_metrics(trainer, pl_module).get("v_num"),
            "version": trainer.logger.version,
        }
        with open(self.path, "w") as f:
            json.dump(self.seen, f)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._record(trainer, pl_module, "train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._record(trainer, pl_module, "val")


class CrashAtSetup(Callback):
    """Fails while the fit is set up: before any step, and before a resumed run's weights are restored."""

    def setup(self, trainer, pl_module, stage) -> None:
        raise RuntimeError("crash at setup")


class RecordLosses(Callback):
    """Appends every training step's loss to ``path`` (JSON ``{global step: loss}``), keeping what an earlier
    run of the same file recorded: a resumed run adds its steps to the interrupted run's."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import json
        from pathlib import Path

        if trainer.global_rank != 0:  # one writer (rank 0's loss: its own batch)
            return
        path = Path(self.path)
        seen = json.loads(path.read_text()) if path.exists() else {}
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        seen[str(trainer.global_step)] = None if loss is None else float(loss)
        path.write_text(json.dumps(seen))


class RecordBar(Callback):
    """Appends what the progress bar shows (epoch text, batches done, total) before every training step and at the
    end to ``path`` (JSON ``{global step: [text, done, total]}``), keeping what an earlier run of the file
    recorded, as :class:`RecordLosses` does. Steps at which the bar shows no epoch yet are left out."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _record(self, trainer) -> None:
        import json
        from pathlib import Path

        bar = trainer.progress_bar_callback
        if hasattr(bar, "train_progress_bar_id"):  # Rich
            if bar.train_progress_bar_id is None:
                return
            task = bar.progress.tasks[bar.train_progress_bar_id]
            shown = [task.description.split("]")[-1].strip(), int(task.completed), task.total]
        elif getattr(bar, "train_progress_bar", None) is not None and bar.train_progress_bar.total:  # tqdm
            tqdm = bar.train_progress_bar
            shown = [str(tqdm.desc).rstrip(": "), int(tqdm.n), tqdm.total]
        else:
            return
        path = Path(self.path)
        seen = json.loads(path.read_text()) if path.exists() else {}
        seen[str(trainer.global_step)] = shown
        path.write_text(json.dumps(seen))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._record(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._record(trainer)


class StopAt(Callback):
    """Stops the fit gracefully after ``step`` optimiser steps (as Lightning does on ``should_stop``), at whatever
    point of the epoch: the first half of a run that a resume completes."""

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class FlakyRotation(RotationPrediction):
    """:class:`RotationPrediction` whose loss is NaN at the training batches ``nan_at`` (counted over the run)
    and at every batch from ``nan_from`` on: a run that meets non-finite losses."""

    def __init__(self, encoder: Encoder, nan_at: list[int] | None = None, nan_from: int | None = None, **kwargs):
        super().__init__(encoder, **kwargs)
        self.nan_at, self.nan_from = list(nan_at or []), nan_from
        self.batches = 0

    def step(self, batch: dict, stage: str, encoder: Encoder) -> dict:
        out = super().step(batch, stage, encoder)
        if stage == "train":
            if self.batches in self.nan_at or (self.nan_from is not None and self.batches >= self.nan_from):
                out["loss"] = out["loss"] * float("nan")
            self.batches += 1
        return out
