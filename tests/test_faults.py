"""Faults in a run's life: SIGTERM mid-epoch and an exact resume, a process killed while writing a checkpoint,
a corrupt checkpoint, non-finite losses."""

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
from test_resume import assert_same_run, fit, image_urls, recorders, single_config  # noqa: F401  (a fixture)
from toy import tiny_encoder_config

from selfsup3d.checkpoint_io import AtomicCheckpointIO, checkpoint_readable
from selfsup3d.cli import main

TESTS = Path(__file__).parent
SCRIPT = Path(sys.executable).parent / "selfsup3d"
ENV = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}


def test_sigterm_mid_epoch_then_resume_is_the_uninterrupted_run(tmp_path, image_urls):  # noqa: F811
    cfg = single_config(tmp_path, image_urls)
    root, marker = tmp_path / "resumed", tmp_path / "at_step_4"
    cmd = [str(SCRIPT), "fit", "--config", str(cfg), "--trainer.default_root_dir", str(root), "--trainer.max_steps",
           "8", *recorders(root), "--trainer.callbacks+=toy.MarkStep", f"--trainer.callbacks.path={marker}",
           "--trainer.callbacks.step=4", "--trainer.callbacks.sleep=1.0"]  # fmt: skip
    returncode, output = signal_at_marker(cmd, ENV, marker, signal.SIGTERM)
    assert returncode == 128 + signal.SIGTERM, output[-3000:]
    last = root / "lightning_logs/version_0/checkpoints/last.ckpt"
    stopped = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 4 <= stopped < 8  # mid-epoch (3 batches per epoch) for 4 and 5
    fit(cfg, root, 8, resume=True)
    fit(cfg, tmp_path / "whole", 8)
    assert_same_run(tmp_path / "whole", root, 8)


@pytest.mark.parametrize("crash", [False, True], ids=["ctrl-c", "crash"])
@pytest.mark.parametrize("mid_step", [False, True], ids=["between-steps", "mid-step"])
def test_a_run_interrupted_by_ctrl_c_or_a_crash_resumes_exactly(tmp_path, image_urls, crash, mid_step):  # noqa: F811
    """Ctrl-C (Lightning's graceful shutdown) or an exception at the end of step 4, or once the next batch is
    fetched (the loader has given 5 batches, 4 were trained on: the resume trains on the 5th, as the uninterrupted
    run did); the resume logs every later step where the uninterrupted run does. (Interrupted in step 4's end
    hooks, the step is saved but its metrics are not logged: Lightning logs them after those hooks.)"""
    cfg = single_config(tmp_path, image_urls)
    root = tmp_path / "resumed"
    argv = ["fit", "--config", str(cfg), "--trainer.default_root_dir", str(root), "--trainer.max_steps", "8",
            *recorders(root), "--trainer.callbacks+=toy.InterruptAt", "--trainer.callbacks.step=4",
            f"--trainer.callbacks.mid_step={str(mid_step).lower()}",
            f"--trainer.callbacks.crash={str(crash).lower()}"]  # fmt: skip
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(RuntimeError if crash else SystemExit):
            main(argv)
    finally:
        signal.signal(signal.SIGINT, handler)
    state = torch.load(root / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert state["global_step"] == 4
    (loader,) = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    # epoch 1 (3 batches per epoch): its first batch trained on, its second fetched when interrupted mid-step
    assert (loader["epoch"], loader["batches"]) == (1, 2 if mid_step else 1)
    fit(cfg, root, 8, resume=True)
    fit(cfg, tmp_path / "whole", 8)
    assert_same_run(tmp_path / "whole", root, 8, unlogged=() if mid_step else (3,))  # (step 4 is logged at 3)


KILL_WHILE_SAVING = """
import os, sys, torch
from selfsup3d.checkpoint_io import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
real_save = torch.save
def save_then_die(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    f.truncate(f.tell() // 2)   # half the bytes are on disk when the process dies
    f.flush()
    os._exit(9)                 # no clean-up of any kind, as with SIGKILL
torch.save = save_then_die
io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "global_step": 2}, path)
"""


def test_a_process_killed_while_writing_leaves_the_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    result = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING, str(path)], env=ENV, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 9, result.stderr[-2000:]
    assert checkpoint_readable(path)
    assert AtomicCheckpointIO().load_checkpoint(path, weights_only=True)["global_step"] == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.")  # the dead write's temporary file only


