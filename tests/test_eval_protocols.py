"""The papers' test protocols and training curricula on converted data: an evaluation index (pixelSplat's and
LVSM's format) makes validation score exactly the indexed scenes and views, through `selfsup3d validate`;
RayZer's frame-gap curriculum moves the gap between the first and last view over training."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from papers import write_re10k
from toy import tiny_encoder_config

from selfsup3d.cli import main
from selfsup3d.datamodules import MultiViewShards
from selfsup3d.datamodules.multiview import gap_range, gap_view_order
from selfsup3d.datamodules.prepare.journal import RunOptions
from selfsup3d.datamodules.prepare.re10k import convert_re10k
from selfsup3d.errors import ConfigError


@pytest.fixture(scope="module")
def re10k_shards(tmp_path_factory):
    """Three RE10K scenes (6, 5 and 7 frames) converted from pixelSplat chunks, with their source JPEGs."""
    root = tmp_path_factory.mktemp("re10k")
    truth = write_re10k(root / "chunks")
    convert_re10k(root / "chunks", root / "shards", split="test", run=RunOptions(workers=1, progress=False))
    return root, truth


def _index(path, entries) -> str:
    path.write_text(json.dumps(entries))
    return str(path)


INDEX = {
    "5aca87f95a9412c6": {"context": [0, 5], "target": [1, 3, 4]},
    "ffee001122334455": {"context": [1, 6], "target": [2, 3, 5]},
    "0a1b2c3d4e5f6789": None,
    "missing0000000000": {"context": [0, 9], "target": [3, 4, 5]},
}


def test_an_evaluation_index_scores_exactly_its_scenes_and_views(tmp_path, re10k_shards, caplog):
    root, truth = re10k_shards
    url = str(root / "shards" / "test-000000.tar")
    dm = MultiViewShards(url, url, num_views=5, num_context_views=2, image_size=[36, 64], batch_size=4,
                         num_workers=0, eval_index=_index(tmp_path / "index.json", INDEX))  # fmt: skip
    with caplog.at_level(logging.INFO):
        dm.setup("validate")
    assert "4 entries, 3 scored (2 context + 3 target views), 1 null skipped" in caplog.text
    assert "2 found in the validation shards, 1 missing (e.g. missing0000000000)" in caplog.text
    assert dm.eval_index_missing == 1
    (batch,) = list(dm.val_dataloader())
    batch = dm.prepare_batch(batch, train=False)
    assert batch["key"] == ["5aca87f95a9412c6", "ffee001122334455"] and batch["num_context"] == 2
    # the views are the indexed frames, in the index's order: their intrinsics vary with the frame (fx = 512 + 3i)
    scale = 64 / 640
    for b, key in enumerate(batch["key"]):
        frames = INDEX[key]["context"] + INDEX[key]["target"]
        fx = torch.tensor([(512.0 + 3 * i) * scale for i in frames])
        assert torch.allclose(batch["K"][b, :, 0, 0], fx, atol=1e-4)
    assert dm.skipped["val"] == 0


@pytest.mark.parametrize(
    ("entries", "overrides", "needle"),
    [
        ({"a": {"context": [0, 1], "target": [2]}, "b": {"context": [0], "target": [1, 2]}}, {}, "mixes view counts"),
        ({"a": {"context": [0, 1]}}, {}, "an entry must be"),
        ({"a": {"context": [0, -1], "target": [2]}}, {}, "view indices (integers >= 0)"),
        ({"a": None}, {}, "no scene to score"),
        ({"a": {"context": [0, 1], "target": [2, 3, 4]}}, {"num_views": 4}, "num_views=5"),
    ],
)
def test_bad_evaluation_indices_fail_at_set_up_in_one_line(tmp_path, re10k_shards, entries, overrides, needle):
    root, _ = re10k_shards
    url = str(root / "shards" / "test-000000.tar")
    args = {"num_views": 5, "num_context_views": 2, **overrides}
    dm = MultiViewShards(url, url, num_workers=0, eval_index=_index(tmp_path / "i.json", entries), **args)
    with pytest.raises(ConfigError, match="eval_index") as err:
        dm.setup("validate")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_validate_scores_the_indexed_views_of_converted_re10k_through_the_cli(tmp_path, re10k_shards, capsys, caplog):
    root, _ = re10k_shards
    url = str(root / "shards" / "test-000000.tar")
    cfg = {
        "model": {
            "class_path": "selfsup3d.objectives.masked_view.MaskedViewPrediction",
            "init_args": {
                "encoder": tiny_encoder_config(num_out_layers=0),
                "dim": 32,
                "num_heads": 2,
                "camera_layers": 1,
                "scene_layers": 1,
                "render_layers": 1,
                "num_scene_tokens": 8,
            },
        },  # fmt: skip
        "data": {
            "class_path": "selfsup3d.datamodules.MultiViewShards",
            "init_args": {
                "train_urls": url,
                "val_urls": url,
                "batch_size": 2,
                "num_workers": 0,
                "image_size": 32,
                "num_views": 5,
                "num_context_views": 2,
            },
        },  # fmt: skip
        "trainer": {
            "accelerator": "cpu",
            "default_root_dir": str(tmp_path),
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },  # fmt: skip
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    index = _index(tmp_path / "evaluation_index_re10k.json", INDEX)
    with caplog.at_level(logging.INFO):
        main(["validate", "--config", str(tmp_path / "config.yaml"), "--data.init_args.eval_index", index])
    said = caplog.text + capsys.readouterr().out
    assert f"evaluation index {index}: 4 entries, 3 scored" in said
    assert "2 found in the validation shards, 1 missing" in said
    assert "validation: 2 samples evaluated, 0 skipped as bad" in said


def test_the_frame_gap_range_moves_from_start_to_end_over_the_steps():
    start, end = (96, 128), (128, 192)
    assert gap_range(start, end, 1000, 0) == start
    assert gap_range(start, end, 1000, 500) == (112, 160)
    assert gap_range(start, end, 1000, 1000) == end == gap_range(start, end, 1000, 5000)
    rng = random.Random(0)
    for step, (low, high) in ((0, start), (500, (112, 160)), (2000, end)):
        gaps = []
        for _ in range(200):
            order = gap_view_order(300, 8, 2, gap_range(start, end, 1000, step), rng)
            assert len(set(order)) == 8 and order[2:] == sorted(order[2:])
            gaps.append(max(order) - min(order))
        assert low <= min(gaps) and max(gaps) <= high and max(gaps) - min(gaps) > (high - low) // 2
    # a scene shorter than the gap: the whole scene, first and last frame included
    order = gap_view_order(40, 8, 2, end, rng)
    assert min(order) == 0 and max(order) == 39
    # validation: the largest gap, centred, evenly spread
    order = gap_view_order(300, 8, 2, end, None)
    assert max(order) - min(order) < 193 and sorted(order) == sorted(set(order))


def test_the_frame_gap_curriculum_is_a_typed_option_that_follows_the_training_step(tmp_path):
    from shards import write_multiview_shards

    url = write_multiview_shards(tmp_path, num_scenes=2, num_views=12, size=16, num_shards=1, with_depth=False)
    dm = MultiViewShards(url, num_views=3, num_context_views=1, image_size=16, num_workers=0, batch_size=1,
                         frame_gap=[[2, 3], [9, 11]], frame_gap_steps=10, shuffle_buffer=0)  # fmt: skip
    assert dm.frame_gap == ((2, 3), (9, 11))
    decoder = dm._decoder(train=True)
    rng = random.Random(1)
    for step, (low, high) in ((0, (2, 3)), (10, (9, 11))):
        decoder.clock.position = (0, step, 0, 1)  # batch size 1, one worker: sample i is trained at step i
        gaps = {np.ptp(decoder.view_order(12, rng)) for _ in range(50)}
        assert gaps <= set(range(low, high + 1)) and len(gaps) > 1
    for bad, needle in (([[1, 3], [9, 11]], "num_views - 1 <= low"), ([[2, 3]], "must be [[start_low")):
        with pytest.raises(ConfigError, match="frame_gap") as err:
            MultiViewShards(url, num_views=3, frame_gap=bad)
        assert needle in str(err.value)
    with pytest.raises(ConfigError, match="not both"):
        MultiViewShards(url, num_views=3, frame_gap=[[2, 3], [4, 5]], view_window=[3, 5])


@pytest.mark.parametrize(
    ("name", "views", "gap"),
    [("re10k", (10, 5), [[96, 128], [128, 192]]), ("dl3dv", (24, 16), [[48, 64], [64, 96]]), ("co3d", (10, 5), None)],
)
def test_the_paper_configs_parse_on_top_of_the_masked_view_config(name, views, gap, capsys):
    root = Path(__file__).resolve().parents[1] / "configs"
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(root / "masked_view.yaml"), "--config", str(root / "papers" / f"{name}.yaml"),
              "--print_config"])  # fmt: skip
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    data = printed["data"]["init_args"]
    assert (data["num_views"], data["num_context_views"], data["image_size"]) == (*views, 256)
    assert data["frame_gap"] == gap and data["train_urls"] == f"data/{name}/train-*.tar"
    assert printed["model"]["init_args"]["dim"] == 768 and printed["trainer"]["default_root_dir"] == f"runs/{name}"
