"""SingleViewShards: the batch contract, round trips, multi-view shards as single views, shared crops/flips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shards import render_scenes, write_multiview_shards, write_singleview_shards

from selfsup3d.datamodules import SingleViewShards
from selfsup3d.datamodules.format import ImageSample, ShardSink
from selfsup3d.errors import ConfigError


def _val(dm: SingleViewShards) -> list[dict]:
    dm.setup("validate")
    return [dm.prepare_batch(b, train=False) for b in dm.val_dataloader()]


def test_round_trip_single_view_samples(tmp_path):
    scenes = render_scenes(num_scenes=2, num_views=3, size=32)
    written = {}
    with ShardSink(tmp_path, "val", samples_per_shard=4) as sink:
        for scene in scenes:
            for v in range(3):
                key = f"{scene.key}_{v}"
                sink.write(ImageSample(key, scene.images[v], scene.depth[v], scene.masks[v], scene.meta["label"]))
                written[key] = (scene, v)
    dm = SingleViewShards(sink.url, sink.url, batch_size=4, num_workers=0, image_size=32, with_masks=True)
    batches = _val(dm)
    assert [len(b["key"]) for b in batches] == [4, 2]
    for b in batches:
        for i, key in enumerate(b["key"]):
            scene, v = written[key]
            assert torch.equal(b["image"][i], torch.from_numpy(scene.images[v]).permute(2, 0, 1).float() / 255)
            depth = torch.from_numpy(scene.depth[v])[None]
            assert torch.allclose(b["depth"][i], depth, atol=float(depth.max()) / 65534)
            assert torch.equal(b["mask"][i], torch.from_numpy(scene.masks[v])[None].float())
            assert b["label"][i] == scene.meta["label"]


def test_batch_contract(tmp_path):
    url = write_singleview_shards(tmp_path, num_samples=8, with_masks=True)
    dm = SingleViewShards(url, url, batch_size=4, num_workers=0, image_size=(24, 28), with_masks=True,
                          batches_per_epoch=2, seed=0)  # fmt: skip
    dm.setup("fit")
    batches = [dm.prepare_batch(b, train=True) for b in dm.train_dataloader()] + _val(dm)
    assert len(batches) == 4
    for b in batches:
        assert b["image"].shape == (4, 3, 24, 28) and b["image"].dtype == torch.float32
        assert b["depth"].shape == (4, 1, 24, 28) and b["depth"].dtype == torch.float32
        assert b["mask"].shape == (4, 1, 24, 28) and b["mask"].dtype == torch.float32
        assert b["label"].dtype == torch.int64 and (b["label"] >= 0).all()
        assert len(b["key"]) == 4


def test_no_depth_without_with_depth_and_unknown_labels(tmp_path):
    image = np.zeros((16, 16, 3), np.uint8)
    with ShardSink(tmp_path, "val") as sink:
        sink.write(ImageSample("a", image))
    dm = SingleViewShards(sink.url, sink.url, batch_size=1, num_workers=0, image_size=16, with_depth=False)
    (batch,) = _val(dm)
    assert set(batch) == {"image", "label", "key"}
    assert batch["label"].tolist() == [-1]


def test_reads_the_views_of_multiview_shards(tmp_path):
    scenes = render_scenes(num_scenes=2, num_views=3, size=32)
    url = write_multiview_shards(tmp_path, num_scenes=2, num_views=3, num_shards=1, split="train")
    dm = SingleViewShards(url, url, batch_size=6, num_workers=0, image_size=32, with_masks=True)
    (batch,) = _val(dm)
    assert batch["key"] == [f"{s.key}_v{v:03d}" for s in scenes for v in range(3)]
    for i, (scene, v) in enumerate((s, v) for s in scenes for v in range(3)):
        assert torch.equal(batch["image"][i], torch.from_numpy(scene.images[v]).permute(2, 0, 1).float() / 255)
        assert batch["label"][i] == scene.meta["label"]
        assert torch.equal(batch["mask"][i, 0], torch.from_numpy(scene.masks[v]).float())
    # training takes views_per_scene random views of each scene
    dm = SingleViewShards(url, None, batch_size=2, num_workers=0, image_size=32, views_per_scene=1,
                          batches_per_epoch=3, shuffle_buffer=0, seed=0)  # fmt: skip
    dm.setup("fit")
    keys = [k for b in dm.train_dataloader() for k in b["key"]]
    assert len(keys) == 6
    for i in range(0, 6, 2):  # one view of each scene per pass, the two scenes in shard order
        assert [k.rsplit("_v", 1)[0] for k in keys[i : i + 2]] == [s.key for s in scenes]


def _gradient_sample(size: int = 48) -> ImageSample:
    """Red encodes the column, green the row; depth and mask are functions of the column."""
    cols = np.tile(np.linspace(0, 255, size), (size, 1))
    rows = cols.T
    image = np.stack([cols, rows, np.full_like(cols, 128)], -1).round().astype(np.uint8)
    depth = 1.0 + cols / 255.0
    mask = cols < 127.5
    return ImageSample("grad", image, depth, mask, label=3)


def test_crop_and_flip_are_shared_by_image_depth_and_mask(tmp_path):
    with ShardSink(tmp_path, "train") as sink:
        sink.write(_gradient_sample())
    dm = SingleViewShards(sink.url, None, batch_size=1, num_workers=0, image_size=24, with_masks=True,
                          crop_scale=(0.2, 0.6), batches_per_epoch=20, shuffle_buffer=0, seed=0)  # fmt: skip
    dm.setup("fit")
    flips = set()
    for batch in dm.train_dataloader():
        batch = dm.prepare_batch(batch, train=True)
        red, depth, mask = batch["image"][0, 0], batch["depth"][0, 0], batch["mask"][0, 0]
        step = 1.0 / 47  # one source pixel of the gradient
        assert (depth - (1.0 + red)).abs().max() < 1.5 * step + 1e-3  # nearest vs bilinear: within a pixel
        far_from_edge = (red - 0.5).abs() > 1.5 * step
        assert torch.equal(mask[far_from_edge], (red[far_from_edge] < 0.5).float())
        flips.add(bool(red[:, 0].mean() > red[:, -1].mean()))
        assert red.max() - red.min() < 0.95  # cropped, not the whole gradient
    assert flips == {True, False}


def test_validation_centre_crop_is_deterministic(tmp_path):
    with ShardSink(tmp_path, "val") as sink:
        sink.write(_gradient_sample())
    dm = SingleViewShards(sink.url, sink.url, batch_size=1, num_workers=0, image_size=(24, 12))
    (a,) = _val(dm)
    (b,) = _val(dm)
    assert torch.equal(a["image"], b["image"])
    red = a["image"][0, 0]
    assert red[:, 0].mean() < red[:, -1].mean()  # never flipped
    assert abs(float(red.mean()) - 0.5) < 0.02  # centred


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(crop_scale=(0.5, 1.5)), "data.init_args.crop_scale"),
        (dict(crop_ratio=(0.0, 1.0)), "data.init_args.crop_ratio"),
        (dict(views_per_scene=0), "data.init_args.views_per_scene"),
        (dict(num_workers=-1), "data.init_args.num_workers"),
    ],
)
def test_impossible_settings_raise_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SingleViewShards("x.tar", **kwargs)


def test_loaders_say_how_many_batches_an_epoch_has(tmp_path):
    """Lightning (and its progress bar) counts with len(): an epoch of the stream, exactly what it yields."""
    url = write_singleview_shards(tmp_path, num_samples=8)
    dm = SingleViewShards(url, url, batch_size=2, num_workers=0, image_size=32, batches_per_epoch=3, val_batches=5)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert len(train) == 3 == sum(1 for _ in train)
    assert len(val) == 5 == sum(1 for _ in val)  # cycles the 4 validation batches
    full = SingleViewShards(url, url, batch_size=2, num_workers=0, image_size=32, val_batches=None)
    full.setup("validate")
    with pytest.raises(TypeError):  # one full pass: its length depends on the shards, so none is claimed
        len(full.val_dataloader())
