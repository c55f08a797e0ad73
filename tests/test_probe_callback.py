"""The online probe callback: tiny CPU fits on multi-view shards, single-view shards and dicts of named
batches, logging the encoder beside its frozen reference (scalars and the TensorBoard bar chart)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import tiny_encoder
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from probe_synthetic import plane_scene_set
from shards import write_multiview_shards, write_singleview_shards
from torch import nn
from torch.utils.data import DataLoader
from toy import RotationPrediction

from selfsup3d.callbacks import ProbeCallback
from selfsup3d.callbacks.probe import flatten_batch
from selfsup3d.datamodules import MultiViewShards, SingleViewShards
from selfsup3d.objectives.base import PretrainObjective


class MultiViewRotation(PretrainObjective):
    """Rotation prediction on every view of multi-view batches (any objective will do for the callback)."""

    def __init__(self, encoder: nn.Module, freeze_encoder: bool = False, **kwargs) -> None:
        super().__init__(encoder, **kwargs)
        self.head = nn.Linear(encoder.embed_dim, 4)
        if freeze_encoder:
            self.encoder.requires_grad_(False)

    input_kind = "multi_view"

    def step(self, batch: dict, stage: str, encoder: nn.Module) -> dict:
        images = batch["images"].flatten(0, 1)
        k = torch.arange(images.shape[0], device=images.device) % 4
        rotated = torch.stack([torch.rot90(im, int(r), dims=(1, 2)) for im, r in zip(images, k)])
        return {"loss": F.cross_entropy(self.head(encoder(rotated).cls), k)}


def _trainer(tmp_path, callback: ProbeCallback, steps: int, logger=False) -> Trainer:
    return Trainer(
        accelerator="cpu",
        max_steps=steps,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=logger,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )


def _multiview(tmp_path) -> MultiViewShards:
    train = write_multiview_shards(tmp_path / "mv", num_scenes=6, num_views=4, size=32, split="train")
    val = write_multiview_shards(tmp_path / "mv", num_scenes=4, num_views=4, size=32, split="val")
    return MultiViewShards(train, val, batch_size=2, num_workers=0, image_size=32, num_views=4, with_depth=True,
                           batches_per_epoch=6, shuffle_buffer=0, seed=0)  # fmt: skip


def test_multiview_fit_logs_probes_beside_the_reference_and_a_chart(tmp_path):
    torch.manual_seed(0)
    probe = ProbeCallback(probes=("correspondence", "depth", "normals", "linear", "knn"), num_classes=15, knn_k=3)
    model = MultiViewRotation(tiny_encoder(), lr=1e-3, warmup_steps=0)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _trainer(tmp_path, probe, steps=6, logger=logger)
    trainer.fit(model, _multiview(tmp_path))
    m = probe.last_metrics
    for key in ("corr@0.025", "corr@0.05", "corr@0.1", "depth_rmse", "depth_delta1", "normal_deg", "knn_acc"):
        assert key in m and f"ref_{key}" in m, key
        assert f"val/probe3d/{key}" in trainer.callback_metrics and f"val/probe3d/ref_{key}" in trainer.callback_metrics
    assert "corr@0.05/rot60-180" in m or "corr@0.05/rot30-60" in m
    assert 0.0 <= m["corr@0.05"] <= 1.0 and m["depth_rmse"] > 0
    assert "linear_acc" in m and probe.train_steps == 6
    logger.experiment.flush()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "probe3d/bars" in events.Tags()["images"]
    assert "val/probe3d/corr@0.05" in events.Tags()["scalars"]
    assert "val/probe3d/ref_depth_rmse" in events.Tags()["scalars"]
    state = probe.state_dict()
    assert set(state["heads"]) and state["train_steps"] == 6


def test_a_frozen_encoder_measures_the_same_as_its_reference(tmp_path):
    """The reference is a frozen copy of the encoder at fit start: an encoder that does not train gives the
    same correspondence figures as its reference, to the last digit."""
    torch.manual_seed(0)
    probe = ProbeCallback(probes=("correspondence",))
    model = MultiViewRotation(tiny_encoder(), freeze_encoder=True, lr=1e-3, warmup_steps=0)
    _trainer(tmp_path, probe, steps=6).fit(model, _multiview(tmp_path))
    m = probe.last_metrics
    assert m["corr@0.05"] == m["ref_corr@0.05"] and m["corr@0.1"] == m["ref_corr@0.1"]
    assert probe.reference_encoder(model) is probe._reference


def test_singleview_fit_logs_depth_and_classification(tmp_path):
    torch.manual_seed(0)
    train = write_singleview_shards(tmp_path / "sv", num_samples=16, size=32, split="train")
    val = write_singleview_shards(tmp_path / "sv", num_samples=8, size=32, split="val")
    data = SingleViewShards(train, val, batch_size=8, num_workers=0, image_size=32, with_depth=True,
                            batches_per_epoch=4, shuffle_buffer=0, seed=0)  # fmt: skip
    probe = ProbeCallback(num_classes=15, knn_k=3)
    _trainer(tmp_path, probe, steps=4).fit(RotationPrediction(tiny_encoder(), lr=1e-3, warmup_steps=0), data)
    m = probe.last_metrics
    assert {"depth_rmse", "ref_depth_rmse", "linear_acc", "knn_acc", "ref_knn_acc"} <= m.keys()
    assert not any(k.startswith("corr") or k.startswith("ref_corr") for k in m)  # no cameras: no correspondence


# ---------------------------------------------------------------------------- dicts of named batches
def _items(multiview: bool, seed: int) -> list[dict]:
    s = plane_scene_set(4, num_views=4, size=32, seed=seed)
    out = []
    for i in range(len(s)):
        images = s.images[i].float() / 255
        if multiview:
            out.append({"images": images, "depth": s.depth[i], "K": s.K[i], "c2w": s.c2w[i], "label": s.labels[i]})
        else:
            out.extend({"image": images[v], "depth": s.depth[i, v], "label": s.labels[i]} for v in range(4))
    return out


class TwoSources(LightningDataModule):
    def train_dataloader(self):
        return {
            "scenes": DataLoader(_items(True, 0), batch_size=2),
            "images": DataLoader(_items(False, 1), batch_size=4),
        }

    def val_dataloader(self):
        return {
            "scenes": DataLoader(_items(True, 2), batch_size=2),
            "images": DataLoader(_items(False, 3), batch_size=4),
        }


class MultiTaskToy(LightningModule):
    """One encoder, a dict of named batches (as a multi-task run gets)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = tiny_encoder()
        self.head = nn.Linear(32, 1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = torch.zeros(())
        for b in batch.values():
            images = b["images"].flatten(0, 1) if "images" in b else b["image"]
            loss = loss + self.head(self.encoder(images).cls).square().mean()
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_dict_of_named_batches(tmp_path):
    torch.manual_seed(0)
    probe = ProbeCallback(num_classes=3, knn_k=3)
    _trainer(tmp_path, probe, steps=4).fit(MultiTaskToy(), TwoSources())  # one epoch: 4 batches of images
    m = probe.last_metrics
    # validation loaders of a dict arrive one by one: dataloader0 = scenes, dataloader1 = images
    assert "dataloader0/corr@0.05" in m and "dataloader0/ref_corr@0.05" in m
    assert "dataloader1/depth_rmse" in m and not any(k.startswith("dataloader1/corr") for k in m)
    assert "dataloader0/knn_acc" in m and "dataloader1/linear_acc" in m


def test_flatten_batch_names_the_sources_and_flattens_views():
    mv = {"images": torch.rand(2, 3, 3, 8, 8), "depth": torch.rand(2, 3, 1, 8, 8), "K": torch.eye(3).expand(2, 3, 3, 3),
          "c2w": torch.eye(4).expand(2, 3, 4, 4), "label": torch.tensor([1, 2])}  # fmt: skip
    sv = {"image": torch.rand(4, 3, 8, 8), "label": torch.tensor([0, 1, 2, -1])}
    parts = dict(flatten_batch({"a": mv, "b": {"c": sv}, "d": None}))
    assert set(parts) == {"a", "b/c"}
    assert parts["a"].views.images.shape == (6, 3, 8, 8) and parts["a"].num_views == 3 and parts["a"].multiview
    assert parts["a"].labels.tolist() == [1, 1, 1, 2, 2, 2]
    assert parts["b/c"].num_views == 1 and not parts["b/c"].multiview and parts["b/c"].views.depth is None
    assert flatten_batch([1, 2]) == [] and flatten_batch({"x": torch.zeros(1)}) == []


def test_the_reference_is_the_objectives_teacher_when_it_has_one(tmp_path):
    from test_triplane import make
    from triplane_synthetic import SphereDataModule

    torch.manual_seed(0)
    probes = ProbeCallback(probes=("depth", "linear"), num_classes=3, lr=1e-2)
    model = make(lambda_dist=1.0)
    _trainer(tmp_path, probes, steps=4).fit(model, SphereDataModule(num_train=12, num_val=6, batch_size=6))
    assert probes.reference_encoder(model) is model.teacher and probes._reference is None
    assert {"depth_rmse", "ref_depth_rmse"} <= probes.last_metrics.keys()