def toy_config(tmp_path: Path, **model_args) -> Path:
    tmp_path.mkdir(exist_ok=True)
    cfg = {
        "model": {"class_path": "toy.FlakyRotation", "init_args": {"encoder": tiny_encoder_config(), **model_args}},
        "data": {"class_path": "toy.RandomImages", "init_args": {"num_samples": 8, "batch_size": 4}},
        "trainer": {"accelerator": "cpu", "default_root_dir": str(tmp_path), "enable_progress_bar": False,
                    "enable_model_summary": False, "limit_val_batches": 1, "log_every_n_steps": 1},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_cli_writes_checkpoints_atomically_and_a_corrupt_one_is_one_line(tmp_path, capsys):
    cfg = toy_config(tmp_path)
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "2"])
    folder = tmp_path / "lightning_logs/version_0/checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step00000002.ckpt", "step00000004.ckpt"]
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a copy cut short, a damaged disk
    for ckpt_path in ("last", str(last)):
        with pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", str(cfg), "--trainer.max_steps", "6", "--ckpt_path", ckpt_path])
        assert exit_.value.code == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert f"checkpoint {last} cannot be read" in err
        assert f"the previous good checkpoint is {folder / 'step00000004.ckpt'}" in err
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step00000002.ckpt", "step00000004.ckpt"]


