"""MultiViewShards: the batch contract, the writer -> datamodule round trip, view choice, crops and K."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from shards import render_scenes, write_multiview_shards

from selfsup3d.datamodules import MultiViewShards
from selfsup3d.datamodules.format import ShardSink
from selfsup3d.datamodules.multiview import (
    StreamClock,
    eval_view_order,
    put_canonical_first,
    window_view_order,
    window_width,
)
from selfsup3d.errors import ConfigError


def _val_batches(dm: MultiViewShards) -> list[dict]:
    dm.setup("validate")
    return [dm.prepare_batch(b, train=False) for b in dm.val_dataloader()]


def test_round_trip_recovers_written_tensors(tmp_path):
    scenes = render_scenes(num_scenes=3, num_views=4, size=32)
    with ShardSink(tmp_path, "val", samples_per_shard=2) as sink:
        for scene in scenes:
            sink.write(scene)
    dm = MultiViewShards(
        sink.url, sink.url, batch_size=2, num_workers=0, image_size=32, num_views=4, with_depth=True, with_masks=True
    )
    batches = _val_batches(dm)
    assert [len(b["key"]) for b in batches] == [2, 1]
    order = eval_view_order(4, 4, 2)
    assert order == [0, 2, 1, 3]
    got = {key: (b, i) for b in batches for i, key in enumerate(b["key"])}
    for scene in scenes:
        b, i = got[scene.key]
        assert b["num_context"] == 2
        expected = torch.from_numpy(np.stack([scene.images[v] for v in order])).permute(0, 3, 1, 2).float() / 255
        assert torch.equal(b["images"][i], expected)  # PNG is lossless
        assert torch.allclose(b["K"][i], torch.from_numpy(scene.K[order]).float())
        assert torch.allclose(b["c2w"][i], torch.from_numpy(scene.c2w[order]).float(), atol=1e-6)
        depth = torch.from_numpy(np.stack([scene.depth[v] for v in order]))[:, None]
        scale = depth.max() / 65534
        assert torch.all((b["depth"][i] - depth).abs() <= scale * 0.51 + 1e-7)  # 16-bit quantisation only
        assert torch.equal(b["depth"][i] == 0, depth == 0)
        masks = torch.from_numpy(np.stack([scene.masks[v] for v in order]))[:, None].float()
        assert torch.equal(b["mask"][i], masks)
        assert b["label"][i] == scene.meta["label"]


def test_batch_contract_types_and_shapes(tmp_path):
    url = write_multiview_shards(tmp_path, num_scenes=4, num_views=5, size=32, num_shards=2)
    dm = MultiViewShards(url, url, batch_size=2, num_workers=0, image_size=(24, 16), num_views=3, with_depth=True,
                         with_masks=True, batches_per_epoch=3, seed=0)  # fmt: skip
    dm.setup("fit")
    train = [dm.prepare_batch(b, train=True) for b in dm.train_dataloader()]
    assert len(train) == 3
    for batch in train + _val_batches(dm):
        assert batch["images"].shape == (2, 3, 3, 24, 16) and batch["images"].dtype == torch.float32
        assert batch["images"].min() >= 0 and batch["images"].max() <= 1
        assert batch["K"].shape == (2, 3, 3, 3) and batch["K"].dtype == torch.float32
        assert batch["c2w"].shape == (2, 3, 4, 4) and batch["c2w"].dtype == torch.float32
        assert batch["depth"].shape == (2, 3, 1, 24, 16) and batch["depth"].dtype == torch.float32
        assert batch["mask"].shape == (2, 3, 1, 24, 16) and batch["mask"].dtype == torch.float32
        assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
        assert batch["label"].dtype == torch.int64 and batch["label"].shape == (2,)
        assert isinstance(batch["key"], list) and all(isinstance(k, str) for k in batch["key"])
        assert batch["num_context"] == 1


def test_depth_when_the_shards_have_it_and_masks_when_requested(tmp_path):
    url = write_multiview_shards(tmp_path, num_scenes=2, num_views=2, num_shards=1)
    dm = MultiViewShards(url, url, batch_size=2, num_workers=0, image_size=32, num_views=2)
    (batch,) = _val_batches(dm)
    assert "depth" in batch and "mask" not in batch  # with_depth null: the shards have depth
    assert dm.data_spec().with_depth and not dm.data_spec().with_masks
    dm = MultiViewShards(url, url, batch_size=2, num_workers=0, image_size=32, num_views=2, with_depth=False)
    (batch,) = _val_batches(dm)
    assert "depth" not in batch and not dm.data_spec().with_depth
    plain = write_multiview_shards(tmp_path / "plain", num_scenes=2, num_views=2, num_shards=1, with_depth=False)
    dm = MultiViewShards(plain, plain, batch_size=2, num_workers=0, image_size=32, num_views=2)
    (batch,) = _val_batches(dm)
    assert "depth" not in batch and not dm.data_spec().with_depth


def test_training_views_are_random_subsets_with_matching_cameras(tmp_path):
    scenes = render_scenes(num_scenes=2, num_views=6, size=32)
    with ShardSink(tmp_path, "train") as sink:
        for scene in scenes:
            sink.write(scene)
    by_key = {s.key: s for s in scenes}
    dm = MultiViewShards(sink.url, None, batch_size=1, num_workers=0, image_size=32, num_views=4,
                         batches_per_epoch=12, shuffle_buffer=0, seed=3)  # fmt: skip
    dm.setup("fit")
    orders = set()
    for batch in dm.train_dataloader():
        scene = by_key[batch["key"][0]]
        views = []
        for slot in range(4):
            image = batch["images"][0, slot].permute(1, 2, 0).numpy()
            match = [v for v in range(6) if np.array_equal(image, scene.images[v])]
            assert match, "a delivered view is not one of the scene's views"
            views.append(match[0])
            assert np.allclose(batch["c2w"][0, slot].numpy(), scene.c2w[match[0]], atol=1e-6)
        assert len(set(views)) == 4
        orders.add(tuple(views))
    assert len(orders) > 3, "training view choice should vary"


def test_validation_is_deterministic(tmp_path):
    url = write_multiview_shards(tmp_path, num_scenes=3, num_views=6, num_shards=2)
    kwargs = dict(batch_size=2, num_workers=0, image_size=32, num_views=4, num_context_views=1)
    a = _val_batches(MultiViewShards(url, url, **kwargs))
    b = _val_batches(MultiViewShards(url, url, **kwargs))
    assert [x["key"] for x in a] == [x["key"] for x in b]
    for x, y in zip(a, b):
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["c2w"], y["c2w"])


def test_eval_view_order_spreads_views_and_context():
    assert eval_view_order(8, 4, 2) == [0, 4, 2, 6]
    assert eval_view_order(4, 4, 1) == [0, 1, 2, 3]
    assert eval_view_order(10, 5, 3) == [0, 2, 6, 4, 8]
    for n, v, c in [(7, 3, 1), (9, 9, 4), (20, 6, 5)]:
        order = eval_view_order(n, v, c)
        assert len(set(order)) == v and all(0 <= i < n for i in order)


def test_crops_keep_intrinsics_consistent(tmp_path):
    """A zoomed random crop and a resize move a projected 3D point exactly as K says."""
    scenes = render_scenes(num_scenes=1, num_views=3, size=64)
    with ShardSink(tmp_path, "train") as sink:
        sink.write(scenes[0])
    scene = scenes[0]
    dm = MultiViewShards(sink.url, None, batch_size=1, num_workers=0, image_size=(40, 48), num_views=3,
                         max_zoom=1.6, batches_per_epoch=4, shuffle_buffer=0, seed=1)  # fmt: skip
    dm.setup("fit")
    full = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in scene.images]
    for batch in dm.train_dataloader():
        batch = dm.prepare_batch(batch, train=True)
        for slot in range(3):
            v = next(v for v in range(3) if np.allclose(batch["c2w"][0, slot].numpy(), scene.c2w[v], atol=1e-6))
            K_new = batch["K"][0, slot].double()
            # the delivered pixel centres, mapped back through the intrinsics, sample the original image
            ys, xs = torch.meshgrid(torch.arange(40) + 0.5, torch.arange(48) + 0.5, indexing="ij")
            pix = torch.stack([xs, ys, torch.ones_like(xs)], -1).double()
            src = pix @ (torch.from_numpy(scene.K[v]) @ torch.linalg.inv(K_new)).T
            grid = torch.stack([src[..., 0] / 32 - 1, src[..., 1] / 32 - 1], -1)[None].float()
            resampled = torch.nn.functional.grid_sample(full[v][None], grid, align_corners=False)[0]
            err = (resampled - batch["images"][0, slot]).abs().mean()
            assert err < 0.04, f"crop/intrinsics mismatch: mean error {err:.3f}"
            assert K_new[0, 0] > scene.K[v][0, 0] * 40 / 64 * 0.99  # zoomed in or equal


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_views=4, num_context_views=4), "data.init_args.num_context_views"),
        (dict(num_views=4, num_context_views=0), "data.init_args.num_views"),
        (dict(num_views=1), "data.init_args.num_views"),
        (dict(batch_size=0), "data.init_args.batch_size"),
        (dict(image_size=(32, 0)), "data.init_args.image_size"),
        (dict(max_zoom=0.5), "data.init_args.max_zoom"),
        (dict(val_batches=0), "data.init_args.val_batches"),
    ],
)
def test_impossible_settings_raise_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MultiViewShards("x.tar", **kwargs)


def test_color_jitter_is_shared_by_the_views_of_a_scene(tmp_path):
    url = write_multiview_shards(tmp_path, num_scenes=2, num_views=2, num_shards=1)
    dm = MultiViewShards(url, url, batch_size=2, num_workers=0, image_size=32, num_views=2, color_jitter=True,
                         jitter_strength=0.5)  # fmt: skip
    dm.setup("validate")
    raw = next(iter(dm.val_dataloader()))
    # the same image in both view slots: any per-view difference would come from the jitter
    raw["images"][:, 1] = raw["images"][:, 0]
    plain = dm.prepare_batch({**raw, "images": raw["images"].clone()}, train=False)["images"]
    torch.manual_seed(0)
    jittered = dm.prepare_batch({**raw, "images": raw["images"].clone()}, train=True)["images"]
    assert not torch.allclose(jittered, plain)
    assert torch.allclose(jittered[:, 0], jittered[:, 1], atol=1e-6)
    assert not torch.allclose(jittered[0, 0] - plain[0, 0], jittered[1, 0] - plain[1, 0], atol=1e-3)


def test_pipe_urls_are_read(tmp_path):
    url = write_multiview_shards(tmp_path, num_scenes=2, num_views=2, num_shards=1, split="val")
    dm = MultiViewShards(f"pipe:cat {url}", f"pipe:cat {url}", batch_size=2, num_workers=0, image_size=32,
                         num_views=2)  # fmt: skip
    (batch,) = _val_batches(dm)
    assert len(batch["key"]) == 2


# ---------------------------------------------------------------- view-overlap curriculum (windows of views)
def test_window_width_follows_its_schedule_in_whole_views():
    assert [window_width(4, 12, 8, s) for s in (0, 1, 4, 7, 8, 100)] == [4, 5, 8, 11, 12, 12]
    assert window_width(4, 12, 0, 0) == 12  # no schedule: the end width at once
    assert window_width(6, 6, 10, 3) == 6


def test_window_view_order_stays_in_a_window_of_consecutive_views():
    rng = random.Random(0)
    starts = set()
    for _ in range(200):
        order = window_view_order(24, 6, 4, 8, rng)
        assert len(set(order)) == 6 and max(order) - min(order) < 8
        assert order[4:] == sorted(order[4:])  # targets in trajectory order
        starts.update((min(order), max(order)))
    assert min(starts) == 0 and max(starts) == 23  # the window moves over the whole trajectory
    # validation: a centred window, views evenly spread in it, the context evenly spaced among them
    assert window_view_order(24, 4, 2, 8, None) == [8, 12, 10, 14]
    assert window_view_order(24, 4, 2, 100, None) == window_view_order(24, 4, 2, 24, None) == [0, 12, 6, 18]


def test_canonical_middle_puts_the_middle_context_view_first():
    assert put_canonical_first([3, 9, 5, 7, 1], "middle") == [5, 1, 3, 7, 9]
    assert put_canonical_first([3, 9, 5], "random") == [3, 9, 5]
    rng = random.Random(1)
    for _ in range(50):
        order = window_view_order(16, 6, 3, 10, rng, canonical="middle")
        context = sorted(order[:3])
        assert order[0] == context[1]


def _view_indices(batch, scenes_by_key, num_views):
    out = []
    for i, key in enumerate(batch["key"]):
        scene = scenes_by_key[key]
        views = []
        for slot in range(batch["images"].shape[1]):
            image = batch["images"][i, slot].permute(1, 2, 0).numpy()
            views.append(next(v for v in range(num_views) if np.array_equal(image, scene.images[v])))
        out.append(views)
    return out


def test_training_windows_widen_with_the_step_the_batch_is_trained_at(tmp_path):
    scenes = render_scenes(num_scenes=2, num_views=10, size=16)
    with ShardSink(tmp_path, "train") as sink:
        for scene in scenes:
            sink.write(scene)
    by_key = {s.key: s for s in scenes}
    dm = MultiViewShards(sink.url, sink.url, batch_size=2, num_workers=0, image_size=16, num_views=3,
                         num_context_views=2, view_window=[3, 9], window_steps=6, batches_per_epoch=12,
                         shuffle_buffer=0, seed=0)  # fmt: skip
    dm.setup("fit")
    assert [dm.window_width(s) for s in (0, 3, 6)] == [3, 6, 9]
    epochs = [[[max(v) - min(v) + 1 for v in _view_indices(b, by_key, 10)] for b in dm.train_dataloader()]]
    epochs.append([[max(v) - min(v) + 1 for v in _view_indices(b, by_key, 10)] for b in dm.train_dataloader()])
    first = epochs[0]
    assert all(max(spans) <= dm.window_width(step) for step, spans in enumerate(first)), first
    assert max(first[0]) <= 3 and max(max(spans) for spans in first[6:]) > 6, first
    assert max(max(spans) for spans in epochs[1]) > 6  # the second epoch's steps are past the schedule
    (val,) = list(dm.val_dataloader())
    assert _view_indices(val, by_key, 10)[0] == window_view_order(10, 3, 2, 9, None)


def test_the_stream_clock_counts_batches_as_the_loader_gives_them():
    """With W workers the loader takes their batches in turn, so worker w's i-th batch is batch i·W + w."""
    clock = StreamClock(batch_size=4, batches_per_epoch=100)
    clock.position = (0, 0, 0, 1)
    assert clock.step() == 0
    clock.position = (0, 9, 0, 1)  # the 10th sample: the third batch
    assert clock.step() == 2
    clock.position = (2, 9, 1, 3)  # epoch 2, worker 1 of 3, its third batch
    assert clock.step() == 200 + 2 * 3 + 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_views=4, view_window=[3, 8]), "data.init_args.view_window"),
        (dict(num_views=4, view_window=[8, 6]), "data.init_args.view_window"),
        (dict(num_views=4, view_window=[4, 8], window_steps=-1), "data.init_args.window_steps"),
        (dict(num_views=4, canonical_view="last"), "data.init_args.canonical_view"),
    ],
)
def test_bad_windows_raise_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MultiViewShards("x.tar", **kwargs)


def test_a_window_wider_than_the_scenes_is_refused_at_setup(tmp_path):
    url = write_multiview_shards(tmp_path, num_scenes=1, num_views=4, size=16, num_shards=1)
    dm = MultiViewShards(url, None, batch_size=1, num_workers=0, image_size=16, num_views=3, view_window=[3, 6])
    with pytest.raises(ConfigError, match="view_window"):
        dm.setup("fit")
