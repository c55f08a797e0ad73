"""The CLI as a user meets it: a toy objective plugged in by class_path, fit, resume, fine-tune, export."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from toy import tiny_encoder_config

from selfsup3d.cli import main
from selfsup3d.encoders.export import load_exported_encoder

ENCODER = tiny_encoder_config(num_out_layers=2)


def write_config(tmp_path: Path, max_steps: int = 3, **model_args) -> Path:
    cfg = {
        "model": {"class_path": "toy.RotationPrediction", "init_args": {"encoder": ENCODER, "lr": 1e-3, **model_args}},
        "data": {"class_path": "toy.RandomImages", "init_args": {"num_samples": 8, "batch_size": 4}},
        "trainer": {
            "accelerator": "cpu",
            "max_steps": max_steps,
            "default_root_dir": str(tmp_path),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 1,
            "callbacks": [{"class_path": "selfsup3d.callbacks.EncoderExport"}],
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_dir(tmp_path: Path, version: int = 0) -> Path:
    return tmp_path / "lightning_logs" / f"version_{version}"


def test_fit_resume_and_export(tmp_path):
    cfg = write_config(tmp_path, max_steps=2)
    main(["fit", "--config", str(cfg)])
    first = run_dir(tmp_path)
    assert (first / "config.yaml").is_file()
    assert (first / "checkpoints" / "last.ckpt").is_file()
    assert (first / "encoder.safetensors").is_file()
    assert yaml.safe_load((first / "config.yaml").read_text())["seed_everything"] == 42

    # resume: --ckpt_path last continues from the newest checkpoint (global step 2 -> 4)
    main(
        [
            "fit",
            "--config",
            str(cfg),
            "--trainer.max_steps",
            "4",
            "--ckpt_path",
            str(first / "checkpoints" / "last.ckpt"),
        ]
    )
    ckpt = torch.load(run_dir(tmp_path, 1) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4

    # export verb, then the exported encoder rebuilds from its own metadata
    out = tmp_path / "enc.safetensors"
    assert main(["export", str(run_dir(tmp_path, 1) / "checkpoints" / "last.ckpt"), "--out", str(out)]) == 0
    enc = load_exported_encoder(out)
    expected = {
        k.removeprefix("encoder.vit."): v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.vit.")
    }
    assert all(torch.equal(v, expected[k]) for k, v in enc.vit.state_dict().items())


def test_interrupted_run_keeps_its_progress_and_resumes(tmp_path):
    cfg = write_config(tmp_path, max_steps=6)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful Ctrl-C shutdown exits with status 1
            main(["fit", "--config", str(cfg), "--trainer.callbacks+=toy.InterruptAt", "--trainer.callbacks.step=3"])
    finally:
        signal.signal(signal.SIGINT, handler)
    last = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3
    main(["fit", "--config", str(cfg), "--ckpt_path", "last"])
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 6


def test_fine_tune_with_init_encoder_from(tmp_path):
    cfg = write_config(tmp_path, max_steps=1)
    main(["fit", "--config", str(cfg)])
    ckpt = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    # a *different* head size: --ckpt_path would force the old hyper-parameters; init_encoder_from does not
    main(
        ["fit", "--config", str(cfg), "--model.init_args.hidden", "8", "--model.init_args.init_encoder_from", str(ckpt)]
    )
    second = torch.load(run_dir(tmp_path, 1) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert second["state_dict"]["head.0.weight"].shape[0] == 8


def test_print_config_is_complete_and_valid(tmp_path, capsys):
    cfg = write_config(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(cfg), "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    parsed = yaml.safe_load(printed)
    assert parsed["model"]["init_args"]["warmup_steps"] == 500  # defaults are filled in
    assert parsed["checkpoint"]["save_last"] is True
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    main(["fit", "--config", str(again), "--trainer.max_steps", "1"])  # the printed config runs as is


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (["--model.init_args.no_such_key", "1"], "no_such_key"),
        (["--model.init_args.lr", "fast"], "lr"),
        (["--model", "toy.NoSuchObjective"], "toy.NoSuchObjective"),
        (["--model.init_args.layer_decay", "2.0"], "model.init_args.layer_decay"),
        (["--model.init_args.encoder.init_args.img_size", "36"], "img_size=36"),
        (["--model.init_args.init_encoder_from", "/nonexistent/enc.ckpt"], "/nonexistent/enc.ckpt"),
    ],
)
def test_config_errors_name_the_key_without_a_traceback(tmp_path, capsys, override, needle):
    cfg = write_config(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(cfg), *override])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err


def test_console_scripts_answer_help():
    bindir = Path(sys.executable).parent
    for cmd in (["selfsup3d", "--help"], ["lightning", "--help"], ["lightning", "fit", "--help"]):
        res = subprocess.run([str(bindir / cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "fit" in res.stdout
