"""Masked-view prediction through the CLI on tiny rendered shards: fit (bf16-mixed on the CPU), validate,
the pictures in TensorBoard, the shipped configs, and start-up errors that name the keys."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_encoder
from lightning.pytorch import Trainer
from shards import write_multiview_shards
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from toy import tiny_encoder_config

from selfsup3d.cli import main
from selfsup3d.datamodules import MultiViewShards
from selfsup3d.objectives.masked_view import MaskedViewPrediction

ROOT = Path(__file__).resolve().parents[1]
ENCODER = tiny_encoder_config(num_out_layers=0)


@pytest.fixture(scope="module")
def shard_urls(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("mv_shards")
    train = write_multiview_shards(root, num_scenes=4, num_views=5, size=32, num_shards=2, with_depth=False)
    val = write_multiview_shards(root, num_scenes=2, num_views=5, size=32, num_shards=1, split="val", seed=1)
    return train, val


def write_config(tmp_path: Path, urls: tuple[str, str], **data_args) -> Path:
    cfg = {
        "model": {
            "class_path": "selfsup3d.objectives.masked_view.MaskedViewPrediction",
            "init_args": {
                "encoder": ENCODER,
                "dim": 32,
                "num_heads": 2,
                "camera_layers": 2,
                "scene_layers": 1,
                "render_layers": 1,
                "num_scene_tokens": 8,
                "lr": 1e-3,
                "warmup_steps": 1,
            },
        },
        "data": {
            "class_path": "selfsup3d.datamodules.MultiViewShards",
            "init_args": {
                "train_urls": urls[0],
                "val_urls": urls[1],
                "batch_size": 2,
                "num_workers": 0,
                "image_size": 32,
                "num_views": 4,
                "num_context_views": 2,
                "batches_per_epoch": 2,
                **data_args,
            },
        },
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "default_root_dir": str(tmp_path),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "callbacks": [{"class_path": "selfsup3d.callbacks.MaskedViewPictures", "init_args": {"max_scenes": 2}}],
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_bf16_then_validate_with_pictures_and_figures(tmp_path, shard_urls, capsys):
    cfg = write_config(tmp_path, shard_urls)
    main(["fit", "--config", str(cfg), "--trainer.precision", "bf16-mixed"])
    run = tmp_path / "lightning_logs" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert "masked_view/renders" in tags["images"] and "masked_view/cameras_0" in tags["images"]
    for name in ("psnr", "psnr_mean_colour", "psnr_nearest", "ssim", "rot_err", "trans_err", "auc30"):
        assert f"val/{name}" in tags["scalars"], name
    assert "train/loss" in tags["scalars"] and "train/skipped_steps" in tags["scalars"]

    # evaluation of the checkpoint: another view count and split than in training, from the config alone
    capsys.readouterr()
    saved_config = (run / "config.yaml").read_text()
    main(["validate", "--config", str(cfg), "--ckpt_path", str(ckpt), "--data.init_args.num_views", "5",
          "--data.init_args.num_context_views", "3"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "validation scenes' novel views" in printed and "mean colour of the context views (model" in printed
    assert "per-pixel mean of the context views (model" in printed and "nearest context view" in printed
    assert "AUC@5/15/30" in printed
    # a validation of a run's checkpoint is logged in that run (no new version_N without a checkpoint), whose
    # config stays the one it was trained with
    main(["validate", "--config", str(cfg), "--ckpt_path", "last"])
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]
    assert (run / "config.yaml").read_text() == saved_config
    assert len(EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload().Scalars("val/psnr")) == 3


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        (
            ["--data.init_args.image_size", "36"],
            ["data.init_args.image_size=36", "model.init_args.encoder.init_args.patch_size=8"],
        ),
        (["--data.init_args.num_context_views", "0"], ["num_context_views"]),
        (["--data.init_args.num_context_views", "4"], ["num_context_views", "num_views"]),
        (["--model.init_args.num_heads", "3"], ["model.init_args.dim=32", "model.init_args.num_heads=3"]),
    ],
)
def test_impossible_configs_fail_at_start_up_naming_the_keys(tmp_path, shard_urls, capsys, override, needles):
    cfg = write_config(tmp_path, shard_urls)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(cfg), *override])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert all(n in err for n in needles), err
    assert "Traceback" not in err
    assert not list((tmp_path / "lightning_logs").glob("*"))  # a refused start leaves no empty version_N


def test_a_start_refused_once_the_data_is_read_leaves_no_run_folder(tmp_path, shard_urls, capsys):
    cfg = write_config(tmp_path, shard_urls)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(cfg), "--data.init_args.train_urls", str(tmp_path / "nothing-*.tar")])
    assert exit_.value.code == 2 and "matches no file" in capsys.readouterr().err
    assert not list((tmp_path / "lightning_logs").glob("*"))


@pytest.mark.parametrize(
    "name",
    [
        "configs/masked_view.yaml",
        "configs/masked_view_gaussians.yaml",
        "configs/demo/masked_view.yaml",
        "configs/demo/masked_view_gaussians.yaml",
    ],
)
def test_shipped_configs_parse(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(ROOT / name), "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "selfsup3d.objectives.masked_view.MaskedViewPrediction"
    assert printed["data"]["class_path"] == "selfsup3d.datamodules.MultiViewShards"


def test_pose_probe_and_view_window_through_the_cli(tmp_path, shard_urls, capsys, caplog):
    cfg = write_config(tmp_path, shard_urls, view_window=[4, 5], window_steps=2, canonical_view="middle")
    # no probe_urls: the probe trains on the run's training shards, announced as what they are
    probe = {"class_path": "selfsup3d.callbacks.CameraTokenProbe", "init_args": {"num_scenes": 4, "steps": 5}}
    with caplog.at_level("INFO"):
        main(["fit", "--config", str(cfg), "--trainer.callbacks+", yaml.safe_dump(probe)])
    assert "camera-token probe training data: 2 shard(s), 4 intact sample(s)" in caplog.text, caplog.text
    assert caplog.text.count("validation data:") == 1  # the run's own validation shards only
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    for name in ("probe_r10", "probe_t03", "probe_r10_chance", "probe_t03_chance", "rot_err_identity"):
        assert f"val/{name}" in events.Tags()["scalars"], name
    r10 = events.Scalars("val/probe_r10")[-1].value
    assert 0.0 <= r10 <= 1.0
    capsys.readouterr()
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    main(["validate", "--config", str(cfg), "--ckpt_path", str(ckpt), "--trainer.callbacks+", yaml.safe_dump(probe)])
    assert "RayZer pose probe on the camera tokens: R@10" in capsys.readouterr().out


class PoisonedCameras(MultiViewShards):
    """Training batches whose true cameras are NaN (validation keeps them for the pose figures)."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        if self.trainer.training:
            batch["K"] = torch.full_like(batch["K"], math.nan)
            batch["c2w"] = torch.full_like(batch["c2w"], math.nan)
        return batch


