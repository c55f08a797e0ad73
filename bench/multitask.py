"""The cost of composing objectives: a multi-task training step beside the sum of its objectives' own steps.

The multi-task model is built exactly as ``selfsup3d fit --config CFG`` builds it (default: the CPU demo,
configs/demo/multitask.yaml: the three objectives on one encoder). Each
objective is then also set up alone, as a standalone objective with its own copy of the encoder, on the
same batch of its source. One training step (forward, backward, AdamW step) of each is timed, in turns
(multi-task, then each objective alone, repeated), and the medians are printed with

    ratio = multi-task step / sum of the objectives' steps alone

which is 1 when the composition adds no work (goal: at most 1.05). Batches are random tensors of the
config's shapes (the data loader is not timed).

    .venv/bin/python bench/multitask.py
    .venv/bin/python bench/multitask.py --rounds 30 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from selfsup3d.cli import SelfSup3DCLI
from selfsup3d.datamodules import CombinedShards, DataSpec
from selfsup3d.geometry.cameras import intrinsics_from_fov, look_at, spherical_to_cartesian
from selfsup3d.objectives import MultiTask, PretrainObjective

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "multitask.yaml"


def random_batch(spec: DataSpec, batch_size: int) -> dict[str, Any]:
    """A batch of ``spec``'s shape with random images (and depth in [1.5, 3.5] where the source has depth)."""
    h, w = spec.image_hw
    if spec.kind == "multi_view":
        assert spec.num_views is not None
        out: dict[str, Any] = {
            "images": torch.rand(batch_size, spec.num_views, 3, h, w),
            "num_context": spec.num_context_views,
        }
        lead: tuple[int, ...] = (batch_size, spec.num_views)
    else:
        out = {"image": torch.rand(batch_size, 3, h, w)}
        lead = (batch_size,)
    if spec.with_depth:
        out["depth"] = 1.5 + 2.0 * torch.rand(*lead, 1, h, w)
    if spec.has_cameras:  # cameras on a sphere of radius 2.5 looking at the origin, as the embedded renderer's
        azimuth, elevation = 2 * math.pi * torch.rand(lead), 0.5 * torch.rand(lead)
        eye = spherical_to_cartesian(azimuth, elevation, torch.full(lead, 2.5))
        out["c2w"] = look_at(eye, torch.zeros_like(eye))
        out["K"] = intrinsics_from_fov(math.radians(50.0), h, w).expand(*lead, 3, 3).clone()
    return out


def step_fn(model: PretrainObjective, batch: Any) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        torch.manual_seed(0)
        loss = model.step(model.adapt_batch(batch), "train", model.encoder)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEMO, help="a multi-task config (default: the CPU demo)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (each times every model once)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cli = SelfSup3DCLI(
        args=[
            "--config",
            str(args.config),
            "--trainer.logger",
            "false",
            "--trainer.callbacks",
            "[]",
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
        ],  # fmt: skip
        run=False,
    )
    model, dm = cli.model, cli.datamodule
    if not isinstance(model, MultiTask):
        raise SystemExit(f"{args.config} is not a multi-task config")
    sources = dm.sources if isinstance(dm, CombinedShards) else {"data": dm}
    # no shards are read: a source whose depth or cameras follow the shards (with_depth, with_cameras null) gets them
    specs = {name: replace(spec, with_depth=spec.with_depth or sources[name].with_depth is None,
                           has_cameras=spec.has_cameras or getattr(sources[name], "with_cameras", False) is None)
             for name, spec in dm.data_specs().items()}  # fmt: skip
    model.configure_data(specs)
    sizes = {name: int(source.batch_size) for name, source in sources.items()}
    batches = {name: random_batch(spec, sizes[name]) for name, spec in specs.items()}
    combined = batches if len(batches) > 1 else next(iter(batches.values()))
    model.train()

    runs: dict[str, Callable[[], None]] = {"multi-task": step_fn(model, combined)}
    for name, component in model.components():
        alone = copy.deepcopy(component)
        alone.encoder = copy.deepcopy(model.encoder)  # fitted alone: the objective owns its encoder
        part = batches[model.source_of(name)]
        if component.input_kind == "single_view":
            part = alone.adapt_batch(part, model.image_views)
        runs[f"{name} alone"] = step_fn(alone, part)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.warmup + args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    alone_sum = sum(v for k, v in medians.items() if k != "multi-task")
    print(f"config {args.config}; {args.rounds} rounds after {args.warmup} warm-up; {torch.get_num_threads()} threads")
    print(f"batches: {', '.join(f'{n}: {sizes[n]}' for n in batches)}")
    for name, value in medians.items():
        spread = f"(min {min(times[name]) * 1e3:.1f}, max {max(times[name]) * 1e3:.1f})"
        print(f"  {name:24s} {value * 1e3:8.1f} ms/step {spread}")
    print(f"  {'sum of objectives alone':24s} {alone_sum * 1e3:8.1f} ms/step")
    print(f"ratio multi-task / sum alone: {medians['multi-task'] / alone_sum:.3f} (goal <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
