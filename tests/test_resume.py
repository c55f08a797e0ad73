"""A run's life: a run of 2N steps and a run of N steps resumed for N more are the same run (same losses at every
step, the same steps as logged, the same progress bar, the same final weights), alone and in the multi-task demo
config, with data workers, however the first run stopped; the loader's state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from shards import write_multiview_shards, write_singleview_shards
from test_multitask import demo_config
from toy import tiny_encoder_config

from selfsup3d.cli import main
from selfsup3d.datamodules import SingleViewShards
from selfsup3d.datamodules.resumable import ResumeMismatchWarning


@pytest.fixture(scope="module")
def image_urls(tmp_path_factory) -> str:
    return write_singleview_shards(tmp_path_factory.mktemp("resume_images"), num_samples=8, size=32)


@pytest.fixture(scope="module")
def scene_urls(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("resume_scenes")
    train = write_multiview_shards(root, num_scenes=4, num_views=4, size=32, num_shards=2)
    val = write_multiview_shards(root, num_scenes=2, num_views=4, size=32, num_shards=1, split="val", seed=1)
    return train, val


def single_config(tmp_path: Path, urls: str) -> Path:
    """The toy objective on shards: 2 workers, colour jitter, 3 batches per epoch, validation every epoch, spike
    skipping and a moving average of the encoder."""
    cfg = {
        "seed_everything": 7,
        "model": {
            "class_path": "toy.RotationPrediction",
            "init_args": {"encoder": tiny_encoder_config(), "lr": 1e-3, "warmup_steps": 2, "grad_spike_factor": 3.0,
                          "grad_spike_warmup": 2, "ema_decay": 0.9},
        },
        "data": {
            "class_path": "selfsup3d.datamodules.SingleViewShards",
            "init_args": {"train_urls": urls, "val_urls": urls, "image_size": 32, "batch_size": 2, "num_workers": 2,
                          "batches_per_epoch": 3, "val_batches": 1, "with_depth": False, "color_jitter": True,
                          "shuffle_buffer": 4},
        },
        "trainer": {"accelerator": "cpu", "enable_progress_bar": True, "enable_model_summary": False,
                    "num_sanity_val_steps": 0, "log_every_n_steps": 1},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def recorders(root: Path) -> list[str]:
    """CLI arguments that record every step's loss and what the progress bar shows into ``root``."""
    return ["--trainer.callbacks+=toy.RecordLosses", f"--trainer.callbacks.path={root / 'losses.json'}",
            "--trainer.callbacks+=toy.RecordBar", f"--trainer.callbacks.path={root / 'bar.json'}"]  # fmt: skip