def test_training_steps_run_on_nan_cameras(tmp_path, shard_urls):
    cfg = yaml.safe_load(write_config(tmp_path, shard_urls).read_text())
    data = PoisonedCameras(**dict(cfg["data"]["init_args"], val_urls=None))
    torch.manual_seed(0)
    model = MaskedViewPrediction(tiny_encoder(num_out_layers=0), **{
        k: v for k, v in cfg["model"]["init_args"].items() if k != "encoder"})  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "training did not move the weights"


def test_explicit_renderer_fits_and_validate_prints_the_oracle_beside_it(tmp_path, shard_urls, capsys):
    """The explicit renderer through the CLI (its pictures and figures in TensorBoard); an oracle
    (``cameras: data``) trained through the CLI, then the self-supervised model validated with
    :class:`OracleComparison` naming the oracle's checkpoint: the summary has the oracle's row on the same views;
    a checkpoint trained on predicted cameras is refused as an oracle, naming the key."""
    explicit = ["--model.init_args.renderer", "gaussians"]
    oracle_dir, model_dir = tmp_path / "oracle", tmp_path / "model"
    oracle_dir.mkdir(), model_dir.mkdir()
    main(["fit", "--config", str(write_config(oracle_dir, shard_urls)), *explicit,
          "--model.init_args.cameras", "data"])  # fmt: skip
    cfg = write_config(model_dir, shard_urls)
    main(["fit", "--config", str(cfg), *explicit])
    oracle_ckpt = oracle_dir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    model_ckpt = model_dir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    events = EventAccumulator(str(model_dir / "lightning_logs" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    assert "masked_view/gaussians" in events.Tags()["images"]  # depth, opacity and colour of the Gaussians
    for name in ("rpa5", "rpa15", "rpa30", "psnr_still_cameras"):  # depth figures: the training shards have none
        assert f"val/{name}" in events.Tags()["scalars"], name
    callback = lambda ckpt: yaml.safe_dump(  # noqa: E731
        {"class_path": "selfsup3d.callbacks.OracleComparison", "init_args": {"checkpoint": str(ckpt)}}
    )
    capsys.readouterr()
    main(["validate", "--config", str(cfg), *explicit, "--ckpt_path", str(model_ckpt),
          "--trainer.callbacks+", callback(oracle_ckpt)])  # fmt: skip
    printed = capsys.readouterr().out
    oracle_row = next(line for line in printed.splitlines() if "the oracle" in line)
    assert "dB)" in oracle_row and "(model " in oracle_row, oracle_row
    with pytest.raises(SystemExit) as exit_:
        main(["validate", "--config", str(cfg), *explicit, "--ckpt_path", str(model_ckpt),
              "--trainer.callbacks+", callback(model_ckpt)])  # fmt: skip
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "cameras: predicted" in err and "model.init_args.cameras=data" in err and "Traceback" not in err


def test_a_checkpoint_of_another_objective_is_refused_in_one_line(tmp_path, shard_urls, capsys):
    """--ckpt_path with another objective's checkpoint: Lightning would rebuild the checkpoint's objective in place
    of the config's and train it on the config's data (exit 0), or fail on data that does not fit it."""
    (tmp_path / "mv").mkdir()
    main(["fit", "--config", str(write_config(tmp_path / "mv", shard_urls)), "--trainer.max_steps", "1"])
    ckpt = tmp_path / "mv/lightning_logs/version_0/checkpoints/last.ckpt"
    other = tmp_path / "toy"
    other.mkdir()
    on_scenes = yaml.safe_load(write_config(other, shard_urls).read_text())  # the same multi-view shards
    on_scenes["model"] = {"class_path": "toy.RotationPrediction", "init_args": {"encoder": ENCODER}}
    on_images = {**on_scenes, "data": {"class_path": "toy.RandomImages", "init_args": {"batch_size": 2}}}
    for name, cfg in (("scenes.yaml", on_scenes), ("images.yaml", on_images)):
        (other / name).write_text(yaml.safe_dump(cfg))
    cases = [("fit", "scenes.yaml", ckpt), ("fit", "images.yaml", ckpt), ("validate", "scenes.yaml", ckpt)]
    for subcommand, config, path in cases:
        with pytest.raises(SystemExit) as exit_:
            main([subcommand, "--config", str(other / config), "--ckpt_path", str(path)])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert f"--ckpt_path {ckpt} is a checkpoint of MaskedViewPrediction, but the config trains " in err
        assert "RotationPrediction (model.class_path)" in err and f"init_encoder_from: {ckpt}" in err
    assert not (other / "lightning_logs").exists()  # nothing ran
    # `--ckpt_path last` finds the newest run under the same folder: a masked-view run there is refused alike
    on_scenes["trainer"]["default_root_dir"] = str(tmp_path / "mv")
    (other / "scenes.yaml").write_text(yaml.safe_dump(on_scenes))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(other / "scenes.yaml"), "--ckpt_path", "last"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and f"--ckpt_path {ckpt} is a checkpoint of MaskedViewPrediction" in err, err
    # in Python (no CLI), loading it into another objective names both classes too
    from toy import RotationPrediction

    from selfsup3d.errors import CheckpointMismatchError

    model = RotationPrediction(tiny_encoder(num_out_layers=0))
    with pytest.raises(CheckpointMismatchError, match="checkpoint of MaskedViewPrediction, but the config trains Rot"):
        model.on_load_checkpoint(torch.load(ckpt, weights_only=True))
