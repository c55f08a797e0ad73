"""``selfsup3d probe``: how 3D-aware is an encoder? Every probe, for any encoder, side by side.

    selfsup3d probe ENCODER... --data URLS [--probe-data URLS] [--out report.json] [--plot report.png]

See :mod:`selfsup3d.eval.sources` for what an ENCODER can be, :mod:`selfsup3d.eval.scenes` for the
fixed splits and :mod:`selfsup3d.eval.suite` for the probes. The colour baseline is always a row (unless
``--no-baseline``), and the chance row comes from the data alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from selfsup3d.errors import CheckpointMismatchError, ConfigError, require
from selfsup3d.eval.correspondence import THRESHOLDS
from selfsup3d.eval.report import markdown_table, protocol_text, rotation_table, save_chart, write_json
from selfsup3d.eval.scenes import decode_scenes, read_raw_scenes, split_scenes
from selfsup3d.eval.sources import LoadedSource, load_source
from selfsup3d.eval.suite import PROBES, ProbeSettings, chance_levels, run_probes

EPILOG = """\
ENCODER forms (LABEL=ENCODER names a row):
  path/encoder.safetensors     an exported encoder (selfsup3d export, EncoderExport)
  path/last.ckpt               a checkpoint of any objective
  configs/demo/triplane.yaml   the config's encoder, randomly initialised (the floor)
  vit_small_patch14_dinov2     a timm model (--pretrained for its weights; NAME@weights.pth for a local file)
  colour | oracle | constant   baselines: 5x5 colour window / true 3D position / a constant (sanity checks)

