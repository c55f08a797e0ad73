"""Bad input: bad samples are skipped with a warning naming shard, key and field, counted and logged;
``strict`` makes them errors; URL patterns that match nothing and files that are not tars fail at set-up."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from shards import render_scenes, write_multiview_shards

from selfsup3d.datamodules import BadSampleWarning, MultiViewShards, SingleViewShards, SkippedSamplesLogger
from selfsup3d.datamodules.format import ImageSample, SampleError, ShardSink, encode_image_sample, encode_scene
from selfsup3d.errors import ConfigError


def _records(num_scenes: int = 2, num_views: int = 3, start: int = 0) -> list[dict]:
    scenes = render_scenes(num_scenes=num_scenes, num_views=num_views, size=16, start=start)
    return [encode_scene(s) for s in scenes]


def _write(tmp_path, records: list[dict], split: str = "val") -> str:
    with ShardSink(tmp_path, split) as sink:
        for record in records:
            sink.write(record)
    return sink.url


def _bad_shard(tmp_path, damage) -> tuple[str, str]:
    """One good scene and one damaged by ``damage(record)``; returns (url, damaged key)."""
    good, bad = _records()
    damage(bad)
    return _write(tmp_path, [good, bad]), bad["__key__"]


def _val_keys(dm) -> list[str]:
    dm.setup("validate")
    return [k for batch in dm.val_dataloader() for k in batch["key"]]


def _corrupt_image(r):
    r["001.png"] = b"\x89PNG\r\n\x1a\n not really a png"


def _missing_view(r):
    del r["002.png"]


def _missing_cameras(r):
    del r["cameras.json"]


def _malformed_json(r):
    r["cameras.json"] = b'{"width": 16, "height": 16, "views": ['


def _malformed_camera(r):
    cameras = json.loads(r["cameras.json"])
    cameras["views"][1]["c2w"][0][0] = 5.0  # not a rotation
    r["cameras.json"] = json.dumps(cameras).encode()


def _nan_camera(r):
    cameras = json.loads(r["cameras.json"])
    cameras["views"][1]["c2w"][2][3] = float("nan")  # written as NaN by json.dumps
    r["cameras.json"] = json.dumps(cameras).encode()


def _null_focal(r):
    cameras = json.loads(r["cameras.json"])
    cameras["views"][0]["K"][0][0] = None  # a writer that turns NaN into null
    r["cameras.json"] = json.dumps(cameras).encode()


def _short_c2w(r):
    cameras = json.loads(r["cameras.json"])
    cameras["views"][1]["c2w"] = cameras["views"][1]["c2w"][:3]
    r["cameras.json"] = json.dumps(cameras).encode()


def _wrong_size(r):
    cameras = json.loads(r["cameras.json"])
    cameras["width"] = 20
    r["cameras.json"] = json.dumps(cameras).encode()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_corrupt_image, r"field 001\.png: cannot decode image"),
        (_missing_view, r"field cameras\.json: cameras\.json lists 3 views; no image for view\(s\) \[2\]"),
        # a scene without cameras.json is unposed, but this one has depth whose scale was in cameras.json
        (_missing_cameras, r"field meta\.json: depth requested \(with_depth\) but the scene has no depth_scale"),
        (_malformed_json, r"field cameras\.json: not valid JSON"),
        (_malformed_camera, r"field cameras\.json: views\[1\]: the rotation part of c2w is not a rotation"),
        (
            _nan_camera,
            r"field cameras\.json: views\[1\]: c2w has 1 non-finite value\(s\) \(NaN or infinite; a JSON "
            r"null reads as NaN\), the first nan at \[2, 3\]",
        ),
        (_null_focal, r"field cameras\.json: views\[0\]: K has 1 non-finite value\(s\) .*, the first nan at \[0, 0\]"),
        (_short_c2w, r"field cameras\.json: views\[1\]: c2w must be a 4x4 matrix, got shape \[3, 4\]"),
        (_wrong_size, r"field 000\.png: image is 16x16, expected 20x16"),
    ],
)
def test_bad_scene_is_skipped_with_a_warning_and_counted_or_raised_when_strict(tmp_path, damage, message):
    url, key = _bad_shard(tmp_path, damage)
    dm = MultiViewShards(url, url, batch_size=2, num_workers=0, image_size=16, num_views=3)
    pattern = rf"skipped a bad validation sample: shard {url}, sample {key}, {message}"
    with pytest.warns(BadSampleWarning, match=pattern):
        keys = _val_keys(dm)
    assert key not in keys and len(keys) == 1
    assert dm.skipped == {"train": 0, "val": 1}
    strict = MultiViewShards(url, url, batch_size=2, num_workers=0, image_size=16, num_views=3, strict=True)
    with pytest.raises(SampleError, match=rf"shard {url}, sample {key}, {message}"):
        _val_keys(strict)


def test_scene_with_too_few_views_is_skipped(tmp_path):
    (short,) = _records(num_scenes=1, num_views=2, start=1)
    url = _write(tmp_path, [*_records(num_scenes=1, num_views=3), short])
    dm = MultiViewShards(url, url, batch_size=2, num_workers=0, image_size=16, num_views=3)
    with pytest.warns(BadSampleWarning, match=rf"sample {short['__key__']}: too few views: the scene has 2, "
                                              r"data.num_views is 3"):  # fmt: skip
        assert len(_val_keys(dm)) == 1


def test_depth_requested_but_absent_is_refused_at_set_up(tmp_path):
    url = write_multiview_shards(tmp_path, num_scenes=2, num_views=2, num_shards=1, with_depth=False, split="val")
    dm = MultiViewShards(url, url, batch_size=2, num_workers=0, image_size=32, num_views=2, with_depth=True)
    with pytest.raises(ConfigError, match=r"data.init_args.with_depth=true but the scenes of .* have no depth"):
        dm.setup("validate")


def test_a_scene_without_depth_among_scenes_with_depth_is_a_bad_sample(tmp_path):
    with_depth = write_multiview_shards(tmp_path / "a", num_scenes=1, num_views=2, num_shards=1, split="val")
    without = write_multiview_shards(tmp_path / "b", num_scenes=1, num_views=2, num_shards=1, with_depth=False,
                                     split="val", seed=5)  # fmt: skip
    dm = MultiViewShards([with_depth, without], None, batch_size=2, num_workers=0, image_size=32, num_views=2)
    dm.val_urls = [with_depth, without]
    no_scale = r"field cameras\.json: depth requested \(with_depth\) but the scene has no depth_scale"
    with pytest.warns(BadSampleWarning, match=no_scale):
        assert len(_val_keys(dm)) == 1
    assert dm.with_depth  # null: the first scene has depth, so depth is read


def test_bad_single_view_samples(tmp_path):
    scene = render_scenes(num_scenes=1, num_views=2, size=16)[0]
    good = encode_image_sample(ImageSample("good", scene.images[0], scene.depth[0], label=1))
    corrupt = encode_image_sample(ImageSample("corrupt", scene.images[1], scene.depth[1]))
    corrupt["depth.png"] = b"junk"
    bad_label = encode_image_sample(ImageSample("badlabel", scene.images[1], scene.depth[1]))
    bad_label["cls"] = b"cat"
    no_image = {k: v for k, v in good.items() if k not in ("png", "jpg")}
    no_image["__key__"] = "noimage"
    url = _write(tmp_path, [good, corrupt, bad_label, no_image])
    dm = SingleViewShards(url, url, batch_size=4, num_workers=0, image_size=16)
    with pytest.warns(BadSampleWarning) as record:
        assert _val_keys(dm) == ["good"]
    messages = [str(w.message) for w in record]
    assert any("sample corrupt, field depth.png: cannot decode image" in m for m in messages)
    assert any("sample badlabel, field cls: not an integer" in m for m in messages)
    assert any("sample noimage, field {png,jpg,jpeg,webp}: missing" in m for m in messages)
    assert dm.skipped["val"] == 3


def test_truncated_shard_is_skipped_and_training_continues(tmp_path):
    good = _write(tmp_path / "a", _records(num_scenes=2), split="train")
    broken = tmp_path / "b" / "train-000000.tar"
    _write(tmp_path / "b", _records(num_scenes=2, start=2), split="train")
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    dm = MultiViewShards([good, str(broken)], None, batch_size=1, num_workers=0, image_size=16, num_views=3,
                         batches_per_epoch=12, shuffle_buffer=0, seed=0)  # fmt: skip
    dm.setup("fit")
    with pytest.warns(BadSampleWarning) as record:
        batches = list(dm.train_dataloader())
    assert len(batches) == 12
    messages = {str(w.message) for w in record}
    assert any(f"shard {broken}" in m for m in messages), messages
    assert not any("duplicate file name" in m for m in messages)  # the broken shard's tail stays apart
    assert dm.skipped["train"] >= 1


def test_every_sample_bad_stops_with_an_explanation(tmp_path):
    records = _records()
    for record in records:
        _malformed_json(record)
    url = _write(tmp_path, records, split="train")
    dm = MultiViewShards(url, None, batch_size=1, num_workers=0, image_size=16, num_views=2, batches_per_epoch=2)
    dm.setup("fit")
    with pytest.warns(BadSampleWarning), pytest.raises(RuntimeError, match="samples in a row were bad"):
        list(dm.train_dataloader())


def test_counts_cross_worker_processes(tmp_path):
    url, key = _bad_shard(tmp_path, _corrupt_image)
    dm = MultiViewShards(url, url, batch_size=2, num_workers=1, image_size=16, num_views=3)
    assert len(_val_keys(dm)) == 1  # the worker's warning goes to its own stderr
    assert dm.skipped["val"] == 1


def test_setup_fails_on_patterns_that_match_nothing_and_non_tar_files(tmp_path):
    url = write_multiview_shards(tmp_path, num_scenes=2, num_views=2, num_shards=2)
    missing = str(tmp_path / "train-{000000..000002}.tar")
    with pytest.raises(ConfigError, match=r"data.init_args.train_urls: shard '.*train-000002.tar' does not exist"):
        MultiViewShards(missing, num_workers=0, num_views=2).setup("fit")
    with pytest.raises(ConfigError, match=r"data.init_args.val_urls: the pattern '.*nothing-\*.tar' matches no file"):
        MultiViewShards(url, str(tmp_path / "nothing-*.tar"), num_workers=0, num_views=2).setup("fit")
    (tmp_path / "notes.tar").write_text("this is not a tar archive\n" * 40)
    with pytest.raises(ConfigError, match=r"data.init_args.train_urls: '.*notes.tar' is not a tar archive"):
        MultiViewShards([url, str(tmp_path / "notes.tar")], num_workers=0, num_views=2).setup("fit")
    with pytest.raises(ConfigError, match=r"is a folder"):
        SingleViewShards(str(tmp_path), num_workers=0).setup("fit")
    with pytest.raises(ConfigError, match=r"data.init_args.train_urls is empty"):
        SingleViewShards([], num_workers=0).setup("fit")
    # globs and fsspec URLs are accepted
    dm = MultiViewShards(str(tmp_path / "train-*.tar"), num_workers=0, num_views=2)
    dm.setup("fit")
    assert len(dm._train_list) == 2


def test_fsspec_urls_are_read(tmp_path):
    import fsspec

    url = write_multiview_shards(tmp_path, num_scenes=2, num_views=2, num_shards=1, split="val")
    with fsspec.open("memory://shards/val-000000.tar", "wb") as f, open(url, "rb") as src:
        f.write(src.read())
    dm = MultiViewShards("memory://shards/val-000000.tar", "memory://shards/val-000000.tar", batch_size=2,
                         num_workers=0, image_size=32, num_views=2)  # fmt: skip
    assert len(_val_keys(dm)) == 2


class _Consume(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return (self.w - batch["images"].mean()) ** 2

    def validation_step(self, batch, batch_idx):
        self.log("val/x", batch["images"].mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_skipped_counts_are_logged(tmp_path):
    url, _ = _bad_shard(tmp_path, _corrupt_image)
    dm = MultiViewShards(url, url, batch_size=1, num_workers=0, image_size=16, num_views=3, batches_per_epoch=4,
                         shuffle_buffer=0, seed=0)  # fmt: skip
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[SkippedSamplesLogger()],
                      num_sanity_val_steps=0)  # fmt: skip
    with pytest.warns(BadSampleWarning):
        trainer.fit(_Consume(), datamodule=dm)
    assert trainer.callback_metrics["data/skipped_train"] >= 1
    assert trainer.callback_metrics["data/skipped_val"] == 1


# ---------------------------------------------------------------- how much data there is, and refusing a broken stream
def _cut(path, keep: int, between: bool = False) -> None:
    """Truncate the shard ``path`` after its first ``keep`` samples: inside the next sample's first member,
    or exactly between two samples (``between``)."""
    import tarfile

    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.isreg()]
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members))
    first = next(m for m in members if m.name.split(".", 1)[0] == keys[keep])
    end = first.offset if between else first.offset_data + first.size // 2
    with open(path, "r+b") as f:
        f.truncate(end)


def _info(tmp_path, split: str, url: str, scenes: int) -> None:
    info = {"splits": {split: {"scenes": scenes, "shards": 1, "url": url}}}
    (tmp_path / "info.json").write_text(json.dumps(info))


@pytest.mark.parametrize("between", [False, True], ids=["cut-inside-a-sample", "cut-between-samples"])
def test_inventory_counts_intact_samples_and_names_the_damage(tmp_path, between):
    from selfsup3d.datamodules.inventory import SplitInventory, inventory_shard

    url = _write(tmp_path, _records(num_scenes=4), split="train")
    whole = inventory_shard(url)
    assert (whole.samples, whole.damage) == (4, None)
    _cut(url, keep=1, between=between)
    cut = inventory_shard(url)
    assert cut.samples == 1
    assert ("end-of-archive" if between else "truncated inside sample") in cut.damage
    _info(tmp_path, "train", url, 4)
    line = SplitInventory.of([url], "train").summary("training")
    assert line.startswith("training data: 1 shard(s), 1 intact sample(s) of the 4 info.json lists")
    assert url in line


@pytest.mark.parametrize("with_info", [True, False], ids=["info.json", "no-info.json"])
def test_fit_refuses_a_training_stream_that_is_nearly_all_broken(tmp_path, with_info):
    url = _write(tmp_path, _records(num_scenes=4), split="train")
    _cut(url, keep=1)  # the only shard, truncated down to one intact scene
    if with_info:
        _info(tmp_path, "train", url, 4)
    dm = MultiViewShards(url, None, batch_size=2, num_workers=0, image_size=16, num_views=3)
    reason = "only 1 of the 4 samples info.json lists" if with_info else "every shard is damaged"
    with (
        pytest.raises(ConfigError, match=rf"data.init_args.train_urls: refusing to train: {reason}"),
        pytest.warns(UserWarning, match="is damaged"),
    ):
        dm.setup("fit")
    # one damaged shard beside a whole one trains on (the damage is said), unless strict
    good = _write(tmp_path / "more", _records(num_scenes=4, start=4), split="train")
    MultiViewShards([good, url], None, batch_size=2, num_workers=0, image_size=16, num_views=3).setup("fit")
    strict = MultiViewShards([good, url], None, batch_size=2, num_workers=0, image_size=16, num_views=3, strict=True)
    with pytest.raises(ConfigError, match="damaged and strict=true"):
        strict.setup("fit")


def test_validation_says_how_many_samples_it_evaluated(tmp_path, caplog):
    import logging

    good = _write(tmp_path / "train", _records(num_scenes=2), split="train")
    val = _write(tmp_path, _records(num_scenes=4, start=2), split="val")
    _cut(val, keep=2)
    _info(tmp_path, "val", val, 4)
    dm = MultiViewShards(good, val, batch_size=1, num_workers=0, image_size=16, num_views=3, seed=0)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[SkippedSamplesLogger()])  # fmt: skip
    inventory = r"validation data: 1 shard\(s\), 2 intact sample\(s\) of the 4 info.json lists; .* is damaged"
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match=inventory):
        trainer.validate(_Consume(), datamodule=dm)
    assert "validation: 2 samples evaluated, 1 skipped as bad" in caplog.text
    assert trainer.callback_metrics["data/read_val"] == 2
    # val_batches cycles the validation samples: the count says how many of them there are
    caplog.clear()
    dm = MultiViewShards(good, good, batch_size=2, num_workers=0, image_size=16, num_views=3, seed=0, val_batches=3)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[SkippedSamplesLogger()])  # fmt: skip
    with caplog.at_level(logging.INFO):
        trainer.validate(_Consume(), datamodule=dm)
    assert "validation: 6 samples evaluated (the 2 validation samples, some evaluated more than once" in caplog.text


def test_cli_fit_on_a_truncated_only_shard_is_a_one_line_refusal(tmp_path, capsys):
    from selfsup3d.cli import main

    url = _write(tmp_path, _records(num_scenes=4, num_views=8), split="train")
    _cut(url, keep=1)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "configs/demo/masked_view.yaml", "--data.init_args.train_urls", url,
              "--data.init_args.val_urls", "null", "--trainer.default_root_dir", str(tmp_path / "run")])  # fmt: skip
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "refusing to train: every shard is damaged" in err and "Traceback" not in err
