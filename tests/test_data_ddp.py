"""Several ranks: every rank gets the same number of training and validation batches whatever the number and
sizes of the shards, so DDP never waits on a rank that ran dry."""

from __future__ import annotations

import json
import math
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from shards import render_scenes

from selfsup3d.datamodules import MultiViewShards, SingleViewShards
from selfsup3d.datamodules.format import ShardSink


def _uneven_shards(directory: Path, sizes: tuple[int, ...] = (1, 2, 4), split: str = "val") -> list[str]:
    """``len(sizes)`` shards holding ``sizes`` scenes (4 views, 16x16)."""
    scenes = render_scenes(num_scenes=sum(sizes), num_views=4, size=16, split="val")
    urls, start = [], 0
    for n, size in enumerate(sizes):
        with ShardSink(directory / f"part{n}", split) as sink:
            for scene in scenes[start : start + size]:
                sink.write(scene)
        start += size
        urls.append(sink.url)
    return urls


def _as_rank(dm, rank: int, world_size: int):
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size, training=False)
    return dm


@pytest.mark.parametrize(("world_size", "num_workers"), [(2, 0), (3, 0), (2, 2)])
def test_validation_batches_are_equal_on_every_rank(tmp_path, world_size, num_workers):
    urls = _uneven_shards(tmp_path)
    counts, keys = [], []
    for rank in range(world_size):
        dm = _as_rank(MultiViewShards(urls, urls, batch_size=2, num_workers=num_workers, image_size=16, num_views=4),
                      rank, world_size)  # fmt: skip
        dm.setup("validate")
        batches = list(dm.val_dataloader())
        counts.append((len(batches), sum(len(b["key"]) for b in batches)))
        keys.extend(k for b in batches for k in b["key"])
    assert len(set(counts)) == 1, counts
    assert len(set(keys)) == 7  # every scene is validated by some rank
    assert len(keys) <= 7 + world_size * max(1, num_workers)  # few repeats


def test_single_view_validation_of_multiview_scenes_is_equal_on_every_rank(tmp_path):
    urls = _uneven_shards(tmp_path, sizes=(1, 2))
    counts = []
    for rank in range(2):
        dm = _as_rank(SingleViewShards(urls, urls, batch_size=3, num_workers=0, image_size=16), rank, 2)
        dm.setup("validate")
        counts.append(sum(len(b["key"]) for b in dm.val_dataloader()))
    assert counts[0] == counts[1] == 8  # 3 scenes x 4 views = 12 views: 8 + 4, padded to 8


def test_training_epochs_have_batches_per_epoch_on_every_rank(tmp_path):
    urls = _uneven_shards(tmp_path, split="train")
    for rank in range(2):
        dm = _as_rank(MultiViewShards(urls, None, batch_size=2, num_workers=0, image_size=16, num_views=3,
                                      batches_per_epoch=5, seed=0), rank, 2)  # fmt: skip
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert [len(list(loader)) for _ in range(2)] == [5, 5]


class _CountBatches(LightningModule):
    """Counts batches per rank and epoch; a collective in every step makes uneven counts hang (then time out)."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.layer = torch.nn.Linear(3, 1)
        self.counts = {"train": 0, "val": 0}

    def training_step(self, batch, batch_idx):
        self.counts["train"] += 1
        return self.layer(batch["images"].mean(dim=(1, 3, 4))).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.counts["val"] += 1
        self.all_gather(torch.ones(()))  # a collective per step
        self.log("val/mean", batch["images"].mean(), sync_dist=True)

    def on_train_epoch_end(self) -> None:
        path = Path(self.out) / f"rank{self.global_rank}_epoch{self.current_epoch}.json"
        path.write_text(json.dumps(self.counts))
        self.counts = {"train": 0, "val": 0}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


# about 16 s on two cores, most of it importing in the spawned processes: worth it, real DDP in `make test`
def test_two_process_ddp_over_uneven_shards_finishes_every_epoch(tmp_path):
    """Two CPU processes (gloo), three shards of 1, 2 and 4 scenes: both ranks run every epoch to the end.
    The fast tests above check the same equal counts with simulated ranks in one process."""
    train = _uneven_shards(tmp_path / "train", split="train")
    val = _uneven_shards(tmp_path / "val")
    dm = MultiViewShards(train, val, batch_size=2, num_workers=0, image_size=16, num_views=3, batches_per_epoch=3,
                         seed=0)  # fmt: skip
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)),
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(_CountBatches(str(tmp_path)), datamodule=dm)
    expected_val = math.ceil(math.ceil(7 / 2) / 2)  # 7 scenes over 2 ranks, batches of 2
    for epoch in range(2):
        counts = [json.loads((tmp_path / f"rank{r}_epoch{epoch}.json").read_text()) for r in range(2)]
        assert counts[0] == counts[1] == {"train": 3, "val": expected_val}