example (the embedded renderer's held-out objects, probe heads trained on other objects):
  selfsup3d probe runs/x/encoder.safetensors configs/demo/triplane.yaml \\
      --data 'data/embedded/val-*.tar' --probe-data data/embedded/train-000000.tar \\
      --out probe.json --plot probe.png
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="selfsup3d probe",
        description=(
            "Measure how 3D-aware frozen encoders are, on multi-view shards with depth and cameras: "
            "multi-view correspondence, monocular depth and normal probes, relative pose, linear/kNN "
            "classification and scene retrieval. Prints a table, writes JSON and a bar chart."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("encoders", nargs="+", metavar="ENCODER", help="encoders to compare (forms below)")
    p.add_argument("--data", nargs="+", required=True, metavar="URLS", help="shards of the test split")
    p.add_argument(
        "--probe-data",
        nargs="+",
        metavar="URLS",
        help="shards that train the probe heads (default: the --data scenes outside the test split); scenes "
        "showing a test object are dropped",
    )
    p.add_argument("--out", metavar="JSON", help="write the report as JSON")
    p.add_argument("--plot", metavar="PNG", help="write the bar chart")
    p.add_argument("--pretrained", action="store_true", help="timm model names load their pretrained weights")
    p.add_argument("--test-scenes", type=int, default=48, help="scenes in the test split (default 48)")
    p.add_argument("--probe-scenes", type=int, default=128, help="at most this many probe-train scenes (128)")
    p.add_argument("--views", type=int, help="views per scene, evenly spread (default: min(8, fewest in the data))")
    p.add_argument("--image-size", type=int, help="common resolution of the probes (default: the data's)")
    p.add_argument("--encoder-size", type=int, help="feed every encoder this size (default: its own img_size)")
    p.add_argument(
        "--probes",
        default=",".join(PROBES),
        help=f"comma-separated subset of: {', '.join(PROBES)} (default: all)",
    )
    p.add_argument("--no-baseline", action="store_true", help="do not add the colour baseline row")
    p.add_argument("--depth-align", choices=("median", "none"), default="median", help="scale-free or metric depth")
    p.add_argument("--queries", type=int, default=512, help="correspondence queries per pair (512)")
    p.add_argument("--matches", type=int, default=256, help="matches kept per pair by the ratio test (256)")
    p.add_argument("--head-steps", type=int, default=600, help="optimiser steps of the depth/normal heads")
    p.add_argument("--pose-steps", type=int, default=600, help="optimiser steps of the pose head")
    p.add_argument("--shuffle-views", action="store_true", help="sanity check: permute each test scene's views")
    p.add_argument("--seed", type=int, default=0, help="seed of every draw, head and random initialisation")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is often fastest on a busy machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (the report is printed all the same)")
    return p


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return device


def _settings(args: argparse.Namespace) -> ProbeSettings:
    probes = tuple(p.strip() for p in args.probes.split(",") if p.strip())
    for name, value, low in (
        ("--test-scenes", args.test_scenes, 1),
        ("--probe-scenes", args.probe_scenes, 1),
        ("--queries", args.queries, 1),
        ("--matches", args.matches, 1),
        ("--head-steps", args.head_steps, 0),
        ("--pose-steps", args.pose_steps, 0),
    ):
        require(value >= low, name, f">= {low}", value)
    try:
        return ProbeSettings(
            probes=probes,
            num_queries=args.queries,
            num_matches=args.matches,
            head_steps=args.head_steps,
            pose_steps=args.pose_steps,
            depth_align=args.depth_align,
            shuffle_views=args.shuffle_views,
            seed=args.seed,
        )
    except ValueError as err:
        raise ConfigError(f"--probes: {err}") from None


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Everything ``selfsup3d probe`` does, from parsed arguments; returns the report."""
    settings = _settings(args)
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    say = print
    progress = not args.quiet and sys.stderr.isatty()

    specs = list(args.encoders)
    if not args.no_baseline and not any(s.split("=")[-1].lower() in ("colour", "color") for s in specs):
        specs.append("colour")
    sources: list[LoadedSource] = [load_source(s, args.pretrained, args.seed, args.encoder_size) for s in specs]
    labels = [s.label for s in sources]
    for i, s in enumerate(sources):
        if labels.count(s.label) > 1:
            s.label = f"{s.label}#{labels[: i + 1].count(s.label)}"

    data = read_raw_scenes(args.data, "--data")
    probe_data = read_raw_scenes(args.probe_data, "--probe-data") if args.probe_data else None
    split = split_scenes(data, probe_data, args.test_scenes, args.probe_scenes)
    chosen = split.test + split.probe
    views = args.views or min(8, min(s.num_views for s in chosen))
    require(views >= 2, "--views", ">= 2 (pairs of views)", views)
    hw = (args.image_size, args.image_size) if args.image_size else split.test[0].size
    test = decode_scenes(split.test, views, hw)
    probe = decode_scenes(split.probe, views, hw)
    split.info["test"]["keys"] = test.keys
    split.info["probe"]["keys"] = probe.keys

    report: dict[str, Any] = {
        "format": "selfsup3d-probe",
        "version": 1,
        "command": ["selfsup3d", "probe", *argv],
        "protocol": {
            "image_size": list(hw),
            "views": views,
            "thresholds": list(settings.thresholds),
            "thresholds_px": [t * max(hw) for t in settings.thresholds],
            "rotation_bins": list(settings.rotation_bins),
            "num_queries": settings.num_queries,
            "num_matches": settings.num_matches,
            "depth_align": settings.depth_align,
            "shuffle_views": settings.shuffle_views,
            "probes": list(settings.probes),
            "seed": settings.seed,
            "device": device.type,
            "settings": settings.as_dict(),
        },
        "split": split.info,
        "chance": {},
        "encoders": [
            {"label": s.label, "spec": s.spec, "kind": s.kind, "info": s.info, "metrics": {}} for s in sources
        ],
    }
    say(protocol_text(report))
    report["chance"] = chance_levels(probe, test, settings, device)
    for entry, loaded in zip(report["encoders"], sources):
        start = time.perf_counter()
        entry["metrics"] = run_probes(loaded.source, probe, test, settings, device, progress, loaded.label)
        entry["seconds"] = round(time.perf_counter() - start, 1)
        say(f"{loaded.label}: {entry['seconds']:.0f} s")
    say("")
    say(markdown_table(report))
    bins = rotation_table(report, f"{THRESHOLDS[1]:g}") if "correspondence" in settings.probes else ""
    if bins:
        say(f"\ncorrespondence recall @ {THRESHOLDS[1] * 100:g}% by relative rotation of the pair:\n{bins}")
    if args.out:
        say(f"wrote {write_json(report, args.out)}")
    if args.plot:
        say(f"wrote {save_chart(report, args.plot)}")
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``selfsup3d probe``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args, argv)
    except (ConfigError, CheckpointMismatchError, FileNotFoundError) as err:
        parser.error(str(err))
    return 0