def fit(
    cfg: Path, root: Path, max_steps: int, stop_at: int | None = None, resume: bool = False, args: tuple = ()
) -> None:
    """Fit ``max_steps`` (the schedule's length) into ``root``, stopped after ``stop_at`` steps or resumed."""
    argv = ["fit", "--config", str(cfg), "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(max_steps)]
    argv += recorders(root)
    if stop_at is not None:
        argv += ["--trainer.callbacks+=toy.StopAt", f"--trainer.callbacks.step={stop_at}"]
    main([*argv, *args, *(["--ckpt_path", "last"] if resume else [])])


def outcome(root: Path) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    losses = json.loads((root / "losses.json").read_text())
    ckpt = torch.load(root / "lightning_logs/version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    return losses, ckpt["state_dict"]


def logged(run: Path, tag: str = "train/loss") -> list[tuple[int, float]]:
    """``(step, value)`` of every ``tag`` written to TensorBoard in ``run``, file after file (a resumed run adds a
    file), as written: no step dropped or merged."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util.tensor_util import make_ndarray

    return [
        (event.step, float(make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value)
        for path in sorted(run.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
        for event in EventFileLoader(str(path)).Load()
        for value in event.summary.value
        if value.tag == tag
    ]


def assert_same_run(whole: Path, resumed: Path, steps: int, unlogged: tuple[int, ...] = ()) -> None:
    """The same losses at every step, the same steps and values logged (but the logging steps in ``unlogged``,
    lost with an interrupted process), the same progress bar from the resume on, the same final weights."""
    (losses_a, weights_a), (losses_b, weights_b) = outcome(whole), outcome(resumed)
    assert list(losses_a) == [str(s) for s in range(1, steps + 1)]
    assert losses_b == losses_a  # every step, bit for bit
    run_a, run_b = whole / "lightning_logs/version_0", resumed / "lightning_logs/version_0"
    assert [s for s, _ in logged(run_a)] == list(range(steps))
    assert logged(run_b) == [(s, v) for s, v in logged(run_a) if s not in unlogged]  # the same steps, none twice
    bar_a, bar_b = (json.loads((root / "bar.json").read_text()) for root in (whole, resumed))
    assert {k: v for k, v in bar_b.items()} == {k: bar_a[k] for k in bar_b}, (bar_a, bar_b)
    assert weights_a.keys() == weights_b.keys()
    different = [k for k in weights_a if not torch.equal(weights_a[k], weights_b[k])]
    assert not different, different


def test_n_plus_n_is_2n_for_one_objective_with_workers(tmp_path, image_urls):
    cfg = single_config(tmp_path, image_urls)
    fit(cfg, tmp_path / "whole", 8)
    fit(cfg, tmp_path / "resumed", 8, stop_at=4)  # mid-epoch (3 batches per epoch), after one validation
    fit(cfg, tmp_path / "resumed", 8, resume=True)
    assert_same_run(tmp_path / "whole", tmp_path / "resumed", 8)


@pytest.mark.parametrize("how", ["should_stop", "max_time"])
def test_a_run_stopped_by_lightning_mid_epoch_before_any_validation_resumes_exactly(tmp_path, image_urls, how):
    """``trainer.should_stop`` set mid-epoch (by a callback, or by ``--trainer.max_time``) with no validation
    before: Lightning ends the epoch early and counts it as finished; the resume continues it as the
    uninterrupted run does (same per-batch seeds: the objective draws a random rotation per image)."""
    cfg = yaml.safe_load(single_config(tmp_path, image_urls).read_text())
    cfg["model"]["class_path"] = "toy.RandomRotation"
    cfg["trainer"]["check_val_every_n_epoch"] = 1000
    cfg["data"]["init_args"]["batches_per_epoch"] = 20  # every stop before step 8 is mid-epoch
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    fit(path, tmp_path / "whole", 8)
    if how == "should_stop":
        fit(path, tmp_path / "resumed", 8, stop_at=3)
    else:  # 1 s of training at 0.25 s a step: Lightning's Timer stops the run after a few steps
        slow = ["--trainer.callbacks+=toy.MarkStep", f"--trainer.callbacks.path={tmp_path / 'marker'}",
                "--trainer.callbacks.step=0", "--trainer.callbacks.sleep=0.25"]  # fmt: skip
        fit(path, tmp_path / "resumed", 8, args=("--trainer.max_time", "00:00:00:01", *slow))
    stopped = torch.load(tmp_path / "resumed/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert 1 <= stopped["global_step"] < 8
    # the Timer keeps the time trained in the checkpoint: the resume gives the run more time (here: none)
    fit(path, tmp_path / "resumed", 8, resume=True, args=("--trainer.max_time", "null") if how == "max_time" else ())
    assert_same_run(tmp_path / "whole", tmp_path / "resumed", 8)


def test_n_plus_n_is_2n_for_the_multitask_demo_config_with_workers(tmp_path, scene_urls):
    cfg = demo_config(tmp_path, scene_urls)
    for source in cfg["data"]["init_args"]["sources"].values():
        source["init_args"].update(num_workers=1, batches_per_epoch=3)
    # the view-overlap curriculum: windows of 3 -> 4 consecutive views over the run's steps
    scenes = cfg["data"]["init_args"]["sources"]["scenes"]["init_args"]
    scenes.update(num_views=3, num_context_views=2, view_window=[3, 4], window_steps=4)
    cfg["model"]["init_args"].update(grad_spike_factor=3.0, grad_spike_warmup=2, ema_decay=0.9)
    cfg["trainer"].update(callbacks=[], enable_progress_bar=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    fit(path, tmp_path / "whole", 6)
    fit(path, tmp_path / "resumed", 6, stop_at=2)
    fit(path, tmp_path / "resumed", 6, resume=True)
    assert_same_run(tmp_path / "whole", tmp_path / "resumed", 6)
    assert any(k.startswith("ema_encoder.") for k in outcome(tmp_path / "whole")[1])  # the average came back too


def _keys(loader, n: int) -> list[str]:
    return [key for batch in (b for _, b in zip(range(n), loader)) for key in batch["key"]]


def test_the_loader_state_resumes_the_stream_and_warns_when_it_cannot(image_urls):
    def make(workers: int = 1):
        dm = SingleViewShards(image_urls, batch_size=2, num_workers=workers, batches_per_epoch=3, with_depth=False,
                              image_size=32, seed=3)  # fmt: skip
        dm.setup("fit")
        return dm.train_dataloader()

    loader = make()
    epochs = [_keys(loader, 3) for _ in range(3)]  # three epochs
    assert epochs[0] != epochs[1] != epochs[2]  # every epoch its own draw
    again = make()
    _keys(again, 3)
    first = iter(again)
    partial = [next(first)["key"] for _ in range(2)]  # epoch 1, two batches in
    state = again.state_dict()
    assert state["epoch"] == 1 and state["batches"] == 2
    resumed = make()
    resumed.load_state_dict(state)
    rest = _keys(resumed, 3)
    assert [k for keys in partial for k in keys] + rest == epochs[1]
    assert _keys(resumed, 3) == epochs[2]
    other = make(workers=2)
    with pytest.warns(ResumeMismatchWarning, match="num_workers 1 -> 2"):
        other.load_state_dict(state)


def test_the_encoders_moving_average_is_validated_exported_and_saved(tmp_path, image_urls):
    from selfsup3d.encoders.export import load_exported_encoder

    cfg = yaml.safe_load(single_config(tmp_path, image_urls).read_text())
    cfg["model"]["init_args"]["ema_decay"] = 0.5
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    root = tmp_path / "run"
    fit(path, root, 3)
    run = root / "lightning_logs/version_0"
    state = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    raw = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    ema = {k.removeprefix("ema_encoder."): v for k, v in state.items() if k.startswith("ema_encoder.")}
    assert raw.keys() == ema.keys()  # the encoder only: the heads stay out
    moved = [k for k in raw if not torch.equal(raw[k], ema[k])]
    assert moved  # the average lags the weights
    exported = load_exported_encoder(run / "encoder.safetensors").vit.state_dict()
    assert all(torch.equal(v, ema[f"vit.{k}"]) for k, v in exported.items())  # the export is the average
    from toy import RotationPrediction

    model = RotationPrediction.load_from_checkpoint(run / "checkpoints/last.ckpt")
    assert model.encoder_for("val") is model.ema_encoder and model.encoder_for("train") is model.encoder
    # one update by hand: ema <- 0.5 ema + 0.5 weights
    before = {k: v.clone() for k, v in model.ema_encoder.state_dict().items()}
    model.update_ema()
    after, weights = model.ema_encoder.state_dict(), model.encoder.state_dict()
    k = next(k for k in moved if after[k].is_floating_point())
    assert torch.allclose(after[k], 0.5 * before[k] + 0.5 * weights[k])


def test_a_moving_average_teacher_follows_the_student_and_is_saved():
    from conftest import tiny_encoder
    from test_multitask import TRIPLANE

    from selfsup3d.objectives import TriplaneReconstruction

    torch.manual_seed(0)
    model = TriplaneReconstruction(tiny_encoder(), teacher="ema:0.5", **TRIPLANE)
    teacher = model.teacher.encoder
    start = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)  # the student moved (an optimiser step)
    model.update_ema()
    after, student = teacher.state_dict(), model.encoder.state_dict()
    name = next(k for k, v in after.items() if v.is_floating_point() and v.numel() > 1)
    assert torch.allclose(after[name], 0.5 * start[name] + 0.5 * student[name])
    assert any(k.startswith("teacher.") for k in model.state_dict())  # not rebuildable: saved in checkpoints
    with pytest.raises(Exception, match="ema:DECAY"):
        TriplaneReconstruction(tiny_encoder(), teacher="ema:1.5", **TRIPLANE)
