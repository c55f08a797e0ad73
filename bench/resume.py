"""Does a resumed run continue the same run? Fits a config for 2N steps (checkpointing at step N), then resumes
a second fit from that step-N checkpoint, and prints how the resumed run's losses compare with the whole run's
steps N+1..2N (the same run: max |difference| 0) and with its steps 1..N (a stream that restarted from its
beginning correlates with them), and whether the final weights are identical.

    .venv/bin/python bench/resume.py                     # configs/demo/masked_view.yaml, 30 + 30 steps
    .venv/bin/python bench/resume.py --config configs/demo/multitask.yaml --steps 10

Runs the ``selfsup3d`` CLI of the interpreter it is started with (so another checkout's interpreter measures
that checkout), in a temporary folder; data paths of the config are relative to the current directory.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DEMO = "configs/demo/masked_view.yaml"


def fit(config: str, root: Path, steps: int, extra: list[str]) -> float:
    """One fit into ``root`` with per-step CSV logging; its wall time in seconds."""
    argv = [sys.executable, "-m", "selfsup3d.cli", "fit", "--config", config, "--trainer.max_steps", str(steps),
            "--trainer.default_root_dir", str(root), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", str(root), "--trainer.log_every_n_steps", "1", "--trainer.max_time", "null",
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]", *extra]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return time.perf_counter() - start


def losses(root: Path) -> dict[int, float]:
    """``train/loss`` by global step (the step after the update, as Lightning logs it) from the CSV log."""
    out: dict[int, float] = {}
    for path in root.glob("lightning_logs/version_*/metrics.csv"):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    out[int(row["step"])] = float(row["train/loss"])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEMO, help="the config to fit (default %(default)s; `make bench` runs it)")
    parser.add_argument("--steps", type=int, default=30, help="N: the whole run has 2N steps")
    args = parser.parse_args(argv)
    n = args.steps
    with tempfile.TemporaryDirectory() as tmp:
        whole, resumed = Path(tmp) / "whole", Path(tmp) / "resumed"
        t_whole = fit(args.config, whole, 2 * n, ["--checkpoint.every_n_train_steps", str(n)])
        (at_n,) = whole.glob(f"lightning_logs/version_0/checkpoints/*{n:08d}.ckpt")
        t_resumed = fit(args.config, resumed, 2 * n, ["--ckpt_path", str(at_n)])
        a, b = losses(whole), losses(resumed)
        steps = sorted(s for s in b if s in a)
        second = [a[s] for s in steps]
        first = [a[s - len(steps)] for s in steps]
        mine = [b[s] for s in steps]
        diff = max(abs(x - y) for x, y in zip(mine, second, strict=True))
        w_a = torch.load(whole / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)["state_dict"]
        w_b = torch.load(resumed / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)["state_dict"]
        same = sum(torch.equal(v, w_b[k]) for k, v in w_a.items())
    print(f"config {args.config}: whole run {2 * n} steps ({t_whole:.0f} s), resumed at step {n} ({t_resumed:.0f} s)")
    print(f"resumed steps logged: {len(steps)} ({steps[0]}..{steps[-1]})")
    print(f"max |loss(resumed) - loss(whole, same step)|: {diff:.3g}")
    print(f"correlation with the whole run's same steps: {statistics.correlation(mine, second):.3f}")
    print(f"correlation with the whole run's first steps: {statistics.correlation(mine, first):.3f}")
    print(f"final weights identical: {same} of {len(w_a)} tensors")


if __name__ == "__main__":
    main()
