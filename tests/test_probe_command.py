"""``selfsup3d probe`` as a user meets it: every ENCODER form loads the weights it names, the splits are
fixed and asset-disjoint, the report (table, JSON, picture) is written, the same call gives the same
numbers, and the sanity checks hold on rendered scenes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_encoder
from probe_synthetic import plane_scene, write_plane_shards
from toy import tiny_encoder_config

from selfsup3d.cli import main as cli_main
from selfsup3d.cli.probe import main
from selfsup3d.datamodules.format import ShardSink
from selfsup3d.encoders.export import save_encoder
from selfsup3d.encoders.vit import ViTEncoder
from selfsup3d.errors import ConfigError
from selfsup3d.eval.features import EncoderFeatures, Views
from selfsup3d.eval.scenes import RawScene, split_scenes
from selfsup3d.eval.sources import load_source, split_label

FAST = ["--head-steps", "30", "--pose-steps", "30", "--queries", "128", "--matches", "64", "--quiet"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("probe_shards")
    return {
        "data": write_plane_shards(root, 6, num_views=4, size=64, split="val"),
        "probe": write_plane_shards(root, 8, num_views=4, size=64, split="train", start=50),
    }


def _features(source, seed: int = 0) -> torch.Tensor:
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return source(Views(images)).dense


# ---------------------------------------------------------------------------- encoder forms
def test_every_encoder_form_loads_the_weights_it_names(tmp_path):
    torch.manual_seed(3)
    enc = tiny_encoder()
    reference = _features(EncoderFeatures(enc))
    # an exported encoder
    save_encoder(enc.export_state_dict(), enc.config, tmp_path / "enc.safetensors")
    exported = load_source(str(tmp_path / "enc.safetensors"))
    assert exported.kind == "exported" and torch.allclose(_features(exported.source), reference, atol=1e-5)
    # a Lightning checkpoint (what PretrainObjective saves: encoder.* weights, the encoder's class_path/init_args)
    ckpt = {
        "state_dict": {f"encoder.{k}": v for k, v in enc.state_dict().items()} | {"head.weight": torch.zeros(1)},
        "hyper_parameters": {"encoder": {"class_path": "selfsup3d.encoders.ViTEncoder", "init_args": enc.config}},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded = load_source(f"mine={tmp_path / 'last.ckpt'}")
    assert loaded.label == "mine" and loaded.kind == "checkpoint"
    assert torch.allclose(_features(loaded.source), reference, atol=1e-5)
    # a timm name with a local weights file
    vit = ViTEncoder("test_vit", img_size=32)
    torch.save(vit.vit.state_dict(), tmp_path / "w.pth")
    named = load_source(f"test_vit@{tmp_path / 'w.pth'}", input_size=32)
    assert torch.allclose(_features(named.source), _features(EncoderFeatures(vit)), atol=1e-5)
    # a config: the encoder randomly initialised, seeded; pretrained switched off
    cfg = {"model": {"init_args": {"encoder": tiny_encoder_config(pretrained=True)}}}
    (tmp_path / "floor.yaml").write_text(yaml.safe_dump(cfg))
    a, b = load_source(str(tmp_path / "floor.yaml"), seed=1), load_source(str(tmp_path / "floor.yaml"), seed=1)
    c = load_source(str(tmp_path / "floor.yaml"), seed=2)
    assert a.label == "floor (random)" and a.info["input_size"] == [32, 32]
    assert torch.equal(_features(a.source), _features(b.source))
    assert not torch.allclose(_features(a.source), _features(c.source))
    # a timm name alone: random, seeded
    x, y = load_source("test_vit", input_size=32, seed=5), load_source("test_vit", input_size=32, seed=5)
    assert x.kind == "timm (random init)" and torch.equal(_features(x.source), _features(y.source))
    # baselines
    assert {load_source(n).kind for n in ("colour", "color", "oracle", "constant")} == {"colour", "oracle", "constant"}


def test_encoder_forms_that_cannot_work_are_named(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "bare.pth")
    with pytest.raises(ConfigError, match="NAME@"):
        load_source(str(tmp_path / "bare.pth"))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ConfigError, match="no selfsup3d encoder metadata"):
        load_source(str(tmp_path / "plain.safetensors"))
    with pytest.raises(FileNotFoundError):
        load_source(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConfigError, match="unknown encoder"):
        load_source("definitely_not_a_model")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"model": {"init_args": {}}}))
    with pytest.raises(ConfigError, match="model.init_args.encoder"):
        load_source(str(tmp_path / "bad.yaml"))
    torch.save({"state_dict": {}, "hyper_parameters": {}}, tmp_path / "nohp.ckpt")
    with pytest.raises(ConfigError, match="no encoder config"):
        load_source(str(tmp_path / "nohp.ckpt"))
    assert split_label("a=b.yaml") == ("a", "b.yaml") and split_label("runs/a=b/x.yaml") == (None, "runs/a=b/x.yaml")


def test_encoders_from_a_real_fit_checkpoint_and_its_export(tmp_path):
    from test_cli import run_dir, write_config

    cli_main(["fit", "--config", str(write_config(tmp_path, max_steps=2))])
    run = run_dir(tmp_path)
    ckpt = load_source(str(run / "checkpoints" / "last.ckpt"))
    exported = load_source(str(run / "encoder.safetensors"))
    assert torch.allclose(_features(ckpt.source), _features(exported.source), atol=1e-5)
    assert exported.label == f"{tmp_path.name}/encoder"


# ---------------------------------------------------------------------------- splits
def _raw(key: str, asset: str) -> RawScene:
    return RawScene(key, asset, 0, 4, (8, 8), {})


def test_splits_are_asset_disjoint_fixed_by_hash_and_drop_shared_objects():
    data = [_raw(f"s{i}", f"asset{i % 5}") for i in range(20)]  # 5 assets, 4 scenes each
    split = split_scenes(data, None, test_scenes=6)
    test_assets = {s.group for s in split.test}
    assert len(split.test) == 6 and not test_assets & {s.group for s in split.probe}
    assert split_scenes(list(reversed(data)), None, 6).test == split.test  # the order of the data does not matter
    probe = [_raw("p0", next(iter(test_assets))), _raw("p1", "other")]
    with_probe = split_scenes(data, probe, test_scenes=6)
    assert [s.key for s in with_probe.probe] == ["p1"] and with_probe.info["probe"]["dropped_shared_groups"] == 1
    with pytest.raises(ConfigError, match="--probe-data"):
        split_scenes(data, None, test_scenes=20)


# ---------------------------------------------------------------------------- the command
def test_help_and_usage_errors(shards, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "ENCODER forms" in capsys.readouterr().out
    from selfsup3d.cli import DESCRIPTION

    assert "selfsup3d probe --help" in DESCRIPTION
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["probe", "colour"])  # --data is required
    assert exit_info.value.code == 2 and "--data" in capsys.readouterr().err
    for argv, message in (
        (["nonsense_encoder", "--data", shards["data"]], "unknown encoder"),
        (["colour", "--data", shards["data"], "--probes", "depth,telepathy"], "unknown probes"),
        (["colour", "--data", shards["data"], "--test-scenes", "99"], "no scenes left"),
        (["colour", "--data", "/nowhere/val-*.tar"], "matches no file"),
        (["colour", "--data", shards["data"], "--test-scenes", "0"], "--test-scenes"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_single_view_shards_are_refused(tmp_path, capsys):
    from shards import write_singleview_shards

    url = write_singleview_shards(tmp_path, num_samples=4, size=16)
    with pytest.raises(SystemExit):
        main(["colour", "--data", url])
    assert "single-view" in capsys.readouterr().err


def test_report_table_json_picture_and_same_numbers_twice(shards, tmp_path, capsys):
    torch.manual_seed(0)
    enc = tiny_encoder(img_size=32)
    save_encoder(enc.export_state_dict(), enc.config, tmp_path / "tiny.safetensors")
    argv = [
        "oracle",
        f"tiny={tmp_path / 'tiny.safetensors'}",
        "--data",
        shards["data"],
        "--probe-data",
        shards["probe"],
        "--test-scenes",
        "3",
        "--plot",
        str(tmp_path / "r.png"),
        *FAST,
    ]
    assert main([*argv, "--out", str(tmp_path / "a.json")]) == 0
    main([*argv, "--out", str(tmp_path / "b.json")])
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    for report in (a, b):
        for e in report["encoders"]:
            e.pop("seconds")
        report.pop("command")
    assert a == b
    labels = [e["label"] for e in a["encoders"]]
    assert labels == ["oracle", "tiny", "colour"]  # the colour baseline is added
    metrics = {e["label"]: e["metrics"] for e in a["encoders"]}
    assert metrics["oracle"]["corr@0.025"] >= 0.95
    assert metrics["tiny"].keys() == metrics["colour"].keys() and "pose_rot_auc30" in metrics["tiny"]
    assert a["split"]["test"]["scenes"] == 3 and a["split"]["probe"]["scenes"] == 8
    assert not set(a["split"]["test"]["keys"]) & set(a["split"]["probe"]["keys"])
    assert a["protocol"]["thresholds_px"] == pytest.approx([1.6, 3.2, 6.4])
    assert next(e for e in a["encoders"] if e["label"] == "tiny")["info"]["input_size"] == [32, 32]
    out = capsys.readouterr().out
    assert "| encoder | corr@2.5%" in out and "| *chance* |" in out and "split (" in out
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    # the printed table holds the JSON's figures
    row = next(line for line in out.splitlines() if line.startswith("| oracle |"))
    assert f"{metrics['oracle']['corr@0.05']:.3f}" in row


def test_rendered_scenes_oracle_near_perfect_constant_and_shuffled_at_chance(tmp_path):
    """The sanity checks of the issue on the embedded renderer's scenes (64x64, 4 views)."""
    from shards import write_multiview_shards

    data = write_multiview_shards(tmp_path / "d", num_scenes=6, num_views=4, size=64, split="val")
    probe = write_multiview_shards(tmp_path / "p", num_scenes=4, num_views=4, size=64, split="train")
    common = ["--data", data, "--probe-data", probe, "--probes", "correspondence", "--no-baseline", *FAST]
    main(["oracle", "constant", *common, "--out", str(tmp_path / "r.json")])
    main(["oracle", *common, "--shuffle-views", "--out", str(tmp_path / "s.json")])
    report, shuffled = (json.loads((tmp_path / n).read_text()) for n in ("r.json", "s.json"))
    oracle, constant = (e["metrics"] for e in report["encoders"])
    chance = report["chance"]
    assert oracle["corr@0.025"] >= 0.95
    # chance is a uniformly random match; shuffled views stay a little above it because every camera looks
    # at the object: a point near the centre of one view is near the centre of the others
    # (3-4 times uniform chance here, against 1.0 unshuffled)
    assert shuffled["encoders"][0]["metrics"]["corr@0.025"] < 0.1 * oracle["corr@0.025"]
    for tau in ("0.025", "0.05", "0.1"):
        assert constant[f"corr@{tau}"] <= 2 * chance[f"corr@{tau}"] + 0.01
        assert shuffled["encoders"][0]["metrics"][f"corr@{tau}"] <= 5 * chance[f"corr@{tau}"]


def test_views_and_image_size_options(tmp_path):
    with ShardSink(tmp_path, "val", samples_per_shard=4) as sink:
        for i in range(4):
            sink.write(plane_scene(i, num_views=6, size=48))
    url = sink.url
    main(["colour", "--data", url, "--test-scenes", "2", "--views", "3", "--image-size", "32",
          "--probes", "correspondence,retrieval", "--out", str(tmp_path / "r.json"), *FAST])  # fmt: skip
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["protocol"]["image_size"] == [32, 32] and report["protocol"]["views"] == 3
    assert math.isfinite(report["encoders"][0]["metrics"]["retrieval_top1"])
    assert report["chance"]["retrieval_top1"] == pytest.approx(2 / 5)
    assert np.isfinite(report["encoders"][0]["metrics"]["corr@0.05"])
