"""The 3D-Prior objective through the CLI on tiny rendered shards; the shipped configs parse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from shards import write_singleview_shards
from toy import tiny_encoder_config

from selfsup3d.cli import main

REPO = Path(__file__).resolve().parents[1]

TINY_MODEL = {
    "class_path": "selfsup3d.objectives.triplane.TriplaneReconstruction",
    "init_args": {
        "encoder": tiny_encoder_config(num_out_layers=2),
        "decoder_dim": 32,
        "decoder_depth": 1,
        "decoder_heads": 2,
        "triplane_grid": 4,
        "triplane_size": 16,
        "triplane_channels": 8,
        "field_hidden": 16,
        "render_size": 16,
        "rays_per_image": 32,
        "num_coarse": 8,
        "num_fine": 8,
        "lr": 1e-3,
        "warmup_steps": 0,
    },
}


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("shards")
    train = write_singleview_shards(root, num_samples=8, size=32, num_shards=2, split="train")
    val = write_singleview_shards(root, num_samples=4, size=32, num_shards=1, split="val")
    return train, val


def test_cli_fit_logs_losses_probes_and_pictures(tmp_path, tiny_shards):
    train, val = tiny_shards
    cfg = {
        "model": TINY_MODEL,
        "data": {
            "class_path": "selfsup3d.datamodules.SingleViewShards",
            "init_args": {
                "train_urls": train,
                "val_urls": val,
                "image_size": 32,
                "batch_size": 4,
                "num_workers": 0,
                "batches_per_epoch": 2,
                "pin_memory": False,
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
            "callbacks": [
                {"class_path": "selfsup3d.callbacks.ProbeCallback", "init_args": {"num_classes": 15}},
                {"class_path": "selfsup3d.callbacks.TriplaneImages", "init_args": {"num_images": 2}},
            ],
        },
    }
    path = tmp_path / "triplane.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(path)])
    run = tmp_path / "lightning_logs" / "version_0"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    # the teacher is a copy of a randomly initialised encoder: it cannot be rebuilt, so it is saved, once
    teacher = [k for k in ckpt["state_dict"] if k.startswith("teacher.")]
    assert len(teacher) == len([k for k in ckpt["state_dict"] if k.startswith("encoder.")])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/rgb_loss", "train/depth_loss", "train/dist_loss", "train/density_l1", "val/depth_rmse"):
        assert tag in scalars, tag
    assert {"val/probe3d/linear_acc", "val/probe3d/ref_linear_acc", "val/probe3d/depth_rmse"} <= scalars
    assert "val/triplane" in events.Tags()["images"]


@pytest.mark.parametrize("config", ["configs/triplane.yaml", "configs/demo/triplane.yaml"])
def test_shipped_configs_parse(config, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(REPO / config), "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "selfsup3d.objectives.triplane.TriplaneReconstruction"
    assert printed["model"]["init_args"]["lambda_rgb"] == 0.1