def test_non_finite_losses_skip_their_steps_and_are_counted(tmp_path):
    cfg = toy_config(tmp_path, nan_at=[1, 2], lr=1e-2)
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "3"])
    ckpt = torch.load(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["selfsup3d_run_state"]["nonfinite_total"] == 2
    assert ckpt["global_step"] == 3  # a skipped step counts, as Lightning counts it (the schedule follows batches)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "lightning_logs/version_0")).Reload()
    assert [e.value for e in events.Scalars("train/skipped_nonfinite")][-1] == 2.0
    # nothing moved in the skipped steps: the weights are those of the one good step (a 1-step run; warm-up lr)
    one = toy_config(tmp_path / "one", lr=1e-2)
    main(["fit", "--config", str(one), "--trainer.max_steps", "1"])
    good = torch.load(tmp_path / "one/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert all(torch.equal(v, good["state_dict"][k]) for k, v in ckpt["state_dict"].items())


def test_a_run_of_only_non_finite_losses_stops_with_a_clear_message(tmp_path, capsys):
    cfg = toy_config(tmp_path, nan_from=1, max_nonfinite_steps=3)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(cfg), "--trainer.max_steps", "100"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "the loss was NaN or infinite in 3 steps in a row" in err and len(err.splitlines()) == 1, err
    ckpt = torch.load(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["selfsup3d_run_state"]["nonfinite_streak"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


# about 20 s (two spawned processes): Lightning refuses a skipped training_step under DDP, so the skip must not be one
def test_non_finite_losses_are_skipped_together_by_two_ddp_ranks(tmp_path):
    cfg = yaml.safe_load(toy_config(tmp_path, nan_at=[1, 2], lr=1e-2).read_text())
    cfg["trainer"].update(devices=2, strategy="ddp", max_steps=4)
    cfg["data"]["init_args"]["num_samples"] = 16
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = subprocess.run([str(SCRIPT), "fit", "--config", str(path)], env=ENV, capture_output=True, text=True,
                            timeout=240, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["selfsup3d_run_state"]["nonfinite_total"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


SLURM = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "pretrain", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1"}  # fmt: skip


def test_slurm_sigusr1_saves_at_a_step_boundary_requeues_and_the_requeued_job_continues_exactly(
    tmp_path,
    image_urls,  # noqa: F811
    monkeypatch,
):
    """SLURM's pre-emption warning (SIGUSR1, configs/gpu/slurm.yaml): the run saves hpc_ckpt_1.ckpt at the end of
    the step in progress and calls `scontrol requeue`; the requeued job (the same command, no --ckpt_path)
    continues from it exactly as the run went on."""
    cfg = single_config(tmp_path, image_urls)
    bin_dir, root, marker = tmp_path / "bin", tmp_path / "run", tmp_path / "at_step_3"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**ENV, **SLURM, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    base = ["fit", "--config", str(cfg), "--config", str(TESTS.parent / "configs/gpu/slurm.yaml"),
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", "8"]  # fmt: skip
    cmd = [str(SCRIPT), *base, "--trainer.callbacks+=toy.RecordLosses",
           f"--trainer.callbacks.path={root / 'first.json'}", "--trainer.callbacks+=toy.MarkStep",
           f"--trainer.callbacks.path={marker}", "--trainer.callbacks.step=3",
           "--trainer.callbacks.sleep=0.5"]  # fmt: skip
    returncode, output = signal_at_marker(cmd, env, marker, signal.SIGUSR1)
    assert returncode == 0, output[-3000:]  # the job itself goes on; SLURM ends it and starts it again
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    hpc = torch.load(root / "hpc_ckpt_1.ckpt", weights_only=True)
    saved_at = hpc["global_step"]
    assert 3 <= saved_at < 8
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    main([*base, "--trainer.callbacks+=toy.RecordLosses", f"--trainer.callbacks.path={root / 'requeued.json'}"])
    first = json.loads((root / "first.json").read_text())
    requeued = json.loads((root / "requeued.json").read_text())
    assert list(requeued) == [str(s) for s in range(saved_at + 1, 9)]
    assert requeued == {k: first[k] for k in requeued}


def test_the_requeue_signal_waits_for_the_end_of_the_step():
    from types import SimpleNamespace

    from selfsup3d.callbacks import StepBoundaryRequeue

    calls = []
    requeue = StepBoundaryRequeue()
    requeue._signal, requeue._lightning = int(signal.SIGUSR1), lambda signum, frame: calls.append(signum)
    trainer = SimpleNamespace(world_size=1)
    requeue.on_train_batch_end(trainer, None)
    requeue._defer(signal.SIGUSR1, None)  # the signal arrives mid-step: nothing is saved yet
    assert calls == []
    requeue.on_train_batch_end(trainer, None)  # the step is over: Lightning's handler saves and requeues once
    requeue.on_train_batch_end(trainer, None)
    assert calls == [int(signal.SIGUSR1)]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoints_and_exports_get_the_permissions_of_the_umask(tmp_path, umask):
    """Teammates on a shared cluster read a run's files as far as the umask lets them (the atomic writer's
    temporary file used to keep mkstemp's 0600, and safetensors writes 0600 too); an existing file's mode stays."""
    cfg = toy_config(tmp_path)
    previous = os.umask(umask)
    try:
        main(["fit", "--config", str(cfg), "--trainer.max_steps", "2", "--checkpoint.every_n_train_steps", "1",
              "--trainer.callbacks+=selfsup3d.callbacks.EncoderExport"])  # fmt: skip
        run = tmp_path / "lightning_logs/version_0"
        exported = tmp_path / "exported.safetensors"
        assert main(["export", str(run / "checkpoints/last.ckpt"), "--out", str(exported)]) == 0
        written = [*(run / "checkpoints").iterdir(), run / "encoder.safetensors", exported]
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in written}
        assert modes == {p.name: oct(0o666 & ~umask) for p in written}
        (run / "checkpoints/last.ckpt").chmod(0o640)  # a file its owner chose the mode of: rewriting keeps it
        main(["fit", "--config", str(cfg), "--trainer.max_steps", "3", "--ckpt_path", "last"])
        assert (run / "checkpoints/last.ckpt").stat().st_mode & 0o777 == 0o640
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary left
    finally:
        os.umask(previous)
