"""``selfsup3d data ...``: build WebDataset shards in the selfsup3d format (``docs/shard-format.md``).

::

    selfsup3d data render --out DIR [--train-scenes N --val-scenes N --views V --size S --seed S]
    selfsup3d data convert blender SRC --out DIR     NeRF/Blender transforms*.json scenes
    selfsup3d data convert colmap SRC --out DIR      COLMAP text models with their images
    selfsup3d data convert images SRC --out DIR      an image folder (class = sub-folder), single-view
    selfsup3d data pseudo-depth ...                  monocular depth for single-view shards

``selfsup3d.cli`` dispatches ``selfsup3d data ARGS`` to :func:`main` before LightningCLI parses anything.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from selfsup3d.datamodules.format import IMAGE_EXTENSIONS


def _add_output_arguments(parser: argparse.ArgumentParser, shard_size: int, image_format: str) -> None:
    parser.add_argument("--out", required=True, help="output folder for the .tar shards")
    parser.add_argument("--shard-size", type=int, default=shard_size, help="samples per shard (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards of the same split")
    parser.add_argument(
        "--image-format",
        choices=[e for e in IMAGE_EXTENSIONS if e != "jpeg"],
        default=image_format,
        help="encoding of re-encoded images (default %(default)s)",
    )
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _render(args: argparse.Namespace) -> int:
    from selfsup3d.datamodules.render import RenderSettings, render_dataset

    settings = RenderSettings(num_views=args.views, size=args.size, seed=args.seed)
    info = render_dataset(
        args.out,
        train_scenes=args.train_scenes,
        val_scenes=args.val_scenes,
        settings=settings,
        scenes_per_shard=args.shard_size,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    total = sum(s["scenes"] for s in info["splits"].values())
    print(
        f"rendered {total} scenes in {info['seconds']} s ({info['scenes_per_second']} scenes/s); "
        f"{len(info['class_names'])} classes, see {args.out}/info.json"
    )
    for split, s in info["splits"].items():
        print(f"  {split}: {s['scenes']} scenes in {s['shards']} shard(s): {s['url']}")
    return 0


def _pseudo_depth(argv: Sequence[str]) -> int:
    """``pseudo-depth`` lives in ``selfsup3d.datamodules.pseudo_depth`` (``add_arguments``, ``run``)."""
    try:
        module = importlib.import_module("selfsup3d.datamodules.pseudo_depth")
    except ModuleNotFoundError as err:
        if err.name != "selfsup3d.datamodules.pseudo_depth":
            raise
        print(
            "selfsup3d data pseudo-depth: not available in this installation "
            "(selfsup3d.datamodules.pseudo_depth is missing)",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(
        prog="selfsup3d data pseudo-depth", description=(module.__doc__ or "").strip().split("\n")[0] or None
    )
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(list(argv))) or 0)


def build_parser() -> argparse.ArgumentParser:
    """The ``selfsup3d data`` argument parser (``pseudo-depth`` is parsed by its own module)."""
    parser = argparse.ArgumentParser(
        prog="selfsup3d data",
        description="Build WebDataset shards in the selfsup3d format (docs/shard-format.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{render,convert,pseudo-depth}")

    render = sub.add_parser(
        "render",
        help="render the embedded multi-view data set from pybullet's assets (CPU, no download)",
        description="Render multi-view scenes of pybullet's assets with its CPU renderer: train and val splits "
        "by asset, depth, masks, class labels. Deterministic for a seed.",
    )
    render.add_argument("--train-scenes", type=int, default=512, help="training scenes (default %(default)s)")
    render.add_argument("--val-scenes", type=int, default=64, help="validation scenes (default %(default)s)")
    render.add_argument("--views", type=int, default=8, help="views per scene (default %(default)s)")
    render.add_argument("--size", type=int, default=64, help="image width and height (default %(default)s)")
    render.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    _add_output_arguments(render, shard_size=128, image_format="png")
    render.set_defaults(func=_render)

    sub.add_parser("pseudo-depth", help="monocular pseudo depth for single-view shards", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``selfsup3d data``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "pseudo-depth":
        return _pseudo_depth(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        parser.exit(2, f"selfsup3d data {args.command}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]
