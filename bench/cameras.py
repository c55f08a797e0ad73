"""Cameras against training steps: trains the masked-view demo model on a longer schedule and prints its
validation curve (render PSNR beside the mean colour, aligned-camera errors and AUC, the RayZer pose probe)
from the run's TensorBoard scalars.

    python bench/cameras.py                            # the longer schedule (--steps, default 8000) on the CPU
    python bench/cameras.py --steps 20000 --device gpu # minutes on a GPU
    python bench/cameras.py --run runs/demo_masked_view  # only print the curve of an existing run
    python bench/cameras.py -- --model.init_args.blend_context false   # anything after -- goes to `fit`

The schedule is ``configs/demo/masked_view.yaml`` with ``max_steps`` (and the view window's ``window_steps``
scaled to the same share of it), validation every ``--val-every`` steps. The curve is read from the newest
``events.out.tfevents.*`` under the run folder (``val/*`` scalars by step); ``bench/cameras.py --run`` reads
any run of the masked-view objective the same way.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo" / "masked_view.yaml"

COLUMNS = (
    ("psnr", "PSNR"),
    ("psnr_mean_colour", "mean col."),
    ("psnr_still_cameras", "still cams"),
    ("rot_err", "rot err"),
    ("rot_err_identity", "rot id."),
    ("trans_err", "t err"),
    ("auc5", "AUC@5"),
    ("auc15", "AUC@15"),
    ("auc30", "AUC@30"),
    ("rpa30", "RPA@30"),
    ("depth_abs_rel", "depth AbsRel"),
    ("depth_abs_rel_constant", "const."),
    ("probe_r10", "probe R@10"),
    ("probe_r10_chance", "chance"),
    ("probe_t03", "probe t@.3"),
    ("probe_t03_chance", "chance"),
)
"""``val/<name>`` scalars shown, with their column titles (missing ones are left blank)."""


def read_scalars(run: str | Path, prefix: str = "val/") -> dict[str, dict[int, float]]:
    """``{tag without prefix: {step: value}}`` of every scalar under ``prefix`` in the event files below ``run``
    (all versions, later files overriding earlier ones at the same step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(Path(run).rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files under {run}")
    out: dict[str, dict[int, float]] = {}
    for path in files:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag.startswith(prefix):
                series = out.setdefault(tag[len(prefix) :], {})
                for event in acc.Scalars(tag):
                    series[int(event.step)] = float(event.value)
    return out


def curve_table(scalars: dict[str, dict[int, float]]) -> str:
    """The validation curve as a text table: one row per validated step."""
    names = [(n, title) for n, title in COLUMNS if n in scalars]
    if not names:
        return "(no validation scalars yet)"
    steps = sorted({s for n, _ in names for s in scalars[n]})
    widths = [max(len(title), 6) for _, title in names]
    lines = ["  step  " + "  ".join(t.rjust(w) for (_, t), w in zip(names, widths))]
    for step in steps:
        cells = []
        for (n, _), w in zip(names, widths):
            v = scalars[n].get(step, math.nan)
            cells.append(("" if math.isnan(v) else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}").rjust(w))
        lines.append(f"{step:6d}  " + "  ".join(cells))
    return "\n".join(lines)


def fit_command(steps: int, val_every: int, run: Path, device: str, extra: Sequence[str]) -> list[str]:
    """The ``selfsup3d fit`` command line of the longer schedule."""
    exe = Path(sys.executable).with_name("selfsup3d")
    return [
        str(exe),
        "fit",
        "--config",
        str(CONFIG),
        "--trainer.max_steps",
        str(steps),
        "--trainer.max_time",
        "null",
        "--trainer.accelerator",
        device,
        "--data.init_args.batches_per_epoch",
        str(val_every),
        "--trainer.check_val_every_n_epoch",
        "1",
        "--data.init_args.window_steps",
        str(int(0.75 * steps)),
        "--trainer.default_root_dir",
        str(run),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--run", type=Path, help="print the curve of this existing run instead of training")
    parser.add_argument("--steps", type=int, default=8000, help="training steps (default %(default)s)")
    parser.add_argument("--val-every", type=int, default=500, help="validate every this many steps")
    parser.add_argument("--device", default="cpu", help="trainer accelerator (default %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_cameras", help="run folder")
    args = parser.parse_args(argv)
    run = args.run
    if run is None:
        run = args.out
        command = fit_command(args.steps, args.val_every, run, args.device, extra)
        print("$", " ".join(command), flush=True)
        start = time.perf_counter()
        code = subprocess.call(command, cwd=ROOT)
        print(f"fit exited {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code != 0:
            return code
    print(f"validation curve of {run} (held-out objects):")
    print(curve_table(read_scalars(run)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
