"""The CLI as a user meets it: a toy objective plugged in by class_path, fit, resume, fine-tune, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from processes import signal_at_marker
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
    assert (run_dir(tmp_path) / "encoder.safetensors").is_file()  # the encoder is exported on Ctrl-C too
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
        (["--model.init_args.no_such_key", "1"], "model.init_args.no_such_key"),
        (["--model.init_args.lr", "fast"], "model.init_args.lr: expected float, got 'fast'"),
        (["--model", "toy.NoSuchObjective"], "toy.NoSuchObjective"),
        (["--model.init_args.layer_decay", "2.0"], "model.init_args.layer_decay"),
        (["--model.init_args.encoder.init_args.img_size", "36"], "img_size=36"),
        (["--model.init_args.encoder.init_args.img_size", "big"], "model.init_args.encoder.init_args.img_size"),
        (["--model.init_args.init_encoder_from", "/nonexistent/enc.ckpt"], "/nonexistent/enc.ckpt"),
        (["--trainer.max_epochs", "x"], "trainer.max_epochs: expected int or None, got 'x'"),
        (["--trainer.no_such", "1"], "--trainer.no_such"),
        (["--trainer.callbacks+=NoSuchCallback"], "NoSuchCallback"),
        (["--config", "/nonexistent.yaml"], "/nonexistent.yaml"),
    ],
)
def test_config_errors_are_one_line_naming_the_key(tmp_path, capsys, override, needle):
    cfg = write_config(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(cfg), *override])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 2, err  # the problem, then where to get help; no page of usage
    assert lines[0].startswith("selfsup3d fit: error: ") and "selfsup3d fit --help" in lines[1]


def test_an_unknown_subcommand_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fitt"])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "'fitt'" in lines[0] and "--help" in lines[1]


def test_console_scripts_answer_help():
    bindir = Path(sys.executable).parent
    for cmd in (["selfsup3d", "--help"], ["lightning", "--help"], ["lightning", "fit", "--help"]):
        res = subprocess.run([str(bindir / cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "fit" in res.stdout


def test_init_encoder_from_a_file_that_is_not_weights_is_one_line(tmp_path, capsys):
    notes = tmp_path / "notes.ckpt"
    notes.write_text("these are my notes, not weights\n" * 4)
    cfg = write_config(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(cfg), "--model.init_args.init_encoder_from", str(notes)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert str(notes) in err and "is not a weights file" in err
    assert "Traceback" not in err and "weights_only=False" not in err


# The README's plain-timm line, verbatim (README.md, "Export the encoder"); only timm and safetensors.
README_TIMM = """\
import json, timm, torch
from safetensors import safe_open

with safe_open("encoder.safetensors", "pt") as f:
    meta = f.metadata()
model = timm.create_model(meta["timm_name"], checkpoint_path="encoder.safetensors", **json.loads(meta["timm_kwargs"]))
# it expects ImageNet-normalised input, as selfsup3d fed it: images in [0, 1], less the mean, over the std
mean, std = (torch.tensor(model.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
features = model.eval().forward_features((images - mean) / std)  # images: [B, 3, H, W] in [0, 1]
"""


def _features_in_plain_timm(folder: Path, images: torch.Tensor) -> torch.Tensor:
    """Run the README's lines in a fresh interpreter that never imports selfsup3d; their features of ``images``
    (in ``[0, 1]``)."""
    torch.save(images, folder / "images.pt")
    script = (
        "import torch\n"
        "images = torch.load('images.pt')\n" + README_TIMM + "import sys\n"
        "assert not any(m.split('.')[0] == 'selfsup3d' for m in sys.modules), 'selfsup3d was imported'\n"
        "torch.save(features, 'features.pt')\n"
    )
    res = subprocess.run([sys.executable, "-c", script], cwd=folder, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(folder / "features.pt")


@pytest.mark.parametrize("how", ["fit", "export verb"])
def test_exported_encoder_loads_in_plain_timm_with_the_readme_line(tmp_path, capsys, how):
    cfg = write_config(tmp_path, max_steps=1)
    main(["fit", "--config", str(cfg)])
    folder = tmp_path / "plain"
    folder.mkdir()
    if how == "fit":  # EncoderExport's file
        (folder / "encoder.safetensors").write_bytes((run_dir(tmp_path) / "encoder.safetensors").read_bytes())
    else:
        last = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
        assert main(["export", str(last), "--out", str(folder / "encoder.safetensors")]) == 0
        # the verb also prints the filled-in line, and prints it again for an exported file
        line = "timm.create_model('vit_small_patch14_dinov2', checkpoint_path="
        assert line in capsys.readouterr().out
        assert main(["export", str(folder / "encoder.safetensors")]) == 0
        printed = capsys.readouterr().out
        assert line in printed and "num_heads=2" in printed and "init_values=1e-05" in printed
    encoder = load_exported_encoder(folder / "encoder.safetensors").eval()
    images = torch.rand(2, 3, 32, 32)
    expected = encoder.vit.forward_features(encoder.normalize(images))  # what selfsup3d's encoder computes
    assert torch.allclose(_features_in_plain_timm(folder, images), expected, atol=1e-6)


@pytest.mark.parametrize(
    "name,hub_id", [("test_vit", "test_vit.r160_in1k"), ("small", "vit_small_patch14_dinov2.lvd142m")]
)
@pytest.mark.parametrize("network", ["offline mode", "no network"])
def test_pretrained_weights_unavailable_say_what_to_do_in_one_line(
    tmp_path, capsys, monkeypatch, request, network, name, hub_id
):
    from huggingface_hub import constants

    if network == "no network":
        request.getfixturevalue("no_network")
    else:
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    cfg = yaml.safe_load(write_config(tmp_path).read_text())
    cfg["model"]["init_args"]["encoder"]["init_args"] = {"name": name, "img_size": 28, "pretrained": True}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(tmp_path / "config.yaml")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "checkpoint_path" in err and f"timm/{hub_id}" in err  # the project's advice, not only the hub's
    assert "Traceback" not in err
    # the advice is whole (the why, quoting the network library's error, may be shortened; the advice never)
    assert err.splitlines()[0].endswith("then set the encoder's checkpoint_path to the file and pretrained to false.")


def test_sigterm_saves_checkpoint_and_encoder_then_exits_143(tmp_path):
    """What a scheduler does at the end of a time slot: SIGTERM mid-epoch. The run saves, then fails (128 + 15)."""
    cfg = write_config(tmp_path, max_steps=100_000)
    marker = tmp_path / "training"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "selfsup3d"), "fit", "--config", str(cfg)]
    cmd += ["--trainer.callbacks+=toy.MarkStep", f"--trainer.callbacks.path={marker}", "--trainer.callbacks.step=3"]
    returncode, output = signal_at_marker(cmd, env, marker, signal.SIGTERM)
    assert returncode == 128 + signal.SIGTERM, output[-3000:]
    last = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert 3 <= ckpt["global_step"] < 100_000
    encoder = load_exported_encoder(run_dir(tmp_path) / "encoder.safetensors")
    saved = {k.removeprefix("encoder.vit."): v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.vit.")}
    assert all(torch.equal(v, saved[k]) for k, v in encoder.vit.state_dict().items())  # the interrupted weights


def test_a_crashing_fit_still_exports_the_encoder(tmp_path):
    cfg = write_config(tmp_path, max_steps=6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["fit", "--config", str(cfg), "--trainer.callbacks+=toy.InterruptAt", "--trainer.callbacks.step=2",
              "--trainer.callbacks.crash=true"])  # fmt: skip
    assert (run_dir(tmp_path) / "encoder.safetensors").is_file()
    assert torch.load(run_dir(tmp_path) / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    # resuming that run crashes before its weights are restored: the exported encoder is not overwritten
    exported = (run_dir(tmp_path) / "encoder.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="crash at setup"):
        main(["fit", "--config", str(cfg), "--ckpt_path", "last", "--trainer.callbacks+=toy.CrashAtSetup"])
    assert (run_dir(tmp_path) / "encoder.safetensors").read_bytes() == exported


# ---------------------------------------------------------------------------- one callback's argument
def _printed_callbacks(capsys, argv: list[str]) -> list[dict]:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--print_config"])
    assert exit_.value.code == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]


@pytest.mark.parametrize("key", ["--trainer.callbacks.init_args.num_classes", "--trainer.callbacks.num_classes"])
def test_one_callbacks_argument_is_overridden_by_name(tmp_path, capsys, key):
    cfg = yaml.safe_load(write_config(tmp_path).read_text())
    probes = {"class_path": "selfsup3d.callbacks.ProbeCallback", "init_args": {"num_classes": 10, "bank_size": 64}}
    cfg["trainer"]["callbacks"].insert(0, probes)  # not the last one: jsonargparse alone only reaches the last
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    callbacks = _printed_callbacks(capsys, ["fit", "--config", str(tmp_path / "config.yaml"), key, "3"])
    assert [c["class_path"].rsplit(".", 1)[-1] for c in callbacks] == ["ProbeCallback", "EncoderExport"]
    assert callbacks[0]["init_args"]["num_classes"] == 3 and callbacks[0]["init_args"]["bank_size"] == 64
    # the usual form keeps its meaning: after `+=`, the arguments go to the callback just appended
    callbacks = _printed_callbacks(
        capsys,
        ["fit", "--config", str(tmp_path / "config.yaml"), key, "4", "--trainer.callbacks+=toy.InterruptAt",
         "--trainer.callbacks.step=5", "--trainer.callbacks.crash=true"],
    )  # fmt: skip
    assert [c["class_path"].rsplit(".", 1)[-1] for c in callbacks] == ["ProbeCallback", "EncoderExport", "InterruptAt"]
    assert callbacks[0]["init_args"]["num_classes"] == 4
    assert callbacks[-1]["init_args"] == {"step": 5, "crash": True, "mid_step": False}


def test_a_callback_argument_no_or_several_callbacks_take_is_a_usage_error(tmp_path, capsys):
    cfg = yaml.safe_load(write_config(tmp_path).read_text())
    cfg["trainer"]["callbacks"].append({"class_path": "selfsup3d.callbacks.EncoderExport"})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    for key, needle in (("filename", "2 callbacks take 'filename'"), ("num_classes", "no callback takes")):
        with pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", str(tmp_path / "config.yaml"), f"--trainer.callbacks.init_args.{key}", "3"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert needle in err and "EncoderExport" in err and len(err.strip().splitlines()) == 2


def test_demo_config_probe_classes_from_the_command_line(capsys):
    config = str(Path(__file__).resolve().parents[1] / "configs" / "demo" / "triplane.yaml")
    argv = ["fit", "--config", config, "--trainer.callbacks.init_args.num_classes", "3"]
    callbacks = _printed_callbacks(capsys, argv)
    (probes,) = [c for c in callbacks if c["class_path"].endswith("ProbeCallback")]
    assert probes["init_args"]["num_classes"] == 3


# ---------------------------------------------------------------------------- the progress bar
def test_progress_bar_of_a_step_bounded_run_and_its_resume(tmp_path):
    """Shards stream without an end; the bar still counts each epoch's batches (not the remaining steps), says
    'Epoch 1' (not 'Epoch 1/-2') and shows the run's version as it is, also after --ckpt_path last."""
    from shards import write_singleview_shards

    urls = write_singleview_shards(tmp_path / "shards", num_samples=8, size=32)
    cfg = yaml.safe_load(write_config(tmp_path, max_steps=10).read_text())
    cfg["data"] = {
        "class_path": "selfsup3d.datamodules.SingleViewShards",
        "init_args": {"train_urls": urls, "val_urls": urls, "image_size": 32, "batch_size": 2, "num_workers": 0,
                      "batches_per_epoch": 3, "val_batches": 2, "with_depth": False},
    }  # fmt: skip
    cfg["trainer"].update(enable_progress_bar=True, limit_val_batches=None, num_sanity_val_steps=0)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    record = tmp_path / "progress.json"
    watch = ["--trainer.callbacks+=toy.RecordProgress", f"--trainer.callbacks.path={record}"]
    main(["fit", "--config", str(tmp_path / "config.yaml"), *watch])
    seen = json.loads(record.read_text())
    assert seen["train"] == {"total": 3, "description": "Epoch 1", "v_num": "0", "version": 0}
    assert seen["val"]["total"] == 2
    # resume the same run in place: the same version, shown as such
    main(["fit", "--config", str(tmp_path / "config.yaml"), "--trainer.max_steps", "20", "--ckpt_path", "last", *watch])
    seen = json.loads(record.read_text())
    assert seen["train"]["v_num"] == "0" and seen["train"]["version"] == 0
    assert not (tmp_path / "lightning_logs" / "version_1").exists()


def test_the_default_progress_bar_is_off_when_the_trainer_says_so(tmp_path):
    from selfsup3d.cli import SelfSup3DCLI

    cfg = write_config(tmp_path)  # enable_progress_bar: false
    cli = SelfSup3DCLI(args=["fit", "--config", str(cfg), "--trainer.max_steps", "0"])
    assert cli.trainer.progress_bar_callback is None


def test_validate_ckpt_path_last_evaluates_the_newest_run(tmp_path, capsys, caplog):
    cfg = write_config(tmp_path, max_steps=2)
    with pytest.raises(SystemExit) as exit_:
        main(["validate", "--config", str(cfg), "--ckpt_path", "last"])
    assert exit_.value.code == 2 and "no run under" in capsys.readouterr().err
    main(["fit", "--config", str(cfg)])
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "4", "--ckpt_path", "last"])  # continues version_0
    assert not run_dir(tmp_path, 1).exists()
    caplog.clear()
    with caplog.at_level("INFO"):
        main(["validate", "--config", str(cfg), "--ckpt_path", "last"])
    assert f"evaluating {run_dir(tmp_path) / 'checkpoints' / 'last.ckpt'}" in caplog.text


def test_evaluating_a_run_stopped_before_its_max_steps_says_so(tmp_path):
    """A demo stopped by its max_time safety net on a busy machine printed the figures of a much shorter run (126 of
    2000 steps) as the demo's; an evaluation now says when the checkpoint is short of the config's max_steps."""
    import warnings

    cfg = write_config(tmp_path, max_steps=2)
    main(["fit", "--config", str(cfg)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole run: nothing to say
        warnings.filterwarnings("ignore", message=r"(?!.*max_steps).*")
        main(["validate", "--config", str(cfg), "--ckpt_path", "last"])
    with pytest.warns(UserWarning, match=r"last\.ckpt was written at step 2 of the config's max_steps 5 \(the run"):
        main(["validate", "--config", str(cfg), "--ckpt_path", "last", "--trainer.max_steps", "5"])
